"""An MAE train step against a supervised train step of the same ViT: images/s, measured in the same run.

The MAE encoder sees the class token and a quarter of the patches (mask ratio 0.75); its decoder sees every
patch but is narrow and shallow. The ratio printed is MAE images/s over supervised images/s (MAE's paper: an
epoch about 3x cheaper for ViT-L with its 8 x 512 decoder). Both steps: uint8 patches in, forward, loss,
backward, AdamW; the same batch, threads and model.
  PYTHONPATH=. python bench/mae.py                                     # CPU: the CIFAR recipe's model
  PYTHONPATH=. python bench/mae.py --model vit_base_patch16_224 --batch 64 --decoder 8x512 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import yaml

import vit_model
from pipeline.training.train_config import PretrainConfig
from vit_model.mae import create_mae, mae_flops_per_image


def timed(step, batch: int, repeats: int, sync) -> float:
    for _ in range(3):
        step()
    sync()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        rates.append(batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cifar10_mae.yaml", help="model and mae sections from here")
    ap.add_argument("--model", default=None, help="a variant instead of the config's model")
    ap.add_argument("--decoder", default=None, help="DEPTHxWIDTH instead of the config's (heads: width / 32)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    job = PretrainConfig.model_validate(yaml.safe_load(open(a.config)))  # the job's own schema and defaults
    mae_cfg = job.mae.autoencoder()
    if a.decoder:
        depth, width = (int(v) for v in a.decoder.split("x"))
        mae_cfg = replace(mae_cfg, decoder_depth=depth, decoder_width=width, decoder_heads=max(1, width // 32))
    name = a.model or job.model.name
    cfg = vit_model.variant_config(name, **(job.model.overrides(10) if not a.model else {"num_classes": 10}))
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    x = torch.randint(0, 256, (a.batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (a.batch,), device=dev)

    sup = vit_model.VisionTransformer(cfg).to(dev)
    opt_s = torch.optim.AdamW(sup.parameters(), 1e-3)

    def sup_step():
        with torch.autocast(**amp):
            loss = F.cross_entropy(sup(x).float(), y)
        loss.backward()
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)

    mae = create_mae(cfg, mae_cfg).to(dev)
    opt_m = torch.optim.AdamW(mae.parameters(), 1e-3, betas=(0.9, 0.95))
    gen = torch.Generator(device=dev).manual_seed(0)

    def mae_step():
        with torch.autocast(**amp):
            loss = mae(x, gen).mean()
        loss.backward()
        opt_m.step()
        opt_m.zero_grad(set_to_none=True)

    s = timed(sup_step, a.batch, a.repeats, sync)
    r = timed(mae_step, a.batch, a.repeats, sync)
    flops = mae_flops_per_image(cfg, mae_cfg) / vit_model.flops_per_image(cfg, training=True)
    print(
        f"{name} {cfg.num_patches} patches, decoder {mae_cfg.decoder_depth}x{mae_cfg.decoder_width}, "
        f"batch {a.batch}, {a.device} ({a.threads} threads)"
    )
    print(f"supervised step  {s:8.1f} images/s")
    print(f"MAE step         {r:8.1f} images/s   (mask ratio {mae_cfg.mask_ratio})")
    print(f"ratio MAE / supervised: {r / s:.2f}x   (matmul FLOPs per image: {flops:.2f}x of supervised)")


if __name__ == "__main__":
    main()
