"""Recipe search for small images, without Ray: accuracy against minutes of one model + schedule on this machine.

    PYTHONPATH=. python bench/recipe.py --data ../shared/data/cifar10_dev --config configs/cifar10_vit.yaml \
        [--minutes 12] [--set model.embed_dim=192 optim.lr=2e-3 ...] [--train-limit 1500] [--init-from DIR]

The images go through the project's own preprocessing (`ImageTransform.for_model` with the config's
augmentation) and the project's model, optimizer groups, schedule and loss; what is left out is Ray (one
process, 2 threads), so a scan of several recipes fits in the time of a few pipeline runs. Prints val top-1
after every epoch with the minutes so far; the winning recipe is then run through `jobs/pretrain.py`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

import vit_model
from pipeline.core import exported
from pipeline.data.transforms import Augment, ImageTransform
from pipeline.training.loop import build_model
from pipeline.training.step import lr_at
from pipeline.training.train_config import PretrainConfig


def load_split(root: Path, split: str, limit: int | None) -> tuple[list[bytes], np.ndarray]:
    classes = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
    data, labels = [], []
    for i, c in enumerate(classes):
        files = sorted((root / split / c).iterdir())[: limit // len(classes) if limit else None]
        for f in files:
            data.append(f.read_bytes())
            labels.append(i)
    return data, np.array(labels)


def patches(data: list[bytes], idx: np.ndarray, t: ImageTransform, rng) -> torch.Tensor:
    return torch.from_numpy(np.stack([t(data[i], rng) for i in idx]))


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
    if a.init_from:
        raw.setdefault("train", {})["init_from"] = a.init_from
    cfg = PretrainConfig.model_validate(raw)
    root = Path(a.data)
    train, ytr = load_split(root, "train", a.train_limit)
    val, yva = load_split(root, "val", None)
    model = build_model(cfg, 10)
    if cfg.train.init_from:
        exported.load_init_weights(model, cfg.train.init_from)
    mcfg = model.cfg
    t_train = ImageTransform.for_model(mcfg, True, Augment.of(cfg.data))
    t_val = ImageTransform.for_model(mcfg, False)
    opt = torch.optim.AdamW(
        vit_model.param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
    )
    bs = cfg.train.batch_size
    steps_per_epoch = len(train) // bs
    total = steps_per_epoch * cfg.train.epochs
    warmup = (
        cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(cfg.optim.warmup_epochs * steps_per_epoch)
    )
    rng = np.random.default_rng(cfg.train.seed)
    x_val = patches(val, np.arange(len(val)), t_val, None)
    print(
        f"{vit_model.count_parameters(model) / 1e6:.2f}M params, {len(train)} train, "
        f"{steps_per_epoch} steps/epoch, lr {cfg.optim.lr:.2e}"
    )
    t0, step = time.perf_counter(), 0
    for epoch in range(cfg.train.epochs):
        model.train()
        order = rng.permutation(len(train))
        for i in range(steps_per_epoch):
            lr = lr_at(step, total, warmup, cfg.optim.lr, cfg.optim.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            idx = order[i * bs : (i + 1) * bs]
            x = patches(train, idx, t_train, rng)
            loss = F.cross_entropy(model(x), torch.from_numpy(ytr[idx]), label_smoothing=cfg.optim.label_smoothing)
            loss.backward()
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(x_val[j : j + 500]).argmax(-1) for j in range(0, len(x_val), 500)])
        acc = (pred.numpy() == yva).mean()
        minutes = (time.perf_counter() - t0) / 60
        print(f"epoch {epoch + 1} val top-1 {acc * 100:.2f}% at {minutes:.2f} min (loss {loss.item():.3f})", flush=True)
        if a.minutes and minutes >= a.minutes or math.isnan(loss.item()):
            break


if __name__ == "__main__":
    main()
