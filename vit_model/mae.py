"""Masked autoencoders (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377).

    masking            per sample, keep a random round(N x (1 - mask_ratio)) of the N patches   random_masking
    encoder            the ViT of this package on [class token; visible patches] only        MaskedAutoencoder.encode
    decoder            Linear to the decoder width, mask tokens in the masked slots, fixed  MaskedAutoencoder.decode
                       2-D sin-cos positions, a few pre-norm blocks, Linear to P*P*C pixels
    loss               MSE on the masked patches of per-patch normalised pixels            MaskedAutoencoder.loss

The encoder is a plain `VisionTransformer` (timm's parameter names, no head): after pretraining it is
exported as a model of its own and fine-tuned with `--init-from`. The decoder's names follow MAE's
reference code (`decoder_embed`, `mask_token`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`,
`decoder_pred`). Plain PyTorch, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from .vit import Block, VisionTransformer, ViTConfig, sincos_2d_pos_embed


@dataclass
class MAEConfig:
    """The masking and the decoder; saved with the decoder's weights. MAE's ViT-B default is 8 x 512, 16 heads."""

    mask_ratio: float = 0.75
    decoder_depth: int = 8
    decoder_width: int = 512
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by its own mean and variance

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_depth < 1 or self.decoder_width < 1:
            raise ValueError("decoder_depth and decoder_width must be positive")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"decoder_width {self.decoder_width} is not divisible by decoder_heads {self.decoder_heads}"
            )
        if self.decoder_width % 4:
            raise ValueError(f"decoder_width must be divisible by 4 (2-D sin-cos positions), got {self.decoder_width}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Masking:
    """One batch's masks. `keep` (B, K): indices of the visible patches; `mask` (B, N): 1 where masked;
    `restore` (B, N): the permutation that puts [visible; masked] back into patch order."""

    keep: torch.Tensor
    mask: torch.Tensor
    restore: torch.Tensor


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """How many patches each sample keeps: round(N x (1 - ratio)), at least one."""
    return max(1, round(num_patches * (1.0 - mask_ratio)))


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None, device=None
) -> Masking:
    """Per-sample random masks by argsort of uniform noise (MAE's shuffle), drawn from `generator` on `device`."""
    device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    k = visible_count(num_patches, mask_ratio)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :k] = 0
    return Masking(keep=shuffle[:, :k], mask=mask.gather(1, restore), restore=restore)


def encoder_config(cfg: ViTConfig) -> ViTConfig:
    """The encoder MAE pretrains: the model's own architecture, no head, LayerNorm on every token (the
    class token and patch tokens both come out normalised, so fine-tuning may pool either way)."""
    return replace(cfg, num_classes=0, global_pool="token", fc_norm=False, pre_logits=False)


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: VisionTransformer, cfg: MAEConfig):
        super().__init__()
        self.encoder, self.cfg = encoder, cfg
        e = encoder.cfg
        d = cfg.decoder_width
        self.decoder_embed = nn.Linear(e.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        pos = torch.cat([torch.zeros(1, d), sincos_2d_pos_embed(d, e.grid_size)])[None]
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)  # fixed, as MAE's reference
        dec = ViTConfig(
            img_size=e.img_size,
            patch_size=e.patch_size,
            in_chans=e.in_chans,
            num_classes=0,
            embed_dim=d,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            mlp_ratio=cfg.decoder_mlp_ratio,
        )
        self.decoder_blocks = nn.ModuleList(Block(dec) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, e.patch_dim)
        self._init_decoder()

    @torch.no_grad()
    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("decoder") and isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The decoder's tensors (everything but `encoder.*`), for its own file."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    # ---- the three parts --------------------------------------------------------------------
    def encode(self, x: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Normalised patches (B, N, P*P*C) -> latent (B, 1 + K, D): the class token and the visible patches."""
        enc = self.encoder
        tokens = enc.patch_embed(x.to(enc.patch_embed.proj.weight.dtype)) + enc.pos_embed[:, 1:]
        d = tokens.shape[-1]
        tokens = tokens.gather(1, masking.keep[..., None].expand(-1, -1, d))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        z = enc.pos_drop(torch.cat([cls, tokens], dim=1))
        for blk in enc.blocks:
            z, _ = blk(z)
        return enc.norm(z)

    def decode(self, latent: torch.Tensor, masking: Masking) -> torch.Tensor:
        """Latent (B, 1 + K, D) -> predicted pixels of every patch (B, N, P*P*C)."""
        x = self.decoder_embed(latent)
        b, n = masking.restore.shape
        masked = self.mask_token.to(x.dtype).expand(b, n - (x.shape[1] - 1), -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)  # [visible; masked], then back into patch order
        patches = patches.gather(1, masking.restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x, _ = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder must predict: the normalised patches, each normalised again by its own pixels."""
        if not self.cfg.norm_pix_loss:
            return x
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True)
        return (x - mean) / (var + 1e-6) ** 0.5

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE over the masked patches only, (B,). Every sample has the same number masked, so
        their mean is MAE's loss."""
        per_patch = (pred.float() - self.targets(x.float())).pow(2).mean(dim=-1)
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def forward(
        self, patches: torch.Tensor, generator: torch.Generator | None = None, masking: Masking | None = None
    ) -> torch.Tensor:
        """Patches (B, N, P*P*C), uint8 or normalised float -> per-sample loss (B,)."""
        x = self.encoder.normalize(patches) if patches.dtype == torch.uint8 else patches
        if masking is None:
            masking = random_masking(x.shape[0], x.shape[1], self.cfg.mask_ratio, generator, device=x.device)
        pred = self.decode(self.encode(x, masking), masking)
        return self.loss(x, pred, masking.mask)

    @torch.no_grad()
    def reconstruct(self, patches: torch.Tensor, masking: Masking) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input, reconstruction) as normalised patches (B, N, P*P*C): the visible patches as they
        were, the masked ones predicted (de-normalised by each patch's own statistics with norm_pix_loss)."""
        x = self.encoder.normalize(patches) if patches.dtype == torch.uint8 else patches
        pred = self.decode(self.encode(x, masking), masking).float()
        if self.cfg.norm_pix_loss:
            mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        m = masking.mask[..., None]
        return x * (1 - m), x * (1 - m) + pred * m


DECODER_NAME = "mae_decoder.safetensors"  # beside an exported encoder's model.safetensors + config.json


def create_mae(cfg: ViTConfig, mae: MAEConfig) -> MaskedAutoencoder:
    return MaskedAutoencoder(VisionTransformer(encoder_config(cfg)), mae)


def decoder_bytes(model: MaskedAutoencoder) -> bytes:
    """The decoder's own file: its tensors, and its MAEConfig in the safetensors metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.decoder_state_dict().items()}
    return save(state, metadata={"mae": json.dumps(model.cfg.to_dict()), "format": "pt"})


def mae_from_parts(encoder: VisionTransformer, decoder: bytes) -> MaskedAutoencoder:
    """Rebuild the autoencoder from an exported encoder and its decoder file (figures, continued pretraining)."""
    from safetensors.torch import load

    # safetensors: an 8-byte little-endian header length, then a JSON header holding `__metadata__`
    header = json.loads(decoder[8 : 8 + int.from_bytes(decoder[:8], "little")])
    meta = json.loads(header.get("__metadata__", {}).get("mae", "{}"))
    known = {f.name for f in fields(MAEConfig)}
    model = MaskedAutoencoder(encoder, MAEConfig(**{k: v for k, v in meta.items() if k in known}))
    model.load_state_dict({**model.state_dict(), **load(decoder)}, strict=True)
    return model.eval()


def mae_flops_per_image(cfg: ViTConfig, mae: MAEConfig, training: bool = True) -> float:
    """Matmul FLOPs of one image through the encoder (class token + visible patches) and the decoder (all)."""
    n = cfg.num_patches
    k = visible_count(n, mae.mask_ratio)

    def blocks(t: int, d: int, depth: int, ratio: float) -> float:
        return depth * (2 * t * d * (4 * d + 2 * int(d * ratio)) + 4 * t * t * d)

    enc = 2 * k * cfg.patch_dim * cfg.embed_dim + blocks(k + 1, cfg.embed_dim, cfg.depth, cfg.mlp_ratio)
    dw = mae.decoder_width
    dec = 2 * (k + 1) * cfg.embed_dim * dw + blocks(n + 1, dw, mae.decoder_depth, mae.decoder_mlp_ratio)
    dec += 2 * n * dw * cfg.patch_dim
    return (3.0 if training else 1.0) * (enc + dec)
