"""Inference throughput: (a) a plain PyTorch loop over the same decoded images, (b) the Ray Data job
end to end from the local S3 server with 1 and 2 model replicas; then the cost of reading the
--since-last-run state after 1, 10 and 100 committed runs (the ledger against reading every published
row, the way it was done before). Needs `make up`.
  python bench/infer.py
  python bench/infer.py --state-only      # only the state-read cost (no Ray)
  python bench/infer.py --device cuda      # no Ray: ViT-B/16 bf16 inference images/s on a GPU
"""

import argparse
import io
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "cluster" / "local"))
import vit_model  # noqa: E402


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
    peak = 989e12 if any(k in torch.cuda.get_device_name() for k in ("H100", "H200")) else None
    mfu = f", MFU {ips * vit_model.flops_per_image(cfg) / peak * 100:.1f}%" if peak else ""
    print(f"{args.model} bf16 inference batch {args.batch} on {torch.cuda.get_device_name()}: {ips:.0f} images/s{mfu}")


def cpu(args):
    import stack

    os.environ.update(stack.env_vars())  # before importing ray: its auth mode is read at import
    import ray

    from pipeline import inference, storage
    from pipeline.inference import InferConfig
    from pipeline.transforms import ImageTransform

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    bucket = f"bench-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    m = vit_model.create_model(args.cpu_model, num_classes=10)
    w, c = vit_model.export_bytes(m, class_names=[str(i) for i in range(10)])
    storage.write_bytes(f"s3://{bucket}/model/model.safetensors", w)
    storage.write_bytes(f"s3://{bucket}/model/config.json", c)
    rng = np.random.default_rng(0)
    from PIL import Image

    datas = []
    for i in range(args.images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        datas.append(buf.getvalue())
        storage.write_bytes(f"s3://{bucket}/in/{i:05d}.jpg", datas[-1])
    # (a) plain loop: decode + eval transform + model, batch by batch, in this process
    t = ImageTransform(m.cfg.img_size, m.cfg.patch_size, train=False)
    m.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(datas), args.batch):
            x = torch.from_numpy(np.stack([t(d, None) for d in datas[i:i + args.batch]]))
            m(x).softmax(-1).topk(5)
    a = len(datas) / (time.perf_counter() - t0)
    print(f"(a) plain PyTorch loop             {a:8.1f} img/s ({len(datas)} images, {args.cpu_model})", flush=True)
    for replicas in (1, 2):
        r = inference.run(InferConfig(model=f"s3://{bucket}/model", input=f"s3://{bucket}/in", output=f"s3://{bucket}/out{replicas}",
                                      replicas=(replicas, replicas), batch_size=args.batch))
        end_to_end = r["inputs"] / r["elapsed_s"]
        print(f"(b) Ray Data job, {replicas} replica{'s' if replicas > 1 else ' '}       {r['images_per_s']:8.1f} img/s in the pipeline, "
              f"{end_to_end:8.1f} img/s end to end incl. listing and publish | pipeline/(a) {r['images_per_s'] / a:4.2f}", flush=True)
    storage.delete(f"s3://{bucket}", recursive=True)


def state_cost(args):
    """Seconds to read the --since-last-run state as history grows: the model's ledger (one object)
    against reading every published run's rows (embeddings included), measured in the same run."""
    import datetime as dt
    import statistics

    import pyarrow as pa
    import pyarrow.parquet as pq

    import stack

    os.environ.update(stack.env_vars())
    from pipeline import publish, storage
    from pipeline.predictor import output_schema
    from pipeline.lease import Lease

    bucket = f"bench-state-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/preds"
    layout, sha, per_run, dim = publish.Layout.of(out), "cd" * 32, args.state_rows, 192
    schema = output_schema(5, dim)
    now = dt.datetime.now(dt.timezone.utc)
    rng = np.random.default_rng(0)

    def timed(fn, repeat=5):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"--since-last-run state: {per_run} new images per run, embeddings of {dim} floats", flush=True)
    with Lease(out, "bench") as lease:
        for r in range(1, 101):
            rows = [{"image_uri": f"s3://in/r{r:03d}/{i:05d}.jpg", "label_id": None, "label": None, "pred_id": 1,
                     "pred": "1", "score": 0.5, "topk_ids": [1, 2, 3, 4, 5], "topk_scores": [0.5, 0.2, 0.1, 0.1, 0.1],
                     "embedding": rng.standard_normal(dim).astype(np.float32).tolist(), "error": None,
                     "model_uri": "m", "model_sha256": sha, "run_id": f"r{r:03d}", "inferred_at": now} for i in range(per_run)]
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
            staged = layout.staging(f"r{r:03d}").join("part-0.parquet.staged").uri
            storage.write_bytes(staged, buf.getvalue())
            publish.commit(layout, publish.plan_commit(layout, f"r{r:03d}", "2026-11-28", [staged], accuracy_report=None,
                                                       ledger=True, rows=per_run, inputs=per_run, errors=0, model_sha256=sha), lease)
            if r in (1, 10, 100):
                ledger = timed(lambda: publish.done_inputs(layout, sha))
                everything = timed(lambda: set(publish.read_published(out, sha).column("image_uri").to_pylist()), repeat=3)
                print(f"after {r:3d} runs ({r * per_run:6d} images): ledger {ledger * 1000:7.1f} ms | every published row "
                      f"{everything * 1000:8.1f} ms | ledger/every-row {ledger / everything:5.2f}", flush=True)
    storage.delete(f"s3://{bucket}", recursive=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cpu-model", default="vit_micro_patch4_32")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--state-rows", type=int, default=50, help="new images per committed run in the state-cost part")
    ap.add_argument("--state-only", action="store_true")
    args = ap.parse_args()
    if args.state_only:
        return state_cost(args)
    if args.device == "cpu":
        args.batch = min(args.batch, 128)
    if args.device == "cuda":
        return gpu(args)
    cpu(args)
    state_cost(args)


if __name__ == "__main__":
    main()
