"""Weights as safetensors + a JSON config (never pickle), and loading other projects' key layouts.

An exported model is two files side by side:
  model.safetensors  the state dict, timm key names
  config.json        {"model": ViTConfig fields, "class_names": [...], ...any metadata,
                      plus timm's fields (architecture, model_args, pretrained_cfg, label_names)}
so `timm.create_model("local-dir:<folder>", pretrained=True)` opens it as it is, and a folder timm
wrote loads here (`model_from_bytes`).
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .formats import (
    class_names_from_json,
    config_from_json,
    from_jax_npz,
    timm_config,
    timm_incompatibilities,
    timm_notes,
)
from .vit import VisionTransformer, ViTConfig, resample_pos_embed

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# torchvision `vit_b_16` -> timm names, one rule a line.
_TORCHVISION_RULES = [
    (r"^class_token$", "cls_token"),
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^encoder\.pos_embedding$", "pos_embed"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_bias$", r"blocks.\1.attn.qkv.bias"),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layers\.encoder_layer_(\d+)\.mlp\.(?:3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"^encoder\.ln\.", "norm."),
    (r"^heads\.head\.", "head."),
    (r"^heads\.pre_logits\.", "pre_logits.fc."),
]


def from_torchvision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision ViT state dict to timm keys (same q;k;v row order, so no reshuffle)."""
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _TORCHVISION_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"torchvision key {key!r} has no timm equivalent")
    return out


def to_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The state dict under timm's names: this package already uses them, so it is a plain copy."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _normalise_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP and torch.compile wrappers prefix keys; strip them so any of our checkpoints loads.
    sd = {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}
    if "class_token" in sd or "conv_proj.weight" in sd:
        sd = from_torchvision(sd)
    return sd


def adapt_state_dict(
    state_dict: dict[str, torch.Tensor], model: VisionTransformer, *, drop_head: bool = False
) -> dict[str, torch.Tensor]:
    """Make a timm- or torchvision-layout state dict fit `model`.

    Resamples the position embeddings to the model's patch grid (paper section 3.2), and, with
    `drop_head`, replaces a classifier of another class count by the model's fresh zero head.
    Raises ValueError naming the first tensor that does not fit (another architecture).
    """
    sd = _normalise_keys(state_dict)
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        src = sd["pos_embed"]
        if src.shape[-1] != own["pos_embed"].shape[-1]:
            raise ValueError(f"pos_embed width {src.shape[-1]} does not match the model's {own['pos_embed'].shape[-1]}")
        sd["pos_embed"] = resample_pos_embed(src, math.isqrt(own["pos_embed"].shape[1] - 1))
    if drop_head:
        # Fine-tuning (paper section 3.2): the pretraining head goes, and with it a pre-logits layer
        # the model does not have; the model's fresh zero head takes their place.
        dropped_pre_logits = "pre_logits.fc.weight" in sd and "pre_logits.fc.weight" not in own
        if dropped_pre_logits:
            sd = {k: v for k, v in sd.items() if not k.startswith("pre_logits.")}
        for k in ("head.weight", "head.bias"):
            if k in own and (dropped_pre_logits or k not in sd or sd[k].shape != own[k].shape):
                sd[k] = own[k].clone()  # a new head: another class count, or weights without one (MAE's encoder)
            elif k not in own:
                sd.pop(k, None)  # a headless model (an MAE encoder) from a classifier
        if "fc_norm.weight" in own and "fc_norm.weight" not in sd and "norm.weight" in sd and "norm.weight" not in own:
            # MAE's fine-tuning with global pooling: the encoder's token norm goes, a fresh norm after the pool
            sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
            sd.update({k: v.clone() for k, v in own.items() if k.startswith("fc_norm.")})
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if "norm.weight" in missing and "fc_norm.weight" in unexpected:
        raise ValueError(
            "the checkpoint normalises after average pooling (fc_norm, timm's default for avg) and the "
            "model normalises every token: set model.fc_norm: true"
        )
    if "fc_norm.weight" in missing and "norm.weight" in unexpected:
        raise ValueError(
            "the checkpoint normalises every token before pooling (an export from before fc_norm, or "
            "timm's fc_norm=False) and the model normalises after the pool: set model.fc_norm: false"
        )
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model architecture: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model needs {tuple(own[k].shape)}: "
                "the checkpoint is of another architecture (width, depth, patch size or class count)"
            )
    return sd


def load_weights(
    model: VisionTransformer, state_dict: dict[str, torch.Tensor], *, drop_head: bool = False
) -> VisionTransformer:
    model.load_state_dict(adapt_state_dict(state_dict, model, drop_head=drop_head), strict=True)
    return model


# ---- bytes and folders ----------------------------------------------------------------------
def export_bytes(model: VisionTransformer, **metadata) -> tuple[bytes, bytes]:
    """(safetensors bytes, config JSON bytes) of a model; metadata (e.g. class_names) goes in the JSON.

    The JSON carries timm's fields too; an option timm has no slot for (pre_logits) is stated as a
    warning and in `timm_incompatible`, and the timm fields are then left out (timm would refuse).
    """
    cfg = model.cfg
    from safetensors.torch import save  # imported where used: the model itself runs without it

    weights = save(to_timm_state_dict(model), metadata={"format": "pt", "layout": "timm"})
    blockers, notes = timm_incompatibilities(cfg), timm_notes(cfg)
    for line in blockers:
        warnings.warn(f"export not loadable by timm: {line}", stacklevel=2)
    doc = {"model": cfg.to_dict(), **metadata, **timm_config(cfg, metadata.get("class_names"))}
    if blockers:
        doc["timm_incompatible"] = blockers
    if notes:
        doc["timm_notes"] = notes
    return weights, json.dumps(doc, indent=2, sort_keys=True).encode()


def model_from_bytes(weights: bytes, config: bytes, **overrides) -> tuple[VisionTransformer, dict]:
    """Build a model from exported bytes (this project's export or a timm folder's two files);
    returns (model in eval mode, the config JSON as a dict, with `class_names` filled in).

    Overrides (e.g. `img_size=384`) change the architecture built; position embeddings resample.
    """
    meta = json.loads(config)
    base = config_from_json(meta)
    model = VisionTransformer(ViTConfig(**{**base.to_dict(), **overrides}))
    from safetensors.torch import load

    load_weights(model, load(weights))
    meta["class_names"] = class_names_from_json(meta, model.cfg.num_classes)
    return model.eval(), meta


def load_npz_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """The paper's / big_vision's `.npz` checkpoint -> (timm-layout state dict, ViTConfig fields). Never unpickles."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return from_jax_npz(arrays)
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise ValueError(
                "the .npz holds pickled objects, which are never loaded: not a JAX ViT checkpoint"
            ) from None
        raise


def save_pretrained(model: VisionTransformer, folder: str | Path, **metadata) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, config = export_bytes(model, **metadata)
    (folder / WEIGHTS_NAME).write_bytes(weights)
    (folder / CONFIG_NAME).write_bytes(config)
    return folder


def load_pretrained(folder: str | Path, **overrides) -> tuple[VisionTransformer, dict]:
    folder = Path(folder)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: a model folder holds {WEIGHTS_NAME} and {CONFIG_NAME}")
    return model_from_bytes((folder / WEIGHTS_NAME).read_bytes(), (folder / CONFIG_NAME).read_bytes(), **overrides)
