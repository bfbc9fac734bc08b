"""The training objectives, one module each behind `interface.Objective`.

- `supervised`: cross-entropy on labels (soft targets under Mixup/CutMix), val top-1/top-5, `{run}/best/`.
- `masked_image`: MAE pretraining (its `mae` config section, per-rank masks, the reconstruction loss, the
  k-NN monitor, the decoder beside the encoder in checkpoints and exports).
An objective owns its config checks, the module it trains, the loss per sample, FLOPs per image, the
end-of-epoch monitor and the splits it reads, and what checkpoints and exports carry. Nothing outside this
folder branches on which objective a run has (tests/test_layout.py). Adding one: a module here with a
subclass of `Objective`, its config section (if any) in `PretrainConfig`, and its name in `OBJECTIVES`.
These modules import `pipeline.core`, `pipeline.training.mixing`, `pipeline.training.knn` and `vit_model`.
"""

from __future__ import annotations

from pipeline.training.objectives.interface import Objective, Parts
from pipeline.training.objectives.masked_image import MaeSection, MaskedImage
from pipeline.training.objectives.supervised import Supervised

OBJECTIVES: dict[str, type[Objective]] = {c.name: c for c in (Supervised, MaskedImage)}


def objective_for(cfg) -> Objective:
    """A fresh objective for the run of `cfg` (a `PretrainConfig`): one per run, it holds the run's mixer."""
    return OBJECTIVES[cfg.train.objective](cfg)


__all__ = ["OBJECTIVES", "MaeSection", "Objective", "Parts", "objective_for"]
