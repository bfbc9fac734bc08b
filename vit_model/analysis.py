"""What a trained ViT learned, as arrays (the paper's Figure 7 and attention maps). Pure torch/numpy.

embedding_filters       principal components of the patch-embedding weights   (Fig. 7 left)
pos_embed_similarity    cosine similarity between position embeddings          (Fig. 7 centre)
mean_attention_distance attention-weighted query-key distance per layer/head  (Fig. 7 right)
attention_rollout       attention flow from the class token to the patches (Abnar & Zuidema 2020)
"""

from __future__ import annotations

import numpy as np
import torch

from .vit import VisionTransformer


def embedding_filters(model: VisionTransformer, k: int = 28) -> np.ndarray:
    """(k, P, P, C) top principal components of the patch-embedding weights, each scaled to [0, 1]."""
    w = model.patch_embed.linear_weight().detach().float()  # (D, P*P*C), rows are filters
    w = w - w.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(w, full_matrices=False)
    p, c = model.cfg.patch_size, model.cfg.in_chans
    comps = vh[:k].reshape(-1, p, p, c).numpy()
    lo = comps.min(axis=(1, 2, 3), keepdims=True)
    hi = comps.max(axis=(1, 2, 3), keepdims=True)
    return (comps - lo) / np.maximum(hi - lo, 1e-12)


def pos_embed_similarity(model_or_pos: VisionTransformer | torch.Tensor) -> np.ndarray:
    """(g, g, g, g): [r, c] is the cosine similarity of patch (r, c)'s embedding with every patch's."""
    pos = model_or_pos.pos_embed if isinstance(model_or_pos, VisionTransformer) else model_or_pos
    pos = pos.detach().float().reshape(-1, pos.shape[-1])[1:]  # drop the class slot
    g = int(round(pos.shape[0] ** 0.5))
    pos = torch.nn.functional.normalize(pos, dim=-1)
    return (pos @ pos.T).reshape(g, g, g, g).numpy()


def grid_structure_score(sim: np.ndarray) -> dict:
    """Mean similarity of grid neighbours (same row or column, one step apart) against all other pairs.

    `score` = (neighbours - other) / (1 - other): 0 when position carries no grid information
    (random embeddings), towards 1 when neighbours are near-identical and distant pairs are not.
    Normalised because some embeddings (sin-cos) share a large common component.
    """
    g = sim.shape[0]
    r, c = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    r, c = r.ravel(), c.ravel()
    flat = sim.reshape(g * g, g * g)
    neighbours = np.abs(r[:, None] - r[None, :]) + np.abs(c[:, None] - c[None, :]) == 1
    other = ~neighbours & ~np.eye(g * g, dtype=bool)
    a, b = float(flat[neighbours].mean()), float(flat[other].mean())
    return {"neighbours": a, "other": b, "score": (a - b) / max(1.0 - b, 1e-6)}


def patch_distances(grid: int, patch_size: int) -> np.ndarray:
    """(N, N) Euclidean distance in pixels between patch centres of a grid x grid layout."""
    r, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    xy = np.stack([r.ravel(), c.ravel()], 1).astype(np.float64) * patch_size
    return np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))


def mean_attention_distance(attn: np.ndarray | torch.Tensor, patch_size: int) -> np.ndarray:
    """Attention-weighted mean query-key distance in pixels, per layer and head.

    attn: (L, H, 1+N, 1+N) attention probabilities (averaged over images or for one image), or
    (L, B, H, 1+N, 1+N). Patch queries only; attention renormalised over patch keys.
    Returns (L, H).
    """
    a = torch.as_tensor(attn).double()
    if a.ndim == 5:
        a = a.mean(1)
    a = a[..., 1:, 1:]
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    n = a.shape[-1]
    d = torch.from_numpy(patch_distances(int(round(n**0.5)), patch_size))
    return (a * d).sum(-1).mean(-1).numpy()


def attention_rollout(attns: list[torch.Tensor] | torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Rollout over layers: A_l = residual*I + (1-residual)*mean_heads(attn_l), rows renormalised,
    multiplied from the first layer to the last. attns: per layer (B, H, T, T). Returns (B, T, T)."""
    result = None
    for a in attns:
        a = a.float().mean(1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype)
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


@torch.no_grad()
def collect_attention(model: VisionTransformer, patches: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer attention (B, H, T, T) via the model's explicit-attention path."""
    model.eval()
    return model.forward_with_attention(patches)[1]
