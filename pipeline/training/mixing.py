"""Batch augmentations of the DeiT recipe, on the device inside the train step (plain PyTorch, no Ray):

  random erasing (Zhong et al. 2020; timm's RandomErasing, mode "pixel"): per image with probability p,
      one box of area 2-33% of the image and aspect ratio in [0.3, 3.3] filled with N(0, 1) noise in
      the normalised space;
  Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) as timm's `Mixup(mode="batch")`: one lambda
      per batch from Beta(alpha, alpha), the batch mixed with itself reversed, CutMix chosen with
      `switch_prob` when both are on, lambda corrected to the pasted box's true area, targets
      label-smoothed one-hots mixed with the same lambda (loss: soft-target cross-entropy).

All three work on what the model takes: normalised float patches (B, N, P*P*C) of a square grid, in
`vit_model.patchify`'s order. A box of the image is a fixed set of (token, column) places in that
layout (`box_index`), so erasing and pasting touch those places directly: the batch is never turned
back into images and cut into patches again. The pixels that change are exactly those an image-space
implementation changes (tests compare the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def grid_of(patches: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """(grid side G, image side G*P in pixels) of square-grid patches (B, N, P*P*C)."""
    g = math.isqrt(patches.shape[1])
    if g * g != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patches are not a square grid")
    return g, g * patch_size


def box_index(
    box: tuple[int, int, int, int], patch_size: int, in_chans: int, grid: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the pixels of the image box (top, bottom, left, right) lie in (N, P*P*C) patches.

    Returns (token, column) int64 index tensors of C*h*w entries in (channel, row, col) order, so that
    `patches[i, token, column] = noise.flatten()` writes a (C, h, w) block at the box.
    """
    top, bottom, left, right = box
    p = patch_size
    c, y, x = torch.meshgrid(
        torch.arange(in_chans, device=device),
        torch.arange(top, bottom, device=device),
        torch.arange(left, right, device=device),
        indexing="ij",
    )
    token = (y // p) * grid + x // p
    column = ((y % p) * p + x % p) * in_chans + c
    return token.flatten(), column.flatten()


def random_erase_(
    patches: torch.Tensor,
    prob: float,
    generator: torch.Generator | None = None,
    *,
    patch_size: int,
    in_chans: int = 3,
    scale=(0.02, 1 / 3),
    ratio=(0.3, 1 / 0.3),
    attempts: int = 10,
) -> torch.Tensor:
    """In place on normalised patches (B, N, P*P*C); returns the (B,) bool mask of erased images."""
    b, c = patches.shape[0], in_chans
    grid, h = grid_of(patches, patch_size)
    w = h
    erased = torch.zeros(b, dtype=torch.bool)
    draws = torch.rand(b, generator=generator)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(b):
        if draws[i] >= prob:
            continue
        for _ in range(attempts):
            u = torch.rand(3, generator=generator).tolist()
            area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                top = int(torch.randint(0, h - eh + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - ew + 1, (1,), generator=generator))
                noise = torch.randn((c, eh, ew), generator=generator).to(patches.device, patches.dtype)
                token, column = box_index((top, top + eh, left, left + ew), patch_size, c, grid, patches.device)
                patches[i, token, column] = noise.flatten()
                erased[i] = True
                break
    return erased


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1 - smoothing + off
    )


def cutmix_box(h: int, w: int, lam: float, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of about (1 - lam) of the image, centred uniformly, clipped."""
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(0, h, (1,), generator=generator))
    cx = int(torch.randint(0, w, (1,), generator=generator))
    return (
        min(max(cy - ch // 2, 0), h),
        min(max(cy + ch // 2, 0), h),
        min(max(cx - cw // 2, 0), w),
        min(max(cx + cw // 2, 0), w),
    )


@dataclass
class MixResult:
    patches: torch.Tensor  # (B, N, P*P*C) normalised
    targets: torch.Tensor  # (B, num_classes) soft targets, each row sums to one
    lam: float
    kind: str  # "mixup", "cutmix" or "none"


@dataclass(frozen=True)
class Mixer:
    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def _draw(self, generator: torch.Generator | None) -> tuple[float, str]:
        u = torch.rand(2, generator=generator).tolist()
        if not self.active or u[0] >= self.prob:
            return 1.0, "none"
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            kind = "cutmix" if u[1] < self.switch_prob else "mixup"
        else:
            kind = "cutmix" if self.cutmix_alpha > 0 else "mixup"
        alpha = self.cutmix_alpha if kind == "cutmix" else self.mixup_alpha
        # Beta(a, a) from two Gammas, drawn with the same generator (reproducible per step)
        g1 = torch._standard_gamma(torch.tensor([alpha], dtype=torch.float64), generator=generator)
        g2 = torch._standard_gamma(torch.tensor([alpha], dtype=torch.float64), generator=generator)
        return float(g1 / (g1 + g2)), kind

    def __call__(
        self,
        patches: torch.Tensor,
        labels: torch.Tensor,
        valid: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        patch_size: int,
        in_chans: int = 3,
    ) -> MixResult:
        """Mix normalised patches (B, N, P*P*C) with the batch reversed. A row whose partner is an invalid
        sample (undecodable, masked out of the loss) keeps its own image and label."""
        b = len(labels)
        idx = torch.arange(b, device=labels.device)
        partner = idx.flip(0)
        if valid is not None:
            partner = torch.where(valid[partner], partner, idx)
        targets = one_hot_smoothed(labels, self.num_classes, self.smoothing)
        lam, kind = self._draw(generator)
        if kind == "none":
            return MixResult(patches, targets, 1.0, kind)
        if kind == "mixup":
            patches = patches.mul(lam).add_(patches[partner].mul(1 - lam))
        else:
            grid, side = grid_of(patches, patch_size)
            top, bottom, left, right = cutmix_box(side, side, lam, generator)
            token, column = box_index((top, bottom, left, right), patch_size, in_chans, grid, patches.device)
            pasted = patches[partner][:, token, column]
            patches = patches.clone()
            patches[:, token, column] = pasted
            lam = 1 - (bottom - top) * (right - left) / (side * side)
        return MixResult(patches, targets * lam + targets[partner] * (1 - lam), lam, kind)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against soft targets (B,)."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
