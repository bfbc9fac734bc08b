"""Inference throughput: (a) the job's own steps in one process without Ray (the same GETs from the local S3
server, decode, model, Parquet written back), (b) the Ray Data job, at 2,000 and 6,000 images: the
per-image time is the slope between the two sizes; then the cost of reading the
--since-last-run state after 1, 10 and 100 committed runs (the ledger against reading every published
row, the way it was done before). Needs `make up`.
  python bench/infer.py
  python bench/infer.py --state-only      # only the state-read cost (no Ray)
  python bench/infer.py --table --sizes 2000 0   # the Iceberg table output's images/s against the prefix's
  python bench/infer.py --device cuda      # no Ray: ViT-B/16 bf16 inference images/s on a GPU
"""

import argparse
import io
import os
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import vit_model

ROOT = Path(__file__).resolve().parents[1]


def gpu(args):
    model = vit_model.create_model(args.model).cuda().eval()
    if args.compile:
        model = torch.compile(model)
    cfg = vit_model.variant_config(args.model)
    x = torch.randint(0, 256, (args.batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            model(x)
        torch.cuda.synchronize()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 10:
            model(x)
            n += args.batch
        torch.cuda.synchronize()
    ips = n / (time.perf_counter() - t0)
    peak = vit_model.gpu_peak_flops(torch.cuda.get_device_name())
    mfu = f", MFU {vit_model.mfu(ips, cfg, peak, training=False) * 100:.1f}%" if peak else ""
    print(f"{args.model} bf16 inference batch {args.batch} on {torch.cuda.get_device_name()}: {ips:.0f} images/s{mfu}")


def plain_run(uris: list[str], model_uri: str, out: str, batch: int, reads: int, threads: int) -> None:
    """The job's own steps in one process, without Ray: concurrent GETs + decode, the Predictor, Parquet to S3."""
    import datetime as dt
    import hashlib

    import pyarrow.parquet as pq

    from pipeline.core import exported, storage
    from pipeline.data.transforms import ImageTransform
    from pipeline.inference.inputs import fetch_and_preprocess
    from pipeline.inference.predictor import Predictor

    w, c = exported.read(model_uri)
    transform = ImageTransform.for_model(exported.model_config(c), False)
    p = Predictor(
        w,
        c,
        hashlib.sha256(w).hexdigest(),
        model_uri,
        5,
        False,
        "plain",
        dt.datetime.now(dt.timezone.utc),
        False,
        threads,
    )
    for i in range(0, len(uris), batch):
        part = uris[i : i + batch]
        rows = fetch_and_preprocess(
            {"image_uri": np.asarray(part, dtype=object), "label_id": np.full(len(part), -1)}, transform, reads
        )
        buf = io.BytesIO()
        pq.write_table(p(rows), buf)
        storage.write_bytes(f"{out}/part-{i // batch:05d}.parquet", buf.getvalue())


def _stack_bucket(args, name: str) -> str:
    """Connect to the local stack's Ray and make a bench bucket holding the CPU model at `s3://<it>/model`."""
    import ray
    from ray.data import DataContext

    from pipeline.core import storage

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    bucket = f"{name}-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    m = vit_model.create_model(args.cpu_model, num_classes=10)
    w, c = vit_model.export_bytes(m, class_names=[str(i) for i in range(10)])
    storage.write_bytes(f"s3://{bucket}/model/model.safetensors", w)
    storage.write_bytes(f"s3://{bucket}/model/config.json", c)
    return bucket


def cpu(args):
    """(a) the job's steps in one plain process and (b) the Ray Data job, each at two sizes; the per-image time
    is the slope between them (start-up, listing and publishing cancel), CPU seconds by role beside it."""
    import local_stack

    local_stack.env()  # before importing ray: its auth mode is read at import
    from roles import RoleClock, per_image

    from pipeline.core import storage
    from pipeline.inference import batch as inference
    from pipeline.inference.batch import InferConfig

    bucket = _stack_bucket(args, "bench")
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    sizes = args.sizes

    def put(i):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(
            buf, "JPEG", quality=90
        )
        for n in sizes:
            if i < n:
                storage.write_bytes(f"s3://{bucket}/in{n}/{i:05d}.jpg", buf.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(max(sizes))))
    threads = int(args.cpus_per_replica)
    res = {}
    for n in sizes:
        uris = [f"s3://{bucket}/in{n}/{i:05d}.jpg" for i in range(n)]
        clock = RoleClock().start()
        t0 = time.perf_counter()
        plain_run(uris, f"s3://{bucket}/model", f"s3://{bucket}/plain{n}", args.batch, args.reads, threads)
        res[("a", n)] = (time.perf_counter() - t0, clock.stop())
        clock = RoleClock().start()
        t0 = time.perf_counter()
        r = inference.run(
            InferConfig(
                model=f"s3://{bucket}/model",
                input=f"s3://{bucket}/in{n}",
                output=f"s3://{bucket}/out{n}",
                replicas=(1, 1),
                batch_size=args.batch,
                reads=args.reads,
                cpus_per_replica=args.cpus_per_replica,
                decode_cpus=args.decode_cpus,
            )
        )
        res[("b", n)] = (time.perf_counter() - t0, clock.stop())
        print(
            f"{n} images: (a) plain process {res[('a', n)][0]:6.1f} s | (b) Ray Data job {res[('b', n)][0]:6.1f} s "
            "end to end "
            f"(stages: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items())
            + "; in predict: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.get("operator_s", {}).items())
            + " task-s; after the pipeline started: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in r.get("startup_s", {}).items())
            + ")",
            flush=True,
        )
    n1, n2 = sizes
    slope = {k: (res[(k, n2)][0] - res[(k, n1)][0]) / (n2 - n1) for k in ("a", "b")}
    for k, label in (
        ("a", "(a) plain process (same GETs, decode, model, Parquet to S3)"),
        ("b", "(b) Ray Data job, 1 replica"),
    ):
        print(
            f"{label}: {slope[k] * 1000:.2f} ms per image ({1 / slope[k]:.0f} img/s marginal); at {n2}: "
            + per_image(res[(k, n2)][1], n2)
        )
    print(f"(b)/(a) marginal images/s: {slope['a'] / slope['b']:.2f} (goal >= 0.8)")
    storage.delete(f"s3://{bucket}", recursive=True)


def table_vs_prefix(args):
    """Images/s of the Ray Data job writing the Iceberg table (--table, SQLite catalog, warehouse in the
    bench bucket) against the Parquet prefix output, same images, alternated, in the same run."""
    import tempfile

    import local_stack

    local_stack.env()  # before importing ray: its auth mode is read at import
    from pipeline.core import storage
    from pipeline.inference import batch as inference
    from pipeline.inference.batch import InferConfig
    from pipeline.inference.iceberg import table_run

    bucket = _stack_bucket(args, "bench-table")
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    n = args.sizes[0]

    def put(i):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
        storage.write_bytes(f"s3://{bucket}/in/{i:05d}.jpg", buf.getvalue())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))
    common = dict(
        model=f"s3://{bucket}/model", input=f"s3://{bucket}/in", replicas=(1, 1), batch_size=args.batch,
        reads=args.reads, cpus_per_replica=args.cpus_per_replica, decode_cpus=args.decode_cpus,
    )  # fmt: skip
    got = {"prefix": [], "table": []}
    with tempfile.TemporaryDirectory(prefix="bench-catalog-") as tmp:
        for rep in range(args.repeats):
            for kind in ("prefix", "table") if rep % 2 == 0 else ("table", "prefix"):
                if kind == "prefix":
                    r = inference.run(InferConfig(**common, output=f"s3://{bucket}/out{rep}"))
                else:
                    r = table_run.run(
                        InferConfig(
                            **common,
                            table=f"bench.t{rep}",
                            catalog=f"sqlite:///{tmp}/catalog.db",
                            warehouse=f"s3://{bucket}/warehouse",
                        )  # fmt: skip
                    )
                got[kind].append((r["images_per_s"], r["elapsed_s"]))
                print(
                    f"{kind:6s} run {rep}: {r['images_per_s']:6.1f} images/s in predict, {r['elapsed_s']:5.1f} s "
                    "end to end (stages: " + ", ".join(f"{k} {v:.1f}" for k, v in r["timings_s"].items()) + ")",
                    flush=True,
                )
    med = {k: sorted(v)[len(v) // 2] for k, v in got.items()}
    print(
        f"{n} images, median of {args.repeats}: table {med['table'][0]:.1f} images/s, prefix {med['prefix'][0]:.1f}: "
        f"table/prefix {med['table'][0] / med['prefix'][0]:.2f} (goal >= 0.95); end to end "
        f"{med['prefix'][1] / med['table'][1]:.2f}"
    )
    storage.delete(f"s3://{bucket}", recursive=True)


def state_cost(args):
    """Seconds to read the --since-last-run state as history grows: the model's ledger (one object)
    against reading every published run's rows (embeddings included), measured in the same run."""
    import datetime as dt
    import statistics

    import local_stack
    import pyarrow as pa
    import pyarrow.parquet as pq

    local_stack.env()
    from pipeline.core import storage
    from pipeline.core.lease import Lease
    from pipeline.inference import ledger, outputs, publish
    from pipeline.inference.rows import output_schema

    bucket = f"bench-state-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/preds"
    layout, sha, per_run, dim = outputs.Layout.of(out), "cd" * 32, args.state_rows, 192
    schema = output_schema(embeddings=True)
    now = dt.datetime.now(dt.timezone.utc)

    def timed(fn, repeat=5):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rng = np.random.default_rng(0)
    print(f"--since-last-run state: {per_run} new images per run, embeddings of {dim} floats", flush=True)
    with Lease(out, "bench") as lease:
        for r in range(1, 101):
            rows = [
                {
                    "image_uri": f"s3://in/r{r:03d}/{i:05d}.jpg",
                    "label_id": None,
                    "label": None,
                    "pred_id": 1,
                    "pred": "1",
                    "score": 0.5,
                    "topk_ids": [1, 2, 3, 4, 5],
                    "topk_scores": [0.5, 0.2, 0.1, 0.1, 0.1],
                    "embedding": rng.standard_normal(dim).astype(np.float32).tolist(),
                    "error": None,
                    "model_uri": "m",
                    "model_sha256": sha,
                    "run_id": f"r{r:03d}",
                    "inferred_at": now,
                }
                for i in range(per_run)
            ]
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
            staged = layout.staging(f"r{r:03d}").join("part-0.parquet.staged").uri
            storage.write_bytes(staged, buf.getvalue())
            publish.commit(
                layout,
                publish.plan_commit(
                    layout,
                    f"r{r:03d}",
                    "2026-11-28",
                    [staged],
                    accuracy_report=None,
                    ledger=True,
                    rows=per_run,
                    inputs=per_run,
                    errors=0,
                    model_sha256=sha,
                ),
                lease,
            )
            if r in (1, 10, 100):
                read_s = timed(lambda: ledger.read_ledger(layout, sha))
                everything = timed(
                    lambda: set(outputs.read_published(out, sha).column("image_uri").to_pylist()), repeat=3
                )
                print(
                    f"after {r:3d} runs ({r * per_run:6d} images): ledger {read_s * 1000:7.1f} ms | every published "
                    "row "
                    f"{everything * 1000:8.1f} ms | ledger/every-row {read_s / everything:5.2f}",
                    flush=True,
                )
    storage.delete(f"s3://{bucket}", recursive=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cpu-model", default="vit_micro_patch4_32")
    ap.add_argument("--sizes", type=int, nargs=2, default=[2000, 6000], help="the two run sizes of the slope")
    ap.add_argument("--reads", type=int, default=16, help="concurrent GETs per read task, (a) and (b)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument(
        "--decode-cpus",
        type=float,
        default=1.0,
        help="CPU slots per read+decode task (other than "
        "--cpus-per-replica: decoding runs in tasks of its own beside the model actor instead of inside it)",
    )
    ap.add_argument("--state-rows", type=int, default=50, help="new images per committed run in the state-cost part")
    ap.add_argument("--state-only", action="store_true")
    ap.add_argument("--table", action="store_true", help="only --table against the prefix output, images/s")
    ap.add_argument("--repeats", type=int, default=3, help="--table: runs of each, alternated")
    args = ap.parse_args()
    if args.state_only:
        return state_cost(args)
    if args.table:
        args.batch = min(args.batch, 128)
        return table_vs_prefix(args)
    if args.device == "cpu":
        args.batch = min(args.batch, 128)
    if args.device == "cuda":
        return gpu(args)
    cpu(args)
    state_cost(args)


if __name__ == "__main__":
    main()
