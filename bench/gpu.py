"""The GPU numbers in one run, without Ray (the GPU machine's image has PyTorch and no Ray): writes
bench/results/gpu-<date>.json itself.

    train   ViT-B/16 step: uint8 patches through the model's own normalisation, label-smoothed
            cross-entropy, backward, fused AdamW, bf16 autocast; eager and torch.compile, batch 128 and
            256: img/s, MFU (vit_model's FLOPs against the device's dense bf16 peak), peak memory
    infer   the predictor's forward in bf16 under inference_mode; eager and compiled, batch 256 and 1024
    attn    scaled_dot_product_attention at B/16's shape under each backend (flash, efficient, cudnn,
            math) and unrestricted: which ones run and how fast
    data    decode + random-resized-crop + flip + patchify per CPU core (the project's ImageTransform
            over the hymenoptera photos when ../shared/data is there, else synthetic 500x375 JPEGs);
            and torchvision.io.decode_jpeg on the GPU when torchvision imports
    mae     not measured here yet: recorded as null with the reason (bench/mae.py times an MAE step on CPU)

  PYTHONPATH=. python bench/gpu.py                       # on the GPU machine (nothing installed): ~6 min
  python bench/gpu.py --device cpu --smoke                # here (the project installed): every path, seconds
Each part that fails records its error and the run goes on: one call on a GPU machine gives every number
it can.
"""

import argparse
import datetime as dt
import io
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import vit_model

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "hymenoptera_data"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup: int, steps: int) -> float:
    """Seconds per call: `warmup` untimed calls (compilation, autotuning), then the mean of `steps`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _peak(device) -> float | None:
    return vit_model.gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _mem_gb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def train_step(name, batch, compiled, device, steps) -> dict:
    torch.manual_seed(0)
    model = vit_model.create_model(name).to(device)
    cfg = model.cfg
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(vit_model.param_groups(model, 0.05), lr=1e-4, fused=device.type == "cuda")
    patches = torch.randint(0, 256, (batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, device=device)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with amp:
            logits = fwd(patches).float()
        F.cross_entropy(logits, labels, label_smoothing=0.1).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    s = _timed(step, device, warmup=3 if compiled else 2, steps=steps)
    ips = batch / s
    peak = _peak(device)
    return {
        "model": name,
        "batch": batch,
        "compiled": compiled,
        "img_s": round(ips, 1),
        "mfu": round(vit_model.mfu(ips, cfg, peak, training=True), 4) if peak else None,
        "peak_mem_gb": _mem_gb(device),
    }


def infer_step(name, batch, compiled, device, steps) -> dict:
    model = vit_model.create_model(name).to(device).eval()
    cfg = model.cfg
    fwd = torch.compile(model) if compiled else model
    patches = torch.randint(0, 256, (batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with torch.inference_mode(), amp:
            fwd(patches).float().softmax(-1).topk(5)

    ips = batch / _timed(step, device, warmup=3 if compiled else 2, steps=steps)
    peak = _peak(device)
    mfu = round(vit_model.mfu(ips, cfg, peak, training=False), 4) if peak else None
    return {"model": name, "batch": batch, "compiled": compiled, "img_s": round(ips, 1), "mfu": mfu}


def attention(name, batch, device, steps) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = vit_model.variant_config(name)
    n, h = cfg.num_patches + 1, cfg.num_heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, h, n, cfg.embed_dim // h, device=device, dtype=dtype) for _ in range(3))
    out = {}
    backends = {
        "default": None,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "math": SDPBackend.MATH,
    }
    for label, backend in backends.items():
        try:
            if backend is None and label != "default":
                raise RuntimeError("not in this torch")

            def call(backend=backend):
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)

            out[label] = {"ms": round(_timed(call, device, 2, steps) * 1000, 3)}
        except Exception as e:  # a backend that cannot run this shape/dtype here says why
            out[label] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    return {"shape": [batch, h, n, cfg.embed_dim // h], "dtype": str(dtype), "backends": out}


def _photos(limit: int) -> list[bytes]:
    if PHOTOS.is_dir():
        return [p.read_bytes() for p in sorted(PHOTOS.rglob("*.jp*g"))[:limit]]
    from PIL import Image

    out = []
    for i in range(min(limit, 32)):
        buf = io.BytesIO()
        rgb = np.random.default_rng(i).integers(0, 255, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def data_side(device, seconds: float) -> dict:
    datas = _photos(400)
    result = {"images": len(datas), "source": "hymenoptera" if PHOTOS.is_dir() else "synthetic 500x375 JPEG"}
    try:
        from pipeline.data.transforms import ImageTransform  # the project's own transform (needs pydantic)

        t = ImageTransform(224, 16, train=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # one core, as one 1-CPU data task
        rng, n, t0 = np.random.default_rng(0), 0, time.process_time()
        while time.process_time() - t0 < seconds:
            t(datas[n % len(datas)], rng)
            n += 1
        torch.set_num_threads(threads)
        result["cpu_img_s_per_core"] = round(n / (time.process_time() - t0), 1)
        result["cpu_cores"] = os.cpu_count()
    except Exception as e:
        result["cpu_error"] = f"{type(e).__name__}: {e}"
    if device.type == "cuda":
        try:
            from torchvision.io import decode_jpeg

            tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas[:256]]
            s = _timed(lambda: decode_jpeg(tensors, device=device), device, 2, 5)
            result["gpu_decode_jpeg_img_s"] = round(len(tensors) / s, 1)
        except Exception as e:
            result["gpu_decode_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: every code path in seconds (CPU here)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for cuda")
    ap.add_argument("--out", default=None, help="default bench/results/gpu-<UTC date>.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --smoke to practise)")
    name = "vit_micro_patch4_32" if args.smoke else "vit_base_patch16_224"
    train_batches, infer_batches = ([4], [8]) if args.smoke else ([128, 256], [256, 1024])
    steps = 2 if args.smoke else 20
    compile_modes = [False] + ([True] if (args.compile if args.compile is not None else device.type == "cuda") else [])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_bf16_tflops": (_peak(device) or 0) / 1e12 or None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "train": [],
        "infer": [],
        "mae": None,
        "mae_note": "MAE (#24) is built; its GPU step is not measured by this script yet: bench/mae.py times it",
    }

    def part(label, fn, *a):
        t0 = time.perf_counter()
        try:
            r = fn(*a)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)[-600:]}
        print(f"{label:36s} {time.perf_counter() - t0:6.1f} s  {json.dumps(r)[:220]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return r

    for compiled in compile_modes:
        for b in train_batches:
            report["train"].append(
                part(f"train {name} b{b} compiled={compiled}", train_step, name, b, compiled, device, steps)
            )
        for b in infer_batches:
            report["infer"].append(
                part(f"infer {name} b{b} compiled={compiled}", infer_step, name, b, compiled, device, steps)
            )
    report["attn"] = part("attention backends", attention, name, train_batches[-1], device, steps)
    report["data"] = part("data side", data_side, device, 1.0 if args.smoke else 15.0)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{dt.date.today():%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
