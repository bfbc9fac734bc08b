"""make_shards at scale: memory that does not grow with the data, and the Ray Data job against one process.

Synthetic class folders of 2,000 and 20,000 JPEGs of about 500 px (made here, in a temporary folder
removed at the end; nothing committed), sharded into the local S3 server:
  (a) baseline: the same per-shard function (read, check by the decode rules, pack, upload) in one
      process, one shard after another, on the 2,000 set
  (b) jobs' path: the Ray Data job on a fresh local Ray with as many CPU slots as cores, each size
Prints the peak RSS of the driver and of the busiest task process for each size and their ratio
(goal: within 1.2x between 2,000 and 20,000), and images/s per core of (b) against (a) (goal: at least
0.8) and in total. Each run is its own process, so every peak is that run's own.
Needs the local stack (`make up`).

  python bench/shards.py [--sizes 2000 20000] [--shard-size 256]
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _make_images(args):
    folder, start, stop, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed + start)
    for i in range(start, stop):
        w, h = int(rng.integers(440, 560)), int(rng.integers(330, 420))
        base = rng.integers(
            0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8
        )  # smooth blocks + noise: photo-like size
        img = np.kron(base, np.ones((16, 16, 1), np.uint8))[:h, :w]
        img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        path = Path(folder) / f"class_{i % 10:02d}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=85)
    return stop - start


def make_tree(folder: Path, n: int) -> None:
    chunks = [(str(folder), s, min(s + 500, n), 0) for s in range(0, n, 500)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        assert sum(pool.map(_make_images, chunks)) == n


def one_run(source: str, output: str, executor: str, shard_size: int) -> dict:
    """In a child process: one make_shards, its wall time and peaks."""
    from pipeline.data import shard_writer

    if executor == "ray":
        from pipeline.core.ray_runtime import connect

        connect(log_to_driver=False)
    import psutil

    cpu0, t0 = psutil.cpu_times(), time.perf_counter()
    written = shard_writer.make_shards(
        source, output, val_fraction=0.0, shard_size=shard_size, progress=False, executor=executor
    )
    m = written.manifest
    dt, cpu1 = time.perf_counter() - t0, psutil.cpu_times()
    busy = sum(getattr(cpu1, k) - getattr(cpu0, k) for k in ("user", "system", "nice", "irq", "softirq"))
    tasks = written.tasks
    return {
        "images": m.splits["train"].count,
        "seconds": dt,
        "shards": len(tasks),
        "cpu_seconds": busy,
        "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "task_rss_mb": max(t["max_rss_mb"] for t in tasks),
        "task_seconds": sum(t["seconds"] for t in tasks),
    }


def run_child(source, output, executor, shard_size, cores) -> dict:
    env = {**os.environ, "VITRAY_RAY_CPUS": str(cores)}
    if executor == "ray":  # a private Ray per run: fresh worker processes, their own peaks
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            env.pop(k, None)
    out = subprocess.run(
        [sys.executable, __file__, "--child", source, output, executor, str(shard_size)],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if out.returncode:
        sys.exit(f"bench run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs=2, default=[2000, 20000])
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_run(a.child[0], a.child[1], a.child[2], int(a.child[3]))))
        return
    import local_stack

    local_stack.env()
    from pipeline.core import storage

    cores = os.cpu_count() or 1
    bucket = f"bench-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    tmp = Path(tempfile.mkdtemp(prefix="vitray-bench-shards-"))
    try:
        small_n, big_n = a.sizes
        t0 = time.perf_counter()
        make_tree(tmp / "small", small_n)
        make_tree(tmp / "big", big_n)
        print(f"made {small_n} + {big_n} JPEGs of ~500x375 px in {time.perf_counter() - t0:.0f} s", flush=True)
        base = run_child(str(tmp / "small"), f"s3://{bucket}/a", "local", a.shard_size, cores)
        runs = {
            n: run_child(str(tmp / name), f"s3://{bucket}/b{n}", "ray", a.shard_size, cores)
            for n, name in ((small_n, "small"), (big_n, "big"))
        }
        # Per core: images per CPU-second of the whole machine during the run (the S3 server, Ray's
        # services and the read threads included), since neither run keeps to one core.
        per_core = {k: r["images"] / r["cpu_seconds"] for k, r in [("a", base)] + [(n, r) for n, r in runs.items()]}
        rate_a = base["images"] / base["seconds"]
        print(
            f"(a) one process, {small_n} images: {rate_a:6.1f} img/s, {base['cpu_seconds'] / base['seconds']:.2f} "
            "cores busy, "
            f"{per_core['a']:6.1f} img per CPU-second; peak RSS {base['driver_rss_mb']:.0f} MiB",
            flush=True,
        )
        for n, r in runs.items():
            print(
                f"(b) Ray Data job, {n:6d} images, {r['shards']} shards: {r['images'] / r['seconds']:6.1f} img/s "
                f"({r['seconds']:.1f} s after Ray start-up, listing included), {r['cpu_seconds'] / r['seconds']:.2f} "
                "of "
                f"{cores} cores busy, {per_core[n]:6.1f} img per CPU-second; peak RSS driver {r['driver_rss_mb']:.0f} "
                "MiB, "
                f"busiest task process {r['task_rss_mb']:.0f} MiB",
                flush=True,
            )
        s, b = runs[small_n], runs[big_n]
        rate_b = b["images"] / b["seconds"]
        print(
            f"peak RSS {big_n} / {small_n} images: driver {b['driver_rss_mb'] / s['driver_rss_mb']:.2f}x, "
            f"task processes {b['task_rss_mb'] / s['task_rss_mb']:.2f}x (goal <= 1.2x)"
        )
        print(
            f"images per CPU-second, (b) at {big_n} / (a): {per_core[big_n] / per_core['a']:.2f} (goal >= 0.8); "
            f"images/s in total (b) / (a): {rate_b / rate_a:.2f}x on {cores} cores"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        storage.delete(f"s3://{bucket}", recursive=True)
        try:
            storage.s3_client().delete_bucket(Bucket=bucket)
        except Exception:
            pass


if __name__ == "__main__":
    main()
