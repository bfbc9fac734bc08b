"""Recipe search for small images, without Ray: accuracy against minutes of one config on this machine.

    PYTHONPATH=. python bench/recipe.py --data ../shared/data/cifar10_dev --config configs/cifar10_vit.yaml \
        [--minutes 12] [--set model.embed_dim=192 optim.lr=2e-3 ...] [--train-limit 1500] [--init-from DIR]

It runs the training loop every job runs (`loop.train` with a `LocalSession`): the config's objective,
augmentation, Mixup/CutMix, EMA, accumulation, schedule and monitor, with the images decoded in this process
by the project's preprocessing (`ImageTransform.for_model`). What is left out is Ray (one process, 2
threads), so a scan of several recipes fits in the time of a few pipeline runs. Prints the val metrics after
every epoch with the minutes so far; the winning recipe is then run through `jobs/pretrain.py`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.data.transforms import Augment, ImageTransform
from pipeline.training.loop import train
from pipeline.training.objectives import objective_for
from pipeline.training.sessions import LocalSession
from pipeline.training.train_config import PretrainConfig


class OutOfMinutes(Exception):
    """--minutes passed at an epoch's start: the recipe has had its time."""


def load_split(root: Path, split: str, limit: int | None) -> tuple[list[bytes], np.ndarray]:
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    data, labels = [], []
    for i, c in enumerate(classes):
        files = sorted((root / split / c).iterdir())[: limit // len(classes) if limit else None]
        for f in files:
            data.append(f.read_bytes())
            labels.append(i)
    return data, np.array(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", nargs="*", default=[], help="dotted overrides, e.g. optim.lr=2e-3")
    ap.add_argument("--minutes", type=float, default=None, help="stop after the epoch that passes this")
    ap.add_argument("--train-limit", type=int, default=None, help="labelled train images (per class: limit/10)")
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    raw = yaml.safe_load(Path(a.config).read_text())
    for kv in a.set:
        key, value = kv.split("=", 1)
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    raw.setdefault("train", {}).update(output=None, report_every_s=1e9, checkpoint_every_steps=None)
    if a.init_from:
        raw["train"]["init_from"] = a.init_from
    cfg = PretrainConfig.model_validate(raw)
    root = Path(a.data)
    splits = {
        "train": load_split(root, "train", a.train_limit),
        cfg.data.val_split or "val": load_split(root, "val", None),
    }
    mcfg = objective_for(cfg).model_config(10)
    transforms = {
        True: ImageTransform.for_model(mcfg, True, Augment.of(cfg.data)),
        False: ImageTransform.for_model(mcfg, False),
    }
    rng = np.random.default_rng(cfg.train.seed)
    t0 = time.perf_counter()

    def batches(split: str, bs: int, epoch: int, is_train: bool):
        if is_train and epoch and a.minutes and (time.perf_counter() - t0) / 60 >= a.minutes:
            raise OutOfMinutes
        data, labels = splits[split]
        t = transforms[is_train]
        idx = rng.permutation(len(data)) if is_train else np.arange(len(data))
        if is_train:  # exactly the epoch's steps, as the loop asserts
            idx = idx[: len(data) // cfg.train.batch_size * cfg.train.batch_size]
        for i in range(0, len(idx), bs):
            part = idx[i : i + bs]
            yield {
                "patches": np.stack([t(data[j], rng) for j in part]),
                "label": labels[part].astype(np.int64),
                "valid": np.ones(len(part), bool),
            }

    class Printing(LocalSession):
        def report(self, metrics, checkpoint_dir):
            if "epoch_s" in metrics:  # an epoch's end: the loop printed its metrics; the minutes so far
                print(f"  epoch {metrics['epoch']} ended at {(time.perf_counter() - t0) / 60:.2f} min", flush=True)
            super().report(metrics, checkpoint_dir)

    n_train = len(splits["train"][0])
    print(f"{n_train} train images, {n_train // cfg.train.batch_size} steps/epoch, lr {cfg.optim.lr:.2e}")
    try:
        train(cfg, Printing(batches, None, device=torch.device("cpu")), num_classes=10, train_count=n_train)
    except OutOfMinutes:
        print(f"stopped: {a.minutes} min passed")


if __name__ == "__main__":
    main()
