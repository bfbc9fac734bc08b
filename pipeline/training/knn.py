"""The k-NN monitor: how good an encoder's features are without training a head (DINO's weighted vote).

    features     the mean of the encoder's normalised patch tokens of unmasked images, L2-normalised
    bank         the features of a labelled split (`KNN_BANK`), every rank its part, gathered on every rank
    queries      another labelled split (`KNN_QUERY`): each of the k most similar bank rows votes
                 exp(cos / 0.07) for its class; top-1 summed exactly across workers

Any objective's monitor may use it (MAE's does, `objectives.masked_image`); it reads its splits through
the callable it is given (the loop's `eval_batches`: the same reader as training), never a session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

KNN_BANK, KNN_QUERY = "knn_bank", "knn_query"
KNN_TEMPERATURE = 0.07  # DINO's


def gather_rows(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ) on every rank."""
    if world_size == 1 or not dist.is_initialized():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(n) for _ in range(world_size)]
    dist.all_gather(counts, n)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def features(encoder, patches: torch.Tensor, amp_dtype) -> torch.Tensor:
    """The k-NN feature of unmasked images: the mean of the encoder's normalised patch tokens, L2-normalised."""
    with torch.autocast(patches.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        tokens = encoder.forward_tokens(patches)[0]
    return F.normalize(tokens[:, 1:].float().mean(dim=1), dim=-1)


def knn_votes(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int, num_classes: int
) -> torch.Tensor:
    """DINO's weighted k-NN: each of the k most similar bank rows votes exp(cos / 0.07) for its class.
    Returns the predicted class per query (B,)."""
    sim = queries @ bank.T
    top, idx = sim.topk(min(k, bank.shape[0]), dim=1)
    weights = (top / KNN_TEMPERATURE).exp()
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device, dtype=weights.dtype)
    votes.scatter_add_(1, bank_labels[idx], weights)
    return votes.argmax(dim=1)


@torch.no_grad()
def knn_top1(encoder, batches: Callable[[str], Iterable], k: int, amp_dtype, world_size: int, device) -> dict:
    """k-NN top-1 of `encoder` (a plain ViT) over the `KNN_QUERY` rows against the `KNN_BANK` rows, exact across
    workers; `batches(name)` yields this rank's (patches, labels, valid) of that split on the device."""
    encoder.eval()
    feats, labels = [], []
    for patches, y, valid in batches(KNN_BANK):
        feats.append(features(encoder, patches, amp_dtype)[valid])
        labels.append(y[valid])
    bank = gather_rows(torch.cat(feats) if feats else torch.zeros(0, encoder.cfg.embed_dim, device=device), world_size)
    bank_labels = gather_rows(
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device), world_size
    )
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    num_classes = int(bank_labels.max().item()) + 1 if len(bank_labels) else 1
    for patches, y, valid in batches(KNN_QUERY):
        if not len(bank):
            break
        pred = knn_votes(bank, bank_labels, features(encoder, patches, amp_dtype), k, num_classes)
        sums += torch.stack([((pred == y) & valid).sum().double(), valid.sum().double()])
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    encoder.train()
    hits, n = sums.tolist()
    return {"knn_top1": hits / max(n, 1), "knn_count": int(n), "knn_bank": int(len(bank))}
