"""Supervised training (`train.objective: supervised`): cross-entropy on the labels, val top-1/top-5.

losses     random erasing, then Mixup / CutMix on the patches (soft targets), on the device; the draws
           from a generator seeded by (seed, rank, step, micro-batch), so a resumed run repeats them
monitor    top-1, top-5 and loss on the val split every `train.eval_every_epochs`, exact across workers
export     the classifier with its class names; `{run}/best/` by val top-1
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import vit_model
from pipeline.training.mixing import Mixer, random_erase_, soft_target_cross_entropy
from pipeline.training.objectives.interface import Batches, Objective


class Supervised(Objective):
    name = "supervised"

    def build(self, num_classes: int) -> torch.nn.Module:
        d, o = self.cfg.data, self.cfg.optim
        mixer = Mixer(num_classes, d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.mix_switch_prob, o.label_smoothing)
        self.mixer = mixer if mixer.active else None
        return vit_model.create_model(self.cfg.model.name, **self.cfg.model.overrides(num_classes))

    def augment(self, core, rank: int, step: int, micro: int, patches, labels, valid):
        """Random erasing, then Mixup / CutMix, on the device: (model input, soft targets or None).

        Without either, the uint8 patches go to the model as they are (it normalises them itself); with
        one, they are normalised here and mixed as patches (B, N, P*P*C), which the model takes as they are."""
        d = self.cfg.data
        if not (d.random_erase > 0 or self.mixer is not None):
            return patches, None
        gen = torch.Generator().manual_seed(hash((self.cfg.train.seed, rank, step, micro)) & (2**63 - 1))
        layout = {"patch_size": core.cfg.patch_size, "in_chans": core.cfg.in_chans}
        x = core.normalize(patches)
        if d.random_erase > 0:
            random_erase_(x, d.random_erase, gen, **layout)
        if self.mixer is None:
            return x, None
        mixed = self.mixer(x, labels, valid, gen, **layout)
        return mixed.patches, mixed.targets

    def losses(self, run, step, micro, patches, labels, valid):
        inputs, soft_targets = self.augment(run.core, run.session.rank, step, micro, patches, labels, valid)
        logits = run.model(inputs).float()
        if soft_targets is not None:
            return soft_target_cross_entropy(logits, soft_targets)
        return F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.cfg.optim.label_smoothing)

    def monitor(self, run, epoch, last, batches: Batches, model):
        split = self.cfg.data.val_split
        if not split or not self.evaluation_due(epoch, last, self.cfg.train.eval_every_epochs):
            return {}
        return evaluate(model, batches(split), run.amp_dtype, run.session.world_size, run.session.device)

    def describe(self, m):
        if "val_top1" not in m:
            return []
        return [
            f"val top-1 {m['val_top1'] * 100:.2f}% top-5 {m['val_top5'] * 100:.2f}% loss {m['val_loss']:.4f} "
            f"({m['val_count']} images)"
        ]


@torch.no_grad()
def evaluate(model, batches, amp_dtype, world_size: int, device: torch.device) -> dict:
    """Top-1, top-5 and loss over this worker's part, summed across workers (exact, not averaged)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for patches, labels, valid in batches:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(patches).float()
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        v = valid.double()
        sums += torch.stack(
            [
                (F.cross_entropy(logits, labels, reduction="none").double() * v).sum(),
                (hit[:, 0].double() * v).sum(),
                (hit.any(-1).double() * v).sum(),
                v.sum(),
            ]
        )
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    model.train()
    return {
        "val_loss": loss / max(n, 1),
        "val_top1": top1 / max(n, 1),
        "val_top5": top5 / max(n, 1),
        "val_count": int(n),
    }
