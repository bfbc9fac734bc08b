"""The DeiT-style train step (random erasing + Mixup/CutMix on the device), before and after the patch path.

(a) before: uint8 patches -> normalise -> unpatchify to images -> erase + mix on images -> the model
    cuts them into patches again (what the loop did until the mixing moved onto patches);
(b) now:    uint8 patches -> normalise -> erase + mix on the patches -> the model takes them as they are.
Both draw from the same seeded generator, so they do the same augmentation work; the script checks that
(b)'s model input equals (a)'s images cut into patches before it times anything.
  python bench/train.py --deit-step                       # CPU, vit_small_patch16_224, batch 32
  python bench/train.py --deit-step --device cuda --batch 256
"""

import math
import statistics
import time

import torch
import torch.nn.functional as F

import vit_model
from pipeline.training.mixing import Mixer, cutmix_box, random_erase_, soft_target_cross_entropy


def _erase_images_(images: torch.Tensor, prob: float, gen: torch.Generator) -> None:
    """The image-space random erasing the loop used before (same draws as `random_erase_`)."""
    b, c, h, w = images.shape
    draws = torch.rand(b, generator=gen)
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    for i in range(b):
        if draws[i] >= prob:
            continue
        for _ in range(10):
            u = torch.rand(3, generator=gen).tolist()
            area = h * w * (0.02 + (1 / 3 - 0.02) * u[0])
            aspect = math.exp(lo + (hi - lo) * u[1])
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if eh < h and ew < w:
                top = int(torch.randint(0, h - eh + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - ew + 1, (1,), generator=gen))
                images[i, :, top : top + eh, left : left + ew] = torch.randn((c, eh, ew), generator=gen).to(images)
                break


def _mix_images(mixer: Mixer, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
    """The image-space Mixup/CutMix the loop used before (same draws as `Mixer.__call__`)."""
    targets = F.one_hot(labels, mixer.num_classes).float() * (1 - mixer.smoothing) + mixer.smoothing / mixer.num_classes
    lam, kind = mixer._draw(gen)
    if kind == "mixup":
        images = images.mul(lam).add_(images.flip(0).mul(1 - lam))
    elif kind == "cutmix":
        h, w = images.shape[-2:]
        top, bottom, left, right = cutmix_box(h, w, lam, gen)
        images = images.clone()
        images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    return images, targets * lam + targets.flip(0) * (1 - lam)


def _augment_before(model, patches, labels, mixer, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    images = vit_model.unpatchify(model.normalize(patches), cfg.patch_size, cfg.in_chans)
    _erase_images_(images, 0.25, gen)
    return _mix_images(mixer, images, labels, gen)


def _augment_now(model, patches, labels, mixer, seed):
    gen = torch.Generator().manual_seed(seed)
    layout = {"patch_size": model.cfg.patch_size, "in_chans": model.cfg.in_chans}
    x = model.normalize(patches)
    random_erase_(x, 0.25, gen, **layout)
    r = mixer(x, labels, None, gen, **layout)
    return r.patches, r.targets


def deit_step(args) -> None:
    device = torch.device(args.device)
    name = "vit_small_patch16_224" if args.model == "vit_base_patch16_224" and device.type == "cpu" else args.model
    batch = args.batch if device.type == "cuda" else min(args.batch, 32)
    model = vit_model.create_model(name, num_classes=1000).to(device)
    cfg = model.cfg
    torch.manual_seed(0)
    patches = torch.randint(0, 256, (batch, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    mixer = Mixer(1000, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, smoothing=0.1)
    for seed in range(8):  # the same work: (b)'s input is (a)'s images cut into patches
        a, ta = _augment_before(model, patches, labels, mixer, seed)
        b, tb = _augment_now(model, patches, labels, mixer, seed)
        torch.testing.assert_close(b, vit_model.patchify(a, cfg.patch_size), rtol=0, atol=1e-6)
        torch.testing.assert_close(ta, tb)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, repeat):
        times = []
        for i in range(repeat):
            sync()
            t0 = time.perf_counter()
            fn(i)
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def step(augment):
        def run(i):
            x, targets = augment(model, patches, labels, mixer, i)
            with amp:
                loss = soft_target_cross_entropy(model(x).float(), targets).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    repeat = args.steps if device.type == "cuda" else 6
    aug_a = timed(lambda i: _augment_before(model, patches, labels, mixer, i), 20)
    aug_b = timed(lambda i: _augment_now(model, patches, labels, mixer, i), 20)
    step_a = timed(step(_augment_before), repeat)
    step_b = timed(step(_augment_now), repeat)
    print(f"DeiT-style step, {name}, batch {batch}, {device.type}: erasing p=0.25, Mixup 0.8 / CutMix 1.0")
    print(
        f"  augmentation alone: (a) round trip {aug_a * 1000:7.2f} ms | (b) on patches {aug_b * 1000:7.2f} ms "
        f"-> {aug_a / aug_b:.2f}x"
    )
    print(f"  whole train step:   (a) {step_a * 1000:7.1f} ms | (b) {step_b * 1000:7.1f} ms -> {step_a / step_b:.3f}x")
