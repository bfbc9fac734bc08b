"""Model speed: forward and forward+backward images/s and FLOP/s, against torch's own encoder.

  python bench/model.py                                  # CPU: micro variant and S/16, fp32
  python bench/model.py --device cuda --dtype bf16 --compile --models vit_base_patch16_224 --batch 256
The reference is `torch.nn.TransformerEncoder` (norm_first, GELU, batch_first) with the same shapes,
plus the same patch embedding and head, timed in the same run. Prints ratios, the fraction of the
measured matmul peak, and MFU on GPUs.
"""

import argparse
import time

import torch
from torch import nn

import vit_model


class ReferenceViT(nn.Module):
    """The same network built from torch.nn.TransformerEncoder: the baseline to beat."""

    def __init__(self, cfg: vit_model.ViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.p = cfg.patch_size
        self.embed = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, cfg.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.num_heads,
            int(d * cfg.mlp_ratio),
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
        return self.head(self.norm(self.encoder(x))[:, 0])


def matmul_peak(device, dtype, n=2048, reps=10):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, min_s=3.0, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - t0) / n


def bench_one(model, x, y, device, dtype, train):
    amp = dtype if device.type == "cuda" and dtype != torch.float32 else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda") if train else None

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            if train:
                loss = nn.functional.cross_entropy(model(x).float(), y)
        if train:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def fwd():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model(x)

    return time_it(step if train else fwd, device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--models", default="vit_micro_patch4_32,vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 (micro), 16 on CPU / 256 on GPU (others)")
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    peak_measured = matmul_peak(device, dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    peak_spec = vit_model.gpu_peak_flops(name) if device.type == "cuda" else None
    print(
        f"device {name}, dtype {args.dtype}, compile {args.compile}; measured matmul peak {peak_measured / 1e12:.3f} "
        "TFLOP/s" + (f", spec peak {peak_spec / 1e12:.0f} TFLOP/s" if peak_spec else "")
    )
    for mname in args.models.split(","):
        cfg = vit_model.variant_config(mname)
        batch = args.batch or (64 if cfg.img_size <= 64 else (256 if device.type == "cuda" else 16))
        x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
        y = torch.randint(0, cfg.num_classes, (batch,), device=device)
        ours = vit_model.create_model(mname).to(device)
        ref = ReferenceViT(cfg).to(device)
        if args.compile:
            ours, ref = torch.compile(ours), torch.compile(ref)
        for train in (False, True):
            flops = vit_model.flops_per_image(cfg, training=train) * batch
            t_ours = bench_one(ours.train(train), x, y, device, dtype, train)
            line = (
                f"{mname:24s} {'fwd+bwd' if train else 'forward':8s} batch {batch:4d}: ours {batch / t_ours:9.1f} "
                "img/s "
                f"{flops / t_ours / 1e12:7.3f} TFLOP/s ({flops / t_ours / peak_measured * 100:5.1f}% of measured "
                "matmul peak"
            )
            if peak_spec:
                line += f", MFU {vit_model.mfu(batch / t_ours, cfg, peak_spec, training=train) * 100:5.1f}%"
            line += ")"
            if not args.no_reference:
                t_ref = bench_one(ref.train(train), x, y, device, dtype, train)
                line += f" | reference {batch / t_ref:9.1f} img/s | ours/reference {t_ref / t_ours:5.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    main()
