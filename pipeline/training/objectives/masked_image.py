"""Masked-autoencoder pretraining (`train.objective: mae`, He et al. 2021): the `mae` config section and
what the loop does for it.

    masks        drawn on the device from a generator of this rank's own, seeded by (seed, rank, step,
                 micro-batch): every sample and every rank gets other masks, and a resumed run the same ones
    loss         `MaskedAutoencoder` returns MSE per sample on its masked patches
    monitor      the reconstruction loss on the val split (fixed masks) every `train.eval_every_epochs`, and
                 every `mae.knn_every_epochs` a k-NN top-1 of the encoder's features (`knn`) of a labelled
                 set: its train split the bank, its val split the queries
    checkpoint   the encoder as model.safetensors, the decoder in `mae_decoder.safetensors`
    export       the encoder as a plain ViT (timm layout, no head) + the decoder file beside it
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import Field

from pipeline.core.config import Section
from pipeline.training.knn import KNN_BANK, KNN_QUERY, knn_top1
from pipeline.training.objectives.interface import Batches, Objective, Parts
from vit_model.mae import (
    DECODER_NAME,
    MAEConfig,
    MaskedAutoencoder,
    create_mae,
    decoder_bytes,
    encoder_config,
    mae_flops_per_image,
)

_MASK_STREAM = 0x4D41_45  # keeps mask seeds apart from the augmentation seeds of the same step
_EVAL_STREAM = 0x4D41_46


class MaeSection(Section):
    """Masked-autoencoder pretraining (train.objective: mae): He et al. 2021's masking, decoder and loss."""

    mask_ratio: float = Field(0.75, ge=0, lt=1, description="fraction of patches masked per sample")
    decoder_depth: int = Field(8, ge=1, description="decoder blocks (MAE's ViT-B: 8)")
    decoder_width: int = Field(512, ge=4, description="decoder width (MAE's ViT-B: 512)")
    decoder_heads: int = Field(16, ge=1, description="decoder attention heads")
    norm_pix_loss: bool = Field(True, description="targets are per-patch normalised pixels (MAE's default)")
    knn_data: str | None = Field(
        None,
        description="labelled shard set for the k-NN monitor: its train split is the bank, its val split the "
        "queries (default: the training set itself when it has labels and a val split)",
    )
    knn_k: int = Field(20, ge=1, description="neighbours for the k-NN monitor (DINO's weighted vote)")
    knn_every_epochs: int = Field(1, ge=0, description="run the k-NN monitor every N epochs (0: never)")

    def autoencoder(self) -> MAEConfig:
        return MAEConfig(
            mask_ratio=self.mask_ratio,
            decoder_depth=self.decoder_depth,
            decoder_width=self.decoder_width,
            decoder_heads=self.decoder_heads,
            norm_pix_loss=self.norm_pix_loss,
        )


def mask_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator one micro-batch's masks come from: on the device, its seed a pure function of
    (seed, rank, step, micro) (integers only: Python hashes them the same in every process)."""
    g = torch.Generator(device=device)
    g.manual_seed(hash((seed, rank, step, micro, _MASK_STREAM)) & (2**63 - 1))
    return g


class MaskedImage(Objective):
    name = "mae"
    needs_labels = False
    exports_best = False

    @classmethod
    def check(cls, cfg) -> None:
        d = cfg.data
        on = [k for k, v in {"data.mixup_alpha": d.mixup_alpha, "data.cutmix_alpha": d.cutmix_alpha,
                             "data.random_erase": d.random_erase}.items() if v]  # fmt: skip
        if on:
            raise ValueError(
                f"train.objective mae reconstructs pixels: {', '.join(on)} would corrupt its targets; set "
                "them to 0 (MAE's augmentation is a random resized crop and a flip)"
            )
        if cfg.optim.layer_decay is not None:
            raise ValueError("optim.layer_decay is for fine-tuning; MAE pretraining uses one lr for every layer")
        cfg.mae.autoencoder()  # decoder width/heads checked here, before any cluster work

    def model_config(self, num_classes):
        return encoder_config(super().model_config(0))

    def build(self, num_classes):
        return create_mae(super().model_config(0), self.cfg.mae.autoencoder())

    def encoder(self, core: MaskedAutoencoder):
        return core.encoder

    def flops_per_image(self, core):
        """MAE's encoder sees the visible tokens only, its decoder all of them."""
        return mae_flops_per_image(core.encoder.cfg, core.cfg, training=True)

    def eval_sets(self, manifest, load_manifest):
        sets = super().eval_sets(manifest, load_manifest)
        mae = self.cfg.mae
        if not mae.knn_every_epochs:
            return sets
        knn = manifest if not mae.knn_data else load_manifest(mae.knn_data)
        usable = knn.labeled and knn.count("train") and knn.count("val")
        if not usable and not mae.knn_data:
            return sets  # the training set has no labels or no val split: no k-NN monitor
        if not usable:
            raise ValueError(
                f"mae.knn_data {mae.knn_data} needs labels and both a train split (the bank) and a val split (the "
                f"queries); it has {knn.count('train')} train and {knn.count('val')} val samples"
                + ("" if knn.labeled else " and no labels")
            )
        return {**sets, KNN_BANK: (knn, "train"), KNN_QUERY: (knn, "val")}

    def losses(self, run, step, micro, patches, labels, valid):
        gen = mask_generator(self.cfg.train.seed, run.session.rank, step, micro, run.session.device)
        return run.model(patches, gen).float()

    def monitor(self, run, epoch, last, batches: Batches, model):
        m, t, s = {}, self.cfg.train, run.session
        if self.cfg.data.val_split and self.evaluation_due(epoch, last, t.eval_every_epochs):
            m.update(self.reconstruction_loss(model, batches(self.cfg.data.val_split), run.amp_dtype, s))
        if KNN_BANK in s.eval_sets and self.evaluation_due(epoch, last, self.cfg.mae.knn_every_epochs):
            m.update(knn_top1(model.encoder, batches, self.cfg.mae.knn_k, run.amp_dtype, s.world_size, s.device))
        return m

    @torch.no_grad()
    def reconstruction_loss(self, model: MaskedAutoencoder, batches, amp_dtype, session) -> dict:
        """The MAE loss on the val split with masks fixed by (seed, rank, batch index): comparable across epochs."""
        model.eval()
        device = session.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for i, (patches, _, valid) in enumerate(batches):
            gen = torch.Generator(device=device)
            gen.manual_seed(hash((self.cfg.train.seed, session.rank, i, _EVAL_STREAM)) & (2**63 - 1))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                per_sample = model(patches, gen)
            sums += torch.stack([(per_sample.double() * valid).sum(), valid.sum().double()])
        if session.world_size > 1 and dist.is_initialized():
            dist.all_reduce(sums)
        model.train()
        loss, n = sums.tolist()
        return {"val_loss": loss / max(n, 1), "val_count": int(n)}

    def parts(self, core):
        note = (
            "MAE encoder (He et al. 2021): no head; fine-tune with --init-from (a new head is added), "
            f"reconstruction decoder in {DECODER_NAME}"
        )
        pretraining = {"objective": "mae", "mae": core.cfg.to_dict(), "data": self.cfg.data.manifest, "note": note}
        return Parts(core.encoder, {DECODER_NAME: decoder_bytes(core)}, [], {"pretraining": pretraining})

    def load(self, core, folder):
        from safetensors.torch import load_file

        from pipeline.training.checkpoints import CheckpointError

        if not (folder / DECODER_NAME).is_file():
            raise CheckpointError(f"no {DECODER_NAME}: a checkpoint of a supervised run, and this run is MAE")
        super().load(core, folder)
        core.load_state_dict({**core.state_dict(), **load_file(str(folder / DECODER_NAME))}, strict=True)

    def describe(self, m):
        out = []
        if "val_loss" in m:
            out.append(f"val reconstruction loss {m['val_loss']:.4f} ({m['val_count']} images)")
        if "knn_top1" in m:
            out.append(f"k-NN top-1 {m['knn_top1'] * 100:.2f}% ({m['knn_count']} queries, {m['knn_bank']} in the bank)")
        return out
