"""The Vision Transformer (Dosovitskiy et al. 2020) in plain PyTorch; no Ray import anywhere here."""

from .checkpoint import (
    adapt_state_dict,
    export_bytes,
    from_torchvision,
    load_npz_bytes,
    load_pretrained,
    load_weights,
    model_from_bytes,
    save_pretrained,
    to_timm_state_dict,
)
from .formats import class_names_from_json, config_from_json, from_jax_npz, timm_config
from .variants import count_parameters, create_model, flops_per_image, list_models, mfu, param_groups, variant_config
from .vit import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    ViTConfig,
    VisionTransformer,
    patchify,
    resample_pos_embed,
    sincos_2d_pos_embed,
    unpatchify,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "INCEPTION_MEAN", "INCEPTION_STD",
    "ViTConfig", "VisionTransformer", "adapt_state_dict", "class_names_from_json", "config_from_json",
    "count_parameters", "create_model", "export_bytes", "flops_per_image", "from_jax_npz", "from_torchvision",
    "list_models", "load_npz_bytes", "load_pretrained", "timm_config",
    "load_weights", "mfu", "model_from_bytes", "param_groups", "patchify", "resample_pos_embed",
    "save_pretrained", "sincos_2d_pos_embed", "to_timm_state_dict", "unpatchify", "variant_config",
]
