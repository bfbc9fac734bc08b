"""Shard-time resizing (`make_shards --max-side`): what storing images at training size saves every epoch.

The hymenoptera photos (../shared/data) upscaled to 2000 px on their longer side, sharded twice from the
same folders: (a) as they came, (b) with `--max-side 256`. Then, from each set's own shards:
  - the training transform (decode + random-resized-crop 224 + flip + patchify) in images per CPU-second
    of one core, interleaved chunks (bench/data.py's `rates`), as the stream's tasks run it;
  - a short supervised run (the same seed, model and steps) on each, and its val top-1: resizing at shard
    time should cost no accuracy beyond noise (a 224 px crop of a 256 px image against one of 2000 px).
No Ray and no S3 server: make_shards' local executor into a temporary folder, removed at the end.
  python bench/resize.py [--epochs 6] [--side 2000]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from data import rates
from PIL import Image

from pipeline.data import shard_writer
from pipeline.data.shard_reader import read_shard
from pipeline.data.transforms import ImageTransform
from pipeline.training.loop import train
from pipeline.training.sessions import LocalSession
from pipeline.training.train_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"


def upscale(src: Path, dst: Path, side: int) -> int:
    n = 0
    for path in sorted(src.rglob("*.jp*g")):
        img = Image.open(path).convert("RGB")
        scale = side / max(img.size)
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(out, "JPEG", quality=90)
        n += 1
    return n


def samples(m, split: str) -> tuple[list[bytes], np.ndarray]:
    data, labels = [], []
    for uri in m.shard_uris(split):
        rows = read_shard(uri, None, "webdataset")
        data += [bytes(s.image) for s in rows]
        labels += [s.label for s in rows]
    return data, np.asarray(labels)


def short_run(m, epochs: int, seed: int = 0) -> float:
    """Val top-1 of a small ViT trained `epochs` epochs on the set (decoded in this process, fresh crops
    every epoch, the same seed for both sets)."""
    train_x, train_y = samples(m, "train")
    val_x, val_y = samples(m, "val")
    t_train, t_eval = ImageTransform(64, 8, train=True), ImageTransform(64, 8, train=False)

    def batches(split, bs, epoch, is_train):
        rng = np.random.default_rng((seed, epoch))
        xs, ys = (train_x, train_y) if is_train else (val_x, val_y)
        order = rng.permutation(len(xs)) if is_train else np.arange(len(xs))
        for i in range(0, len(order) - (bs - 1 if is_train else 0), bs):
            idx = order[i : i + bs]
            t = t_train if is_train else t_eval
            yield {
                "patches": np.stack([t(xs[j], rng) for j in idx]),
                "label": ys[idx],
                "valid": np.ones(len(idx), bool),
            }

    cfg = PretrainConfig.model_validate(
        {
            "model": {"name": "vit_micro_patch4_32", "img_size": 64, "patch_size": 8},
            "train": {"batch_size": 32, "epochs": epochs, "seed": seed, "report_every_s": 60},
            "optim": {"lr": 1e-3, "warmup_epochs": 1},
            "data": {"val_split": "val"},
        }
    )
    s = LocalSession(batches, None, device=torch.device("cpu"))
    out = train(cfg, s, num_classes=2, train_count=len(train_x))
    return out["state"]["history"][-1]["val_top1"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=2000)
    ap.add_argument("--max-side", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs {DATA}")
    torch.set_num_threads(1)  # one core, as a 1-CPU data task
    tmp = Path(tempfile.mkdtemp(prefix="vitray-bench-resize-"))
    try:
        t0 = time.perf_counter()
        n = upscale(DATA, tmp / "photos", args.side)
        print(f"{n} photos upscaled to {args.side} px in {time.perf_counter() - t0:.0f} s", flush=True)
        sets = {}
        for label, max_side in (("full", None), (f"max-side {args.max_side}", args.max_side)):
            t0 = time.perf_counter()
            w = shard_writer.make_shards(
                str(tmp / "photos"),
                str(tmp / label.replace(" ", "-")),
                max_side=max_side,
                progress=False,
                executor="local",
            )
            size = sum(e.bytes for s in w.manifest.splits.values() for e in s.shards)
            print(f"  shards {label:14s}: {size / 1e6:7.1f} MB, made in {time.perf_counter() - t0:5.1f} s", flush=True)
            sets[label] = w.manifest
        t = ImageTransform(224, 16, train=True)
        per_core = {}
        for label, m in sets.items():  # the transform over each set's own stored bytes
            per_core[label] = rates({label: t}, samples(m, "train")[0], seconds=args.seconds)[label]
        full, small = per_core["full"], per_core[f"max-side {args.max_side}"]
        print(
            f"training transform per core: full size {full:6.1f} img/s | --max-side {args.max_side} {small:6.1f} img/s "
            f"-> {small / full:.2f}x"
        )
        for label, m in sets.items():
            top1 = short_run(m, args.epochs)
            print(f"  short run ({args.epochs} epochs, vit_micro at 64 px) on {label:14s}: val top-1 {top1:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
