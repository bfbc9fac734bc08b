"""Other projects' formats, in and out: timm's config.json, and the paper's JAX `.npz` checkpoints.

timm (`timm.create_model("local-dir:<folder>", pretrained=True)`) reads a config.json with
  architecture, num_classes, num_features, global_pool, label_names,
  model_args       keyword arguments of timm's VisionTransformer that rebuild these exact weights,
  pretrained_cfg   input_size, mean, std, crop_pct, crop_mode, interpolation, ... (the preprocessing).
This project writes those fields beside its own `model` section, so one folder serves both, and reads
a folder timm wrote (`save_for_hf`) as it is.

The JAX checkpoints of google-research/vision_transformer (`imagenet21k/ViT-B_16.npz`, ...) and of
big_vision are flat `.npz` archives keyed by Flax parameter paths; `from_jax_npz` maps them to timm
names (kernels transposed, attention heads flattened, big_vision's scanned layers split).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import fields

import numpy as np
import torch

from .vit import ViTConfig

# (width, depth, heads) -> timm's size word; the rest of a name is patch and image size.
_SIZES = {
    (192, 12, 3): "tiny",
    (384, 12, 6): "small",
    (768, 12, 12): "base",
    (1024, 24, 16): "large",
    (1280, 32, 16): "huge",
}
_SIZE_FIELDS = {v: dict(embed_dim=k[0], depth=k[1], num_heads=k[2]) for k, v in _SIZES.items()}
# Names timm 1.0 registers (a name must exist there; model_args carry every field anyway).
_TIMM_NAMES = {
    "vit_tiny_patch16_224",
    "vit_tiny_patch16_384",
    "vit_small_patch16_224",
    "vit_small_patch16_384",
    "vit_small_patch32_224",
    "vit_small_patch32_384",
    "vit_base_patch16_224",
    "vit_base_patch16_384",
    "vit_base_patch32_224",
    "vit_base_patch32_384",
    "vit_large_patch16_224",
    "vit_large_patch16_384",
    "vit_large_patch32_384",
    "vit_huge_patch14_224",
}
# timm VisionTransformer arguments this model has a slot for; any other one (LayerScale, register
# tokens, no class token, map pooling, ...) changes the tensors and is refused by name.
_TIMM_ARGS = {
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "global_pool",
    "class_token",
    "fc_norm",
    "num_classes",
    "drop_rate",
    "pos_drop_rate",
    "proj_drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "dynamic_img_size",
    "dynamic_img_pad",
}
_TIMM_DEFAULTS_OFF = {
    "class_token": True,
    "no_embed_class": False,
    "reg_tokens": 0,
    "pre_norm": False,
    "init_values": None,
    "qk_norm": False,
    "final_norm": True,
}


def timm_incompatibilities(cfg: ViTConfig) -> list[str]:
    """Options of `cfg` that timm's VisionTransformer has no slot for (an export then loads here only)."""
    out = []
    if cfg.pre_logits:
        out.append(
            "pre_logits: timm's VisionTransformer has no Linear+tanh layer before the head "
            "(train with model.pre_logits: false, or fine-tune without it, as the paper does)"
        )
    return out


def timm_notes(cfg: ViTConfig) -> list[str]:
    """Differences timm loads fine but a user should know of."""
    out = []
    if cfg.pos_embed == "sincos2d":
        out.append("pos_embed sincos2d: timm loads the fixed table into its learned `pos_embed` (trainable there)")
    return out


def timm_architecture(cfg: ViTConfig) -> str:
    """The timm entry point that builds these weights with `model_args` (which carry every field): the one
    named for this exact shape when timm has it; otherwise the registered name nearest in width, then in
    patch size, then in image size, so the size word never overstates the model (a 64-wide micro model
    is `vit_tiny_*`, never `vit_base_*`)."""
    size = _SIZES.get((cfg.embed_dim, cfg.depth, cfg.num_heads))
    name = f"vit_{size}_patch{cfg.patch_size}_{cfg.img_size}" if size else ""
    if name in _TIMM_NAMES:
        return name
    width = {v: k[0] for k, v in _SIZES.items()}

    def distance(entry: str) -> tuple:
        _, word, patch, img = entry.split("_")
        return abs(width[word] - cfg.embed_dim), abs(int(patch[5:]) - cfg.patch_size), abs(int(img) - cfg.img_size)

    return min(sorted(_TIMM_NAMES), key=distance)


def timm_config(cfg: ViTConfig, class_names: list[str] | None = None) -> dict:
    """timm's config.json fields for weights of `cfg` ({} when timm cannot hold them)."""
    if timm_incompatibilities(cfg):
        return {}
    model_args = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        class_token=True,
        global_pool=cfg.global_pool,
        fc_norm=cfg.use_fc_norm,
        num_classes=cfg.num_classes,
    )
    pretrained_cfg = dict(
        input_size=[cfg.in_chans, cfg.img_size, cfg.img_size],
        fixed_input_size=True,
        interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct,
        crop_mode="center",
        mean=list(cfg.mean),
        std=list(cfg.std),
        num_classes=cfg.num_classes,
        pool_size=None,
        first_conv="patch_embed.proj",
        classifier="head",
        custom_load=False,
    )
    out = dict(
        architecture=timm_architecture(cfg),
        num_classes=cfg.num_classes,
        num_features=cfg.embed_dim,
        global_pool=cfg.global_pool,
        model_args=model_args,
        pretrained_cfg=pretrained_cfg,
    )
    if class_names:
        out["label_names"] = list(class_names)
    return out


# ---- reading a config.json: this project's, timm's, or an older export of this project ----------
def config_from_json(meta: dict) -> ViTConfig:
    """The ViTConfig a config.json describes. Raises ValueError naming what cannot be built here."""
    if "model" in meta:
        m = dict(meta["model"])
        # Exports before fc_norm / preprocessing were recorded: avg pooling normalised every token, and
        # evaluation used a 0.875 bilinear center crop.
        m.setdefault("fc_norm", False)
        m.setdefault("crop_pct", 0.875)
        m.setdefault("interpolation", "bilinear")
        known = {f.name for f in fields(ViTConfig)}
        return ViTConfig(**{k: v for k, v in m.items() if k in known})
    if "architecture" in meta:
        return _config_from_timm(meta)
    raise ValueError(
        "config.json has neither a 'model' section (this project's export) nor an 'architecture' "
        "(a timm / Hugging Face export): not a model folder this project can load"
    )


def _config_from_timm(meta: dict) -> ViTConfig:
    arch = meta["architecture"]
    m = re.fullmatch(r"(?:vit|deit)_(tiny|small|base|large|huge)_patch(\d+)_(\d+)(?:\.\w+)?", arch)
    args = dict(meta.get("model_args") or {})
    if not m and not {"embed_dim", "depth", "num_heads", "patch_size"} <= set(args):
        raise ValueError(
            f"timm architecture {arch!r} is not a plain ViT this project builds (vit_/deit_ + size + "
            "patch + image size), and its model_args do not give embed_dim, depth, num_heads, patch_size"
        )
    for k, default in _TIMM_DEFAULTS_OFF.items():
        if k in args and args[k] != default:
            raise ValueError(
                f"timm model_args {k}={args[k]!r} has no equivalent here (only {k}={default!r}): "
                "this export is another ViT family than the paper's"
            )
    unknown = sorted(set(args) - _TIMM_ARGS - set(_TIMM_DEFAULTS_OFF))
    if unknown:
        raise ValueError(f"timm model_args {unknown} are not options of this project's ViT")
    pcfg = dict(meta.get("pretrained_cfg") or {})
    out: dict = {}
    if m:
        out.update(_SIZE_FIELDS[m.group(1)], patch_size=int(m.group(2)), img_size=int(m.group(3)))
    if pcfg.get("input_size"):
        out["img_size"] = int(pcfg["input_size"][-1])
    for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias"):
        if k in args:
            out[k] = args[k]
    if isinstance(out.get("img_size"), (list, tuple)):
        if out["img_size"][0] != out["img_size"][1]:
            raise ValueError(f"non-square img_size {out['img_size']} is not supported")
        out["img_size"] = out["img_size"][0]
    pool = args.get("global_pool", meta.get("global_pool", "token"))
    if pool not in ("token", "avg"):
        raise ValueError(f"timm global_pool {pool!r} has no equivalent here (token or avg)")
    out["global_pool"] = pool
    out["fc_norm"] = args.get("fc_norm") if args.get("fc_norm") is not None else pool == "avg"
    num_classes = meta.get("num_classes", args.get("num_classes", pcfg.get("num_classes", 1000)))
    out["num_classes"] = int(num_classes)
    for k in ("mean", "std", "crop_pct"):
        if pcfg.get(k) is not None:
            out[k] = tuple(pcfg[k]) if k != "crop_pct" else float(pcfg[k])
    interp = pcfg.get("interpolation", "bicubic")
    out["interpolation"] = interp if interp in ("bicubic", "bilinear") else "bicubic"
    if interp not in ("bicubic", "bilinear"):
        warnings.warn(f"timm interpolation {interp!r} is not offered here; using bicubic", stacklevel=2)
    return ViTConfig(**out)


def class_names_from_json(meta: dict, num_classes: int) -> list[str]:
    names = meta.get("class_names") or meta.get("label_names") or (meta.get("pretrained_cfg") or {}).get("label_names")
    if isinstance(names, dict):  # timm allows {index: name}
        names = [names.get(str(i), names.get(i, str(i))) for i in range(num_classes)]
    return list(names) if names else [str(i) for i in range(num_classes)]


# ---- the paper's JAX checkpoints ---------------------------------------------------------------
def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _unscan(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned encoder (`Transformer/encoderblock/...` with a leading layer axis) -> per-layer keys."""
    out = {}
    for k, v in arrays.items():
        if k.startswith("Transformer/encoderblock/"):
            rest = k[len("Transformer/encoderblock/") :]
            for i in range(v.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
        else:
            out[k] = v
    return out


def from_jax_npz(arrays) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict under timm's names, ViTConfig fields) of a google-research/vision_transformer or
    big_vision `.npz` (a mapping of Flax paths to arrays, e.g. `np.load(f, allow_pickle=False)`)."""
    a = _unscan({k: np.asarray(arrays[k]) for k in arrays.keys()})
    a = {k.removeprefix("params/"): v for k, v in a.items()}
    if "embedding/kernel" not in a:
        raise ValueError("not a ViT .npz: no 'embedding/kernel' (the patch embedding) among its keys")
    if "cls" not in a:
        raise ValueError(
            "this .npz has no class token ('cls'): big_vision models pooled by gap/map without one "
            "are not supported (the paper's checkpoints all have it)"
        )
    blocks = sorted({int(m.group(1)) for k in a if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
    if blocks != list(range(len(blocks))) or not blocks:
        raise ValueError(f"encoder blocks of the .npz are not numbered 0..L-1: {blocks[:5]}...")
    kernel = a["embedding/kernel"]  # (P, P, C, D)
    p, _, c, d = kernel.shape
    sd = {
        "patch_embed.proj.weight": _t(kernel.transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": _t(a["embedding/bias"]),
        "cls_token": _t(a["cls"]).reshape(1, 1, d),
    }
    if "Transformer/posembed_input/pos_embedding" in a:  # the paper's layout: the class slot included
        sd["pos_embed"] = _t(a["Transformer/posembed_input/pos_embedding"])
    elif "pos_embedding" in a:  # big_vision: grid only, the class token gets no position embedding
        grid = _t(a["pos_embedding"]).reshape(1, -1, d)
        sd["pos_embed"] = torch.cat([torch.zeros(1, 1, d), grid], dim=1)
    else:
        raise ValueError(
            "no position embedding in the .npz ('Transformer/posembed_input/pos_embedding' or 'pos_embedding')"
        )
    heads = None
    for i in blocks:
        pre = f"Transformer/encoderblock_{i}/"
        names = {k[len(pre) :] for k in a if k.startswith(pre)}
        ln = sorted({n.split("/")[0] for n in names if n.startswith("LayerNorm_")}, key=lambda s: int(s.split("_")[1]))
        mha = next(n.split("/")[0] for n in names if n.startswith("MultiHeadDotProductAttention_"))
        mlp = next(n.split("/")[0] for n in names if n.startswith("MlpBlock_"))
        if len(ln) != 2:
            raise ValueError(f"block {i} of the .npz has {len(ln)} LayerNorms, expected 2")
        q = a[f"{pre}{mha}/query/kernel"]  # (D, heads, head_dim)
        heads = q.shape[1]
        qkv_w = [a[f"{pre}{mha}/{n}/kernel"].reshape(d, d).T for n in ("query", "key", "value")]
        qkv_b = [a[f"{pre}{mha}/{n}/bias"].reshape(d) for n in ("query", "key", "value")]
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": _t(a[f"{pre}{ln[0]}/scale"]),
                b + "norm1.bias": _t(a[f"{pre}{ln[0]}/bias"]),
                b + "attn.qkv.weight": _t(np.concatenate(qkv_w, 0)),
                b + "attn.qkv.bias": _t(np.concatenate(qkv_b)),
                b + "attn.proj.weight": _t(a[f"{pre}{mha}/out/kernel"].reshape(d, d).T),
                b + "attn.proj.bias": _t(a[f"{pre}{mha}/out/bias"]),
                b + "norm2.weight": _t(a[f"{pre}{ln[1]}/scale"]),
                b + "norm2.bias": _t(a[f"{pre}{ln[1]}/bias"]),
                b + "mlp.fc1.weight": _t(a[f"{pre}{mlp}/Dense_0/kernel"].T),
                b + "mlp.fc1.bias": _t(a[f"{pre}{mlp}/Dense_0/bias"]),
                b + "mlp.fc2.weight": _t(a[f"{pre}{mlp}/Dense_1/kernel"].T),
                b + "mlp.fc2.bias": _t(a[f"{pre}{mlp}/Dense_1/bias"]),
            }
        )
    sd["norm.weight"], sd["norm.bias"] = _t(a["Transformer/encoder_norm/scale"]), _t(a["Transformer/encoder_norm/bias"])
    pre_logits = "pre_logits/kernel" in a
    if pre_logits:
        if a["pre_logits/kernel"].shape != (d, d):
            raise ValueError(
                f"pre_logits of shape {a['pre_logits/kernel'].shape} (representation size != width) "
                "is not supported: fine-tune without it"
            )
        sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"] = _t(a["pre_logits/kernel"].T), _t(a["pre_logits/bias"])
    num_classes = 0
    if "head/kernel" in a:
        sd["head.weight"], sd["head.bias"] = _t(a["head/kernel"].T), _t(a["head/bias"])
        num_classes = a["head/kernel"].shape[1]
    grid = sd["pos_embed"].shape[1] - 1
    cfg = dict(
        patch_size=p,
        in_chans=c,
        embed_dim=d,
        depth=len(blocks),
        num_heads=heads,
        mlp_ratio=a["Transformer/encoderblock_0/" + mlp + "/Dense_0/kernel"].shape[1] / d,
        img_size=int(round(grid**0.5)) * p,
        num_classes=num_classes,
        pre_logits=pre_logits,
        global_pool="token",
        fc_norm=False,
        qkv_bias=True,
    )
    return sd, cfg
