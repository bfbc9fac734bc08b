"""Named variants (timm's names, the paper's Table 1 sizes) and the helpers users need next to a model."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch
from torch import nn

from .vit import VisionTransformer, ViTConfig

# name -> ViTConfig fields (img_size 224 unless given); Ti and S are DeiT's, B/L/H the paper's Table 1.
_VARIANTS: dict[str, dict] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_384": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, img_size=384),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch32_224": dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # Small variants for CPUs, tests and the digits demo (32 px images, 4 px patches: 64 tokens).
    "vit_micro_patch4_32": dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4),
    "vit_mini_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4),
}


def list_models() -> list[str]:
    return sorted(_VARIANTS)


def variant_config(name: str, **overrides) -> ViTConfig:
    if name not in _VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; known variants: {', '.join(list_models())}")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; valid options: {sorted(fields)}")
    return ViTConfig(**{**_VARIANTS[name], **overrides})


def create_model(name: str, *, device: str | torch.device | None = None, **overrides) -> VisionTransformer:
    """`create_model("vit_base_patch16_224", num_classes=10, img_size=384)`.

    `device="meta"` builds the module without memory (for counting parameters of large variants).
    """
    cfg = variant_config(name, **overrides)
    with torch.device(device) if device is not None else nullcontext():
        return VisionTransformer(cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def layer_id(name: str, depth: int) -> int:
    """Where a parameter sits for layer-wise lr decay (BEiT, MAE): 0 for the embeddings (patch, position,
    class token), i + 1 for `blocks.i`, depth + 1 for everything after the blocks (norms, head)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: decay on weight matrices only; none on biases, norms, pos_embed, cls_token.

    With `layer_decay` (MAE and BEiT fine-tuning use 0.65-0.75), each group also carries `lr_scale` =
    layer_decay ** (depth + 1 - layer_id): the head keeps the full lr, block i gets decay^(depth - i), the
    patch embedding decay^(depth + 1). The training step multiplies the scheduled lr by it.
    """
    depth = len(getattr(model, "blocks", ()))
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(("pos_embed", "cls_token", "mask_token"))
        lid = layer_id(name, depth) if layer_decay is not None else 0
        g = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay})
        if layer_decay is not None:
            g["lr_scale"] = layer_decay ** (depth + 1 - lid)
            g["layer_id"] = lid
        g["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1]))]


def flops_per_image(cfg: ViTConfig, img_size: int | None = None, training: bool = False) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image's forward; training counts 3x (fwd + 2x bwd)."""
    s = img_size or cfg.img_size
    n = (s // cfg.patch_size) ** 2
    t, d = n + 1, cfg.embed_dim
    hidden = int(d * cfg.mlp_ratio)
    patch = 2 * n * cfg.patch_dim * d
    per_block = 2 * t * d * (3 * d + d + 2 * hidden) + 2 * 2 * t * t * d  # projections + QK^T and AV
    head = 2 * d * cfg.num_classes + (2 * d * d if cfg.pre_logits else 0)
    fwd = patch + cfg.depth * per_block + head
    return 3.0 * fwd if training else float(fwd)


def mfu(
    images_per_s: float, cfg: ViTConfig, peak_flops: float, training: bool = True, img_size: int | None = None
) -> float:
    """Model FLOPs utilisation: achieved matmul FLOP/s over the hardware peak (both in FLOP/s)."""
    return images_per_s * flops_per_image(cfg, img_size, training) / peak_flops


# Dense bf16 tensor-core peaks (FLOP/s, without sparsity) from the vendors' data sheets: the one table the
# training loop's MFU and the benchmarks use when no peak is given.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def gpu_peak_flops(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its name (`torch.cuda.get_device_name()`), or None when unknown."""
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in device_name), None)
