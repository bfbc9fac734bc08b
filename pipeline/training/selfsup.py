"""Masked-autoencoder pretraining (`train.objective: mae`): what the loop does differently from supervised.

    masks        drawn on the device from a generator of this rank's own, seeded by (seed, rank, step,
                 micro-batch): every sample and every rank gets other masks, and a resumed run the same ones
    loss         `MaskedAutoencoder` returns MSE per sample on its masked patches; undecodable samples
                 are left out as in the supervised step
    monitor      every `mae.knn_every_epochs`: the reconstruction loss on the val split (fixed masks) and a
                 k-NN top-1 (DINO's weighted vote, cosine, k = `mae.knn_k`) of the encoder's features of
                 the unmasked images: a labelled bank (`knn_bank`) against labelled queries (`knn_query`)
    export       the encoder as a plain ViT (timm layout, no head) + `mae_decoder.safetensors` beside it

The kNN datasets are named `KNN_BANK` and `KNN_QUERY` in the session (Ray Train datasets, split across
workers like the others); every rank computes its part of the bank and gathers the rest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.training.sessions import Batches

KNN_BANK, KNN_QUERY = "knn_bank", "knn_query"
_MASK_STREAM = 0x4D41_45  # keeps mask seeds apart from the augmentation seeds of the same step
_EVAL_STREAM = 0x4D41_46
KNN_TEMPERATURE = 0.07  # DINO's


def mask_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator one micro-batch's masks come from: on the device, its seed a pure function of
    (seed, rank, step, micro) (integers only: Python hashes them the same in every process)."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, rank, step, micro, _MASK_STREAM)) & (2**63 - 1))
    return g


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
def knn_top1(run, epoch: int, k: int) -> dict:
    """k-NN top-1 of the encoder over the `knn_query` rows against the `knn_bank` rows, exact across workers."""
    s, micro = run.session, run.cfg.train.micro_batch
    encoder = run.core.encoder  # the plain module: no DDP needed without gradients
    encoder.eval()
    feats, labels = [], []
    for patches, y, valid in Batches(s.batches(KNN_BANK, micro, epoch, False), s.device):
        feats.append(features(encoder, patches, run.amp_dtype)[valid])
        labels.append(y[valid])
    bank = gather_rows(
        torch.cat(feats) if feats else torch.zeros(0, encoder.cfg.embed_dim, device=s.device), s.world_size
    )
    bank_labels = gather_rows(
        torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=s.device), s.world_size
    )
    sums = torch.zeros(2, dtype=torch.float64, device=s.device)
    num_classes = int(bank_labels.max().item()) + 1 if len(bank_labels) else 1
    for patches, y, valid in Batches(s.batches(KNN_QUERY, micro, epoch, False), s.device):
        if not len(bank):
            break
        pred = knn_votes(bank, bank_labels, features(encoder, patches, run.amp_dtype), k, num_classes)
        sums += torch.stack([((pred == y) & valid).sum().double(), valid.sum().double()])
    if s.world_size > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    encoder.train()
    hits, n = sums.tolist()
    return {"knn_top1": hits / max(n, 1), "knn_count": int(n), "knn_bank": int(len(bank))}


@torch.no_grad()
def reconstruction_loss(run, epoch: int) -> dict:
    """The MAE loss on the val split with masks fixed by (seed, rank, batch index): comparable across epochs."""
    s = run.session
    model = run.core
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=s.device)
    split = run.cfg.data.val_split
    for i, (patches, _, valid) in enumerate(
        Batches(s.batches(split, run.cfg.train.micro_batch, epoch, False), s.device)
    ):
        gen = torch.Generator(device=s.device)
        gen.manual_seed(hash((run.cfg.train.seed, s.rank, i, _EVAL_STREAM)) & (2**63 - 1))
        with torch.autocast(s.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            per_sample = model(patches, gen)
        sums += torch.stack([(per_sample.double() * valid).sum(), valid.sum().double()])
    if s.world_size > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    loss, n = sums.tolist()
    return {"val_loss": loss / max(n, 1), "val_count": int(n)}


def evaluate(run, epoch: int, last: bool) -> dict:
    """The end-of-epoch monitor of an MAE run (`epoch`: epochs completed; `last`: the run's final epoch)."""
    m, mae = {}, run.cfg.mae
    if run.cfg.data.val_split and (last or epoch % run.cfg.train.eval_every_epochs == 0):
        m.update(reconstruction_loss(run, epoch))
    if run.knn and mae.knn_every_epochs and (last or epoch % mae.knn_every_epochs == 0):
        m.update(knn_top1(run, epoch, mae.knn_k))
    return m
