"""Training throughput: (a) the plain loop without Ray, (b) Ray Train with 1 worker, (c) with 2 workers.

Same model (vit_micro_patch4_32), data (the embedded digits shards in the local S3 server) and global
batch; steady-state images/s is the median of the progress windows after the first. Needs `make up`.
  python bench/train.py
  python bench/train.py --device cuda     # no Ray: ViT-B/16, bf16, synthetic patches -> images/s, MFU
  python bench/train.py --checkpoint-cost # step time of a checkpoint, sync against async upload (ViT-S/16)
  python bench/train.py --emulate 0.1     # GPU emulation: a step sleeps 100 ms; the fraction of step time Ray adds
  python bench/train.py --deit-step       # no Ray: Mixup/CutMix/erasing on patches against the image round trip
  python bench/train.py --order           # 2 workers: train.deterministic against the default (the same order)
"""

import argparse
import os
import statistics
import uuid
from pathlib import Path

import numpy as np
import torch

from pipeline.core.runs import RunLayout
from pipeline.training.loop import train
from pipeline.training.sessions import LocalSession
from pipeline.training.train_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def steady(reports):
    ips = [r["images_per_s"] for r in reports if "images_per_s" in r][1:]
    waits = [r["data_wait"] for r in reports if "data_wait" in r][1:]
    return statistics.median(ips), statistics.median(waits)


def epoch_walls(reports) -> list[float]:
    """Wall seconds of each epoch: the first from its start, each later one from the end of the one before
    (that epoch's evaluation and checkpoint included, and the next stream's start-up wherever it ran)."""
    ends = [m for m in reports if "epoch_s" in m]
    return [ends[0]["epoch_s"]] + [m["epoch_end_at"] - p["epoch_end_at"] for p, m in zip(ends, ends[1:])]


def whole_epochs(reports, batch) -> tuple[float, float]:
    """Images/s of the first epoch and of the later ones, from each epoch's wall time (start-up included)."""
    steps = [m["step"] for m in reports if "epoch_s" in m]
    rates = [(s - p) * batch / w for p, s, w in zip([0] + steps, steps, epoch_walls(reports))]
    return rates[0], statistics.mean(rates[1:]) if len(rates) > 1 else float("nan")


def gpu(args):
    """ViT-B/16 bf16 training on one GPU with synthetic uint8 patches; no Ray involved."""
    cfg = PretrainConfig.model_validate(
        {
            "model": {"name": args.model},
            "train": {
                "batch_size": args.batch,
                "epochs": 1,
                "max_steps": args.steps,
                "log_every_steps": 10,
                "compile": args.compile,
                "precision": "bf16",
            },
            "optim": {"warmup_steps": 5, "label_smoothing": 0.1},
            "data": {"val_split": None},
        }
    )
    import vit_model

    mcfg = vit_model.variant_config(args.model)
    device = torch.device("cuda")
    patches = torch.randint(0, 256, (args.batch, mcfg.num_patches, mcfg.patch_dim), dtype=torch.uint8)
    labels = torch.randint(0, 1000, (args.batch,))
    batch = {"patches": patches.numpy(), "label": labels.numpy(), "valid": np.ones(args.batch, bool)}

    def batches(split, bs, epoch, is_train):
        while True:
            yield batch

    s = LocalSession(batches, None, device=device)
    train(cfg, s, num_classes=1000, train_count=args.batch * args.steps)
    ips, wait = steady(s.reports)
    mfu = [r["mfu"] for r in s.reports if "mfu" in r][1:]
    print(
        f"{args.model} bf16 compile={args.compile} batch {args.batch} on {torch.cuda.get_device_name()}: "
        f"{ips:.0f} images/s, MFU {statistics.median(mfu) * 100:.1f}% (data wait {wait * 100:.0f}%)"
    )


def cpu(args):
    import local_stack

    local_stack.env()  # before importing ray: its auth mode is read at import
    import ray
    from roles import RoleClock, per_image

    from pipeline.core import storage
    from pipeline.data import shard_reader, shard_writer
    from pipeline.data.manifest import load_manifest
    from pipeline.data.transforms import Augment, ImageTransform
    from pipeline.training import trainer

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    bucket = f"bench-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    shard_writer.make_shards("digits", f"s3://{bucket}/digits", progress=False, executor="local")
    manifest = f"s3://{bucket}/digits/manifest.json"
    base = {
        "model": {"name": "vit_micro_patch4_32"},
        "data": {"manifest": manifest, "val_split": None, "hflip": 0.0},
        "optim": {"warmup_steps": 2},
        "train": {"output": f"s3://{bucket}/runs", "batch_size": args.cpu_batch, "epochs": 3, "log_every_steps": 5},
    }

    # (a) the plain loop: same shards, decoded in the loop's own process, no Ray
    m = load_manifest(manifest)
    samples = []
    digests = m.digests("train")
    for uri in m.shard_uris("train"):
        rows = shard_reader.read_shard(uri, digests.get(storage.parse_uri(uri).path), m.format)
        samples += [(bytes(s.image), s.label) for s in rows]
    t = ImageTransform(32, 4, train=True, augment=Augment(scale_min=0.08, hflip=0.0))
    rng = np.random.default_rng(0)

    def batches(split, bs, epoch, is_train):
        order = rng.permutation(len(samples))
        for i in range(0, len(order) - bs + 1, bs):
            idx = order[i : i + bs]
            yield {
                "patches": np.stack([t(samples[j][0], rng) for j in idx]),
                "label": np.array([samples[j][1] for j in idx]),
                "valid": np.ones(len(idx), bool),
            }

    cfg = PretrainConfig.model_validate(base)
    s = LocalSession(batches, None, device=torch.device("cpu"))
    train(cfg, s, num_classes=10, train_count=m.splits["train"].count)
    a, a_wait = steady(s.reports)
    a_epochs = whole_epochs(s.reports, cfg.train.batch_size)
    results = {}
    for workers in (1, 2):
        c = PretrainConfig.model_validate(
            {**base, "train": {**base["train"], "num_workers": workers, "name": f"w{workers}"}}
        )
        clock = RoleClock().start()
        out = trainer.run(c)
        cpu = clock.stop()
        lines = RunLayout.at(f"s3://{bucket}/runs/w{workers}").read_metrics()
        results[workers] = (
            *steady(lines),
            whole_epochs(lines, c.train.batch_size),
            cpu,
            out["step"] * c.train.batch_size,
        )
    print(
        f"(a) plain loop, no Ray        {a:7.1f} img/s median window, {a_epochs[1]:7.1f} img/s over epochs 2+ "
        f"(first epoch {a_epochs[0]:.1f} img/s; data wait {a_wait * 100:3.0f}%, decoding in the loop)"
    )
    for w, (ips, wait, (first, later), cpu, images) in results.items():
        print(
            f"({'b' if w == 1 else 'c'}) Ray Train, {w} worker{'s' if w > 1 else ' '}       {ips:7.1f} img/s median "
            "window, "
            f"{later:7.1f} img/s over epochs 2+ (first epoch {first:.1f} img/s, workers starting cold; data wait "
            f"{wait * 100:3.0f}%) "
            f"ratio to (a) {ips / a:4.2f} by windows, {later / a_epochs[1]:4.2f} by epochs"
        )
        print("    CPU by role: " + per_image(cpu, images))
    storage.delete(f"s3://{bucket}", recursive=True)


def order_cost(args):
    """train.deterministic (deterministic kernels, fixed threads) against the default, both on the exact order
    (each worker reads its part through Ray Data, order preserved), same run."""
    import local_stack

    local_stack.env()
    import ray

    from pipeline.core import storage
    from pipeline.data import shard_writer
    from pipeline.training import trainer

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    bucket = f"bench-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    try:
        shard_writer.make_shards("digits", f"s3://{bucket}/digits", progress=False, executor="local")
        base = {
            "model": {"name": "vit_micro_patch4_32"},
            "data": {"manifest": f"s3://{bucket}/digits/manifest.json", "val_split": None},
            "optim": {"warmup_steps": 2},
            "train": {"output": f"s3://{bucket}/runs", "batch_size": args.cpu_batch, "epochs": 3, "num_workers": 2},
        }
        kinds = {
            "default": ({}, {}),
            "deterministic": ({}, {"deterministic": True}),
        }
        rates = {}
        for kind, (data, train_) in kinds.items():
            name = kind.replace(" + ", "-")
            c = PretrainConfig.model_validate(
                {**base, "data": {**base["data"], **data}, "train": {**base["train"], **train_, "name": name}}
            )
            trainer.run(c)
            lines = RunLayout.at(f"s3://{bucket}/runs/{name}").read_metrics()
            ips, wait = steady(lines)
            rates[kind] = (ips, whole_epochs(lines, c.train.batch_size)[1], wait)
        s_ips, s_epochs, _ = rates["default"]
        for kind, (ips, later, wait) in rates.items():
            print(
                f"{kind:22s} {ips:7.1f} img/s median window, {later:7.1f} img/s over epochs 2+ (data wait "
                f"{wait * 100:3.0f}%); ratio to default {ips / s_ips:4.2f} by windows, "
                f"{later / s_epochs:4.2f} by epochs"
            )
    finally:
        storage.delete(f"s3://{bucket}", recursive=True)


def emulate(args):
    """GPU emulation: every step sleeps `--emulate` seconds (ViT-B/16 on an H100 is 100-300 ms a step) while
    the data stream, progress reports and asynchronous checkpoints run for real, under Ray Train with one
    worker. What Ray adds is the step time above the sleep: in steady state (every progress window but an
    epoch's first) and over whole epochs (epoch start-up included), against the same loop without Ray."""
    import time

    import local_stack

    local_stack.env()
    import ray
    from roles import RoleClock, per_image

    from pipeline.core import storage
    from pipeline.data import shard_writer
    from pipeline.training import trainer

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    bucket = f"bench-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    shard_writer.make_shards("digits", f"s3://{bucket}/digits", progress=False, executor="local")
    step, batch, epochs = args.emulate, args.cpu_batch, 4
    base = {
        "model": {"name": "vit_micro_patch4_32"},
        "data": {
            "manifest": f"s3://{bucket}/digits/manifest.json",
            "val_split": None,
            "hflip": 0.0,
        },
        "optim": {"warmup_steps": 2},
        "train": {
            "output": f"s3://{bucket}/runs",
            "batch_size": batch,
            "epochs": epochs,
            "log_every_steps": 1,
            "report_every_s": 2.0,
            "emulate_step_s": step,
            "checkpoint_every_steps": 100,
            "name": "emu",
        },
    }

    def steady(reports):  # every progress window but an epoch's first: (ms a step, data wait)
        windows = [m for m in reports if "images_per_s_worker" in m and "epoch_s" not in m]
        keep = [m for prev, m in zip([None] + windows, windows) if prev is not None and prev["epoch"] == m["epoch"]]
        return (
            statistics.median(batch / m["images_per_s_worker"] for m in keep),
            statistics.median(m["data_wait"] for m in keep),
        )

    # the same loop without Ray: batches from memory, the same sleep, the same reports and checkpoints
    cfg = PretrainConfig.model_validate(base)
    fake = {
        "patches": np.zeros((batch, 64, 48), np.uint8),
        "label": np.zeros(batch, np.int64),
        "valid": np.ones(batch, bool),
    }
    s = LocalSession(lambda *a: iter([fake] * (1618 // batch)), None, device=torch.device("cpu"))
    train(cfg, s, num_classes=10, train_count=1618)
    plain_step, _ = steady(s.reports)
    clock = RoleClock().start()
    t0 = time.perf_counter()
    summary = trainer.run(PretrainConfig.model_validate(base))
    wall = time.perf_counter() - t0
    cpu = clock.stop()
    lines = RunLayout.at(f"s3://{bucket}/runs/emu").read_metrics()
    ray_step, wait = steady(lines)
    epochs_ = [m for m in lines if "epoch_s" in m]
    steps = summary["step"]
    print(
        f"GPU emulation: {step * 1000:.0f} ms a step, batch {batch}, {steps} steps in {epochs} epochs, progress "
        "reports "
        f"every {base['train']['report_every_s']} s, an async checkpoint every "
        f"{base['train']['checkpoint_every_steps']} steps"
    )
    print(
        f"  the loop without Ray, steady state: {plain_step * 1000:6.1f} ms a step (checkpoint saves and reports "
        "included)"
    )
    print(
        f"  Ray Train, 1 worker, steady state:  {ray_step * 1000:6.1f} ms a step -> Ray adds "
        f"{1 - plain_step / ray_step:6.2%} "
        f"to the loop without Ray, {1 - step / ray_step:6.2%} to the bare step (data wait {wait:.1%}; goal <= 3%)"
    )
    walls = epoch_walls(lines)
    print(
        f"  start-up, apart: {wall - sum(walls):.1f} s before the first epoch and after the last "
        f"(workers, model, export); first batch of each epoch "
        + ", ".join(f"{m['first_batch_s']:.2f}" for m in epochs_)
        + " s (later epochs' streams start during the checkpoint before them); whole epochs (from one epoch's end to "
        "the "
        f"next) {statistics.mean(steps / epochs * step / w for w in walls[1:]):.1%} stepping"
    )
    print("  CPU by role: " + per_image(cpu, steps * batch))
    storage.delete(f"s3://{bucket}", recursive=True)


def checkpoint_cost(args):
    """What a checkpoint costs the training loop: ViT-S/16 at 224 px with its AdamW state (about 265 MB)
    on CPU, one Ray Train worker, a checkpoint every 3 steps, the upload synchronous against
    asynchronous, both in this run. The step after a checkpoint carries its cost (save + waiting)."""
    import local_stack

    local_stack.env()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # a report every step: let the controller keep up

    import ray

    from pipeline.core import storage
    from pipeline.data import shard_writer
    from pipeline.training import trainer

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    bucket = f"bench-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    shard_writer.make_shards("digits", f"s3://{bucket}/digits", progress=False, executor="local")
    every, steps, batch = 3, 14, args.ckpt_batch
    rows = {}
    for mode in ("sync", "async"):
        cfg = PretrainConfig.model_validate(
            {
                "model": {"name": "vit_small_patch16_224"},
                "data": {"manifest": f"s3://{bucket}/digits/manifest.json", "val_split": None, "hflip": 0.0},
                "optim": {"warmup_steps": 1},
                "train": {
                    "output": f"s3://{bucket}/runs",
                    "name": mode,
                    "batch_size": batch,
                    "epochs": 1,
                    "max_steps": steps,
                    "log_every_steps": 1,
                    "checkpoint_every_steps": every,
                    "checkpoint_upload": mode,
                    "cpus_per_worker": 2,
                    "keep_checkpoints": 1,
                },
            }
        )
        trainer.run(cfg)
        lines = RunLayout.at(f"s3://{bucket}/runs/{mode}").read_metrics()
        step_s = {
            m["step"]: batch / m["images_per_s_worker"] for m in lines if "images_per_s_worker" in m and m["step"] > 1
        }
        after = [t for s_, t in step_s.items() if s_ % every == 1 and s_ > every]
        plain = [t for s_, t in step_s.items() if s_ % every != 1]
        saves = [m["checkpoint_save_s"] for m in lines if "checkpoint_save_s" in m]
        uploads = [m["checkpoint_upload_s"] for m in lines if "checkpoint_upload_s" in m]
        rows[mode] = statistics.median(after) - statistics.median(plain)
        interval = (every - 1) * statistics.median(plain) + statistics.median(after)
        print(
            f"{mode:5s} upload: step {statistics.median(plain):5.2f} s, step after a checkpoint "
            f"{statistics.median(after):5.2f} s "
            f"-> checkpoint cost {rows[mode]:5.2f} s (local save {statistics.median(saves):4.2f} s, "
            f"upload {statistics.median(uploads) if uploads else float('nan'):4.2f} s); {interval:5.2f} s per {every} "
            "steps",
            flush=True,
        )
    print(f"async/sync checkpoint cost {rows['async'] / rows['sync']:4.2f}")
    storage.delete(f"s3://{bucket}", recursive=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cpu-batch", type=int, default=64)
    ap.add_argument("--checkpoint-cost", action="store_true")
    ap.add_argument("--ckpt-batch", type=int, default=4)
    ap.add_argument("--emulate", type=float, default=None, help="GPU emulation: seconds a step sleeps")
    ap.add_argument(
        "--deit-step", action="store_true", help="the DeiT-style step before and after (bench/deit_step.py)"
    )
    ap.add_argument("--order", action="store_true", help="train.deterministic against the default")
    args = ap.parse_args()
    if args.order:
        return order_cost(args)
    if args.checkpoint_cost:
        return checkpoint_cost(args)
    if args.emulate:
        return emulate(args)
    if args.deit_step:
        from deit_step import deit_step

        return deit_step(args)
    gpu(args) if args.device == "cuda" else cpu(args)


if __name__ == "__main__":
    main()
