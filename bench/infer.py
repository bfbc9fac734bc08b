"""Inference throughput: (a) a plain PyTorch loop over the same decoded images, (b) the Ray Data job
end to end from the local S3 server with 1 and 2 model replicas. Needs `make up`.
  python bench/infer.py
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--cpu-model", default="vit_micro_patch4_32")
    ap.add_argument("--images", type=int, default=2000)
    args = ap.parse_args()
    if args.device == "cpu":
        args.batch = min(args.batch, 128)
    gpu(args) if args.device == "cuda" else cpu(args)


if __name__ == "__main__":
    main()
