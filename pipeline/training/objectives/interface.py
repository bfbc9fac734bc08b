"""What every training objective provides: one small interface the loop, the step, the checkpoints and the
driver call, so that none of them asks which objective a run has.

    check(cfg)                 refuse settings that cannot work with it (ValueError naming the key)
    model_config / build       the plain ViT it trains (preflight checks --init-from against it), the module
    encoder(core)              the plain ViT inside the module (--init-from, k-NN features)
    losses(...)                the loss per sample (B,) float32 of one micro-batch
    flops_per_image(core)      training FLOPs per image (MFU)
    eval_sets / monitor        the labelled splits its end-of-epoch monitor reads, and the monitor itself
    parts(core) / load(...)    what a checkpoint and an export carry: the ViT, files beside it, metadata

`cfg` is the job's `PretrainConfig`; `run` is the loop's `Run` (cfg, session, model, core, amp_dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

import vit_model
from vit_model import VisionTransformer, ViTConfig

Batches = Callable[[str], Iterable]  # name of an eval set -> this rank's (patches, labels, valid) on the device


@dataclass
class Parts:
    """What a checkpoint and an export hold of the trained module."""

    vit: VisionTransformer  # saved as model.safetensors + config.json (timm's layout)
    files: dict[str, bytes] = field(default_factory=dict)  # beside it (an MAE decoder)
    class_names: list[str] | None = None  # None: the run's classes; []: a headless encoder
    metadata: dict = field(default_factory=dict)  # into the export's config.json


class Objective:
    name: ClassVar[str]
    needs_labels: ClassVar[bool] = True  # a shard set without labels is refused before any cluster work
    exports_best: ClassVar[bool] = True  # `{run}/best/` by val top-1

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse settings that cannot work with this objective (called by the config's validator)."""

    def num_classes(self, classes: list[str]) -> int:
        return len(classes) if self.needs_labels else 0

    def model_config(self, num_classes: int) -> ViTConfig:
        return vit_model.variant_config(self.cfg.model.name, **self.cfg.model.overrides(num_classes))

    def build(self, num_classes: int) -> torch.nn.Module:
        raise NotImplementedError

    def encoder(self, core: torch.nn.Module) -> VisionTransformer:
        return core

    def flops_per_image(self, core: torch.nn.Module) -> float:
        return vit_model.flops_per_image(self.encoder(core).cfg, training=True)

    def eval_sets(self, manifest, load_manifest: Callable[[str], object]) -> dict[str, tuple[object, str]]:
        """The splits the monitor reads: {name: (manifest, split)}; ValueError says what is missing."""
        split = self.cfg.data.val_split
        return {split: (manifest, split)} if split else {}

    def losses(self, run, step: int, micro: int, patches, labels, valid) -> torch.Tensor:
        raise NotImplementedError

    def monitor(self, run, epoch: int, last: bool, batches: Batches, model: torch.nn.Module) -> dict:
        """End-of-epoch metrics (`epoch`: epochs completed; `model`: the weights to judge, EMA's when on)."""
        return {}

    def parts(self, core: torch.nn.Module) -> Parts:
        return Parts(self.encoder(core))

    def load(self, core: torch.nn.Module, folder: Path) -> None:
        """Load a checkpoint folder's weights (verified already) into `core`."""
        from safetensors.torch import load_file

        vit_model.load_weights(self.encoder(core), load_file(str(folder / "model.safetensors")))

    def describe(self, metrics: dict) -> list[str]:
        """Parts of the end-of-epoch log line for this objective's monitor metrics."""
        return []

    def evaluation_due(self, epoch: int, last: bool, every: int) -> bool:
        return bool(every) and (last or epoch % every == 0)
