"""Data pipeline speed on real JPEGs: decode + random-resized-crop 224 + flip + patchify to uint8.

  (a) baseline: Pillow full decode, crop, resize, flip, patchify in a plain loop (1 core)
  (b) this project's ImageTransform in a plain loop (1 core): JPEG draft mode + one-pass box resize
  (c) the whole Ray Data stream from shards on the local S3 server (all CPU slots)
Run on the hymenoptera photos (~500x375, like ImageNet) and on the same photos upscaled to 2000 px.
Also prints the decode-only rate (the ceiling on small photos) and the stream's peak memory.
Needs ../shared/data/hymenoptera_data and the local stack (`make up`).
"""

import io
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.transforms import ImageTransform, patchify, random_resized_crop_box  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hymenoptera_data"


def baseline(data: bytes, rng) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")  # full-resolution decode
    l, t, r, b = random_resized_crop_box(img.width, img.height, rng)
    img = img.crop((round(l), round(t), round(r), round(b))).resize((224, 224), Image.BILINEAR)
    a = np.asarray(img)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    return patchify(np.ascontiguousarray(a), 16)


def rate(fn, datas, min_s=4.0):
    rng = np.random.default_rng(0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        for d in datas:
            fn(d, rng)
            n += 1
    return n / (time.perf_counter() - t0)


def upscale(data: bytes, long_side=2000) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    s = long_side / max(img.size)
    buf = io.BytesIO()
    img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ray_stream_rate(folder: Path, bucket: str, epochs: int = 1):
    """Make shards of `folder` in the local S3 server and time the Ray Data patch stream."""
    import psutil

    from pipeline import shards
    from pipeline.data import StreamConfig, configure_ray_data, split_stream

    shards.make_shards(str(folder), f"s3://{bucket}/{folder.name}", val_fraction=0.0, shard_size=32, progress=False)
    configure_ray_data(progress=False)
    ds, m = split_stream(f"s3://{bucket}/{folder.name}", "train", StreamConfig(224, 16, train=True), shuffle_seed=0)
    peak = [0]
    stop = threading.Event()

    def watch():  # RSS of every process on the machine that belongs to Ray, plus this driver
        while not stop.is_set():
            total = 0
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "ray::" in (p.info["name"] or "") or "ray::" in cmd or p.pid == os.getpid():
                    total += p.info["memory_info"].rss
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    for _ in ds.iter_batches(batch_size=32, batch_format="numpy"):  # warm-up epoch: workers start
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for b in ds.iter_batches(batch_size=32, batch_format="numpy"):
            n += len(b["label"])
    dt = time.perf_counter() - t0
    stop.set()
    return n / dt, peak[0], m["splits"]["train"]["count"]


def main():
    if not DATA.exists():
        sys.exit(f"bench/data.py needs real photos at {DATA}")
    files = sorted(p for p in DATA.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    small = [p.read_bytes() for p in files]
    ours = ImageTransform(224, 16, train=True)
    decode_only = lambda d, rng: Image.open(io.BytesIO(d)).load()  # noqa: E731
    import tempfile

    big_dir = Path(tempfile.mkdtemp(prefix="vitray-big-")) / "large"
    large = []
    for i, d in enumerate(small[:96]):
        large.append(upscale(d))
        (big_dir / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (big_dir / f"c{i % 2}" / f"{i}.jpg").write_bytes(large[-1])
    results = {}
    for label, datas in (("~500x375 photos", small), ("2000 px photos", large)):
        a = rate(baseline, datas)
        b = rate(ours, datas)
        dec = rate(decode_only, datas)
        results[label] = (a, b, dec)
        print(f"{label:16s}: decode-only {dec:7.1f} img/s | (a) baseline {a:7.1f} img/s | (b) ours {b:7.1f} img/s | "
              f"(b)/(a) {b / a:4.2f}x | (b)/decode-only {b / dec:4.2f}", flush=True)

    sys.path.insert(0, str(ROOT / "cluster" / "local"))
    import stack  # noqa: E402

    os.environ.update(stack.env_vars())  # before importing ray: its auth mode is read at import
    import ray

    from pipeline import storage

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    cpus = ray.cluster_resources()["CPU"]
    cores = os.cpu_count()
    bucket = f"bench-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    # The stream is measured over ~2,000 images (the photos repeated under new names), so that Ray
    # Data's per-epoch start-up does not dominate as it would on 245 images.
    small_dir = Path(tempfile.mkdtemp(prefix="vitray-small-")) / "small"
    for rep in range(8):
        for i, d in enumerate(small):
            (small_dir / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            (small_dir / f"c{i % 2}" / f"{rep}-{i}.jpg").write_bytes(d)
    for rep in range(3):
        for i, d in enumerate(large):
            (big_dir / f"c{i % 2}" / f"r{rep}-{i}.jpg").write_bytes(d)
    for label, folder, (a, b, _) in (("~500x375 photos", small_dir, results["~500x375 photos"]),
                                     ("2000 px photos", big_dir, results["2000 px photos"])):
        c, peak, count = ray_stream_rate(folder, bucket)
        per_core = c / cores
        print(f"{label:16s}: (c) Ray Data stream from S3 {c:7.1f} img/s on {cores} cores ({cpus:g} Ray CPU slots) = "
              f"{per_core:6.1f} img/s per core | (c) per core / (b) {per_core / b:4.2f} | peak RSS of Ray's worker processes + driver "
              f"{peak / 2**20:6.0f} MiB ({count} images)", flush=True)
    storage.delete(f"s3://{bucket}", recursive=True)


if __name__ == "__main__":
    main()
