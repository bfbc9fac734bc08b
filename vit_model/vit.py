"""The Vision Transformer of Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words".

Reads top to bottom like the paper's section 3.1:
  z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos            (eq. 1)  PatchEmbed, VisionTransformer
  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                         (eq. 2)  Attention, Block
  z_l  = MLP(LN(z'_l)) + z'_l                               (eq. 3)  Mlp, Block
  y    = LN(z_L^0)                                          (eq. 4)  VisionTransformer.forward_features
With `global_pool="avg"` the LayerNorm moves after the pool (`fc_norm`), as timm and big_vision do.

Parameter names follow timm (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.attn.qkv`, ...)
so weights move between this package and timm without glue. Plain PyTorch, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The original JAX ViT checkpoints (and timm's augreg ones) expect inputs scaled to [-1, 1].
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def check_patch_grid(img_size: int, patch_size: int) -> None:
    """The one size rule: an img_size x img_size image is cut into whole P x P patches (N = (H/P)^2)."""
    if img_size <= 0 or patch_size <= 0:
        raise ValueError(f"img_size and patch_size must be positive, got {img_size}, {patch_size}")
    if img_size % patch_size:
        raise ValueError(
            f"img_size {img_size} is not divisible by patch_size {patch_size}: "
            f"choose an img_size that is a multiple of {patch_size}"
        )


@dataclass
class ViTConfig:
    """Everything that defines the network; saved as JSON next to the weights."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: Literal["token", "avg"] = "token"
    pos_embed: Literal["learn", "sincos2d"] = "learn"
    fc_norm: bool | None = None  # LayerNorm after the pool instead of on every token; None: on for avg (timm's default)
    pre_logits: bool = False  # the paper's pretraining head: Linear + tanh before the classifier
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Preprocessing the weights expect; travels with them (config.json, timm's pretrained_cfg).
    mean: tuple[float, float, float] | tuple[float, ...] = field(default=INCEPTION_MEAN)
    std: tuple[float, float, float] | tuple[float, ...] = field(default=INCEPTION_STD)
    crop_pct: float = (
        0.9  # eval: resize the shorter side to img_size / crop_pct, center-crop img_size (timm's ViT default)
    )
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        check_patch_grid(self.img_size, self.patch_size)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.pos_embed not in ("learn", "sincos2d"):
            raise ValueError(f"pos_embed must be 'learn' or 'sincos2d', got {self.pos_embed!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {list(self.std)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else bool(self.fc_norm)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C), patches in row-major order, pixels (row, col, channel) inside.

    The same order as the data pipeline's numpy `patchify`, so uint8 patches cut on CPU and
    images cut here give identical embeddings.
    """
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, in_chans: int = 3) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W) for a square grid; the inverse of `patchify`."""
    b, n, _ = patches.shape
    g, p = math.isqrt(n), patch_size
    x = patches.reshape(b, g, g, p, p, in_chans)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, in_chans, g * p, g * p)


class PatchEmbed(nn.Module):
    """x_p E: a Linear on flattened patches, stored as the equivalent Conv2d weight (D, C, P, P).

    Kept as a Conv2d so its `proj.weight` has timm's shape; applied as a matmul on (B, N, P*P*C)
    patches because that is what the pipeline delivers and it is one GEMM either way.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size, self.in_chans = cfg.patch_size, cfg.in_chans
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def linear_weight(self) -> torch.Tensor:
        """(D, P*P*C) with the (row, col, channel) order of `patchify`."""
        return self.proj.weight.permute(0, 2, 3, 1).flatten(1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.linear_weight(), self.proj.bias)


def sincos_2d_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (big_vision `posemb_sincos_2d`), (grid*grid, D)."""
    if embed_dim % 4:
        raise ValueError(f"sincos2d position embeddings need embed_dim divisible by 4, got {embed_dim}")
    y, x = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4) / (embed_dim // 4 - 1 or 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


class Attention(nn.Module):
    """Multi-head self-attention (paper appendix A): one fused qkv projection, rows q;k;v."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = None
        if return_attn:
            # Explicit softmax(QK^T/sqrt(d)) so the probabilities can be returned for visualisation.
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            x = F.dropout(attn, self.attn_drop, self.training) @ v
        else:
            # Fused kernel (flash / memory-efficient): never materialises the N x N matrix.
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(x)), attn


class Mlp(nn.Module):
    """D -> mlp_ratio*D -> D with exact GELU (paper eq. 3)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample with probability p, rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) (paper eqs. 2-3)."""

    def __init__(self, cfg: ViTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.attn_drop_rate, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), cfg.drop_rate)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + drop_path(y, self.drop_path_rate, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)
        return x, attn


class VisionTransformer(nn.Module):
    """ViT on images (B, C, H, W) float, or on pipeline patches (B, N, P*P*C) uint8.

    Float images are expected normalised as timm's ViTs expect (mean/std of the config);
    uint8 patches are normalised here, on the device, so only bytes cross the data pipeline.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        if cfg.pos_embed == "sincos2d":
            pe = torch.cat([torch.zeros(1, d), sincos_2d_pos_embed(d, cfg.grid_size)])[None]
            self.pos_embed = nn.Parameter(pe, requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear in depth, as timm
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        # timm's layout: `norm` on every token, or (fc_norm) an Identity there and `fc_norm` after the pool.
        self.norm = nn.Identity() if cfg.use_fc_norm else nn.LayerNorm(d, eps=1e-6)
        self.fc_norm = nn.LayerNorm(d, eps=1e-6) if cfg.use_fc_norm else nn.Identity()
        if cfg.pre_logits:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(d, d))
            self.pre_logits.add_module("act", nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        # uint8 patch -> normalised float: x * scale + shift, per channel, repeated over P*P.
        mean = torch.tensor(cfg.mean).repeat(cfg.patch_size**2)
        std = torch.tensor(cfg.std).repeat(cfg.patch_size**2)
        self.register_buffer("_in_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("_in_shift", -mean / std, persistent=False)
        if not self.pos_embed.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the reference implementations: xavier-uniform linears, near-zero biases, zero head."""
        if self.cfg.pos_embed == "learn":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        # Patch embedding: LeCun-normal-like fan-in init on the flattened patch (as big_vision).
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == "head":
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                    continue
                nn.init.xavier_uniform_(m.weight)
                if "mlp" in name:
                    nn.init.normal_(m.bias, std=1e-6)
                else:
                    nn.init.zeros_(m.bias)

    # ---- input step -------------------------------------------------------------------------
    def normalize(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches (B, N, P*P*C) -> float patches normalised with the config's mean/std."""
        return patches.to(self._in_scale.dtype) * self._in_scale + self._in_shift

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) float or patches (B, N, P*P*C) uint8/float -> tokens (B, N, D)."""
        cfg = self.cfg
        if x.ndim == 4:
            if x.shape[1] != cfg.in_chans:
                raise ValueError(f"expected {cfg.in_chans} channels in (B, C, H, W) input, got shape {tuple(x.shape)}")
            h, w = x.shape[-2:]
            if h % cfg.patch_size or w % cfg.patch_size:
                raise ValueError(
                    f"image size {h}x{w} is not divisible by the patch size {cfg.patch_size}: "
                    f"resize or crop to a multiple of {cfg.patch_size}"
                )
            if x.dtype == torch.uint8:
                raise ValueError("uint8 input must come as patches (B, N, P*P*C); float images must be normalised")
            x = patchify(x, cfg.patch_size)
        elif x.ndim == 3:
            if x.shape[-1] != cfg.patch_dim:
                raise ValueError(
                    f"expected patches of dimension P*P*C = {cfg.patch_size}*{cfg.patch_size}*{cfg.in_chans} "
                    f"= {cfg.patch_dim}, got shape {tuple(x.shape)}"
                )
            if x.dtype == torch.uint8:
                x = self.normalize(x)
        else:
            raise ValueError(f"expected images (B, C, H, W) or patches (B, N, P*P*C), got shape {tuple(x.shape)}")
        x = self.patch_embed(x.to(self.patch_embed.proj.weight.dtype))
        n = x.shape[1]
        pos = self.pos_embed
        if n != pos.shape[1] - 1:
            # Another resolution at run time: interpolate the grid, keep the class slot (section 3.2).
            pos = resample_pos_embed(pos, math.isqrt(n))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, x], dim=1) + pos)

    # ---- encoder and head -------------------------------------------------------------------
    def forward_tokens(self, x: torch.Tensor, return_attn: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens after the last block and `norm` (B, 1+N, D), and per-layer attention (B, H, 1+N, 1+N) if asked."""
        x = self.embed_input(x)
        attns = []
        for blk in self.blocks:
            x, a = blk(x, return_attn)
            if return_attn:
                attns.append(a)
        return self.norm(x), attns

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Class token, or the mean of the patch tokens for `avg`; then `fc_norm` (an Identity unless on)."""
        pooled = tokens[:, 1:].mean(dim=1) if self.cfg.global_pool == "avg" else tokens[:, 0]
        return self.fc_norm(pooled)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled representation (B, D) the head reads."""
        return self.pre_logits(self.pool(self.forward_tokens(x)[0]))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the attention probabilities of every layer, via the explicit path."""
        tokens, attns = self.forward_tokens(x, return_attn=True)
        return self.head(self.pre_logits(self.pool(tokens))), attns


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + new_grid^2, D) by bicubic 2-D interpolation of the grid.

    As timm's `resample_abs_pos_embed`: bicubic, antialiased both ways, align_corners=False, computed in
    float32, the class slot copied untouched.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"position embedding of {grid.shape[1]} grid tokens is not a square grid")
    if old == new_grid:
        return pos_embed
    d = grid.shape[-1]
    g = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=1)
