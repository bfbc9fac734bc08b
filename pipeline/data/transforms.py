"""Image steps on CPU workers, one small named function each, chained by `ImageTransform`:

    decode (open_image: allowed format, size limit, EXIF)
      -> crop box (random_resized_crop_box for training, center_crop_box for eval)
      -> crop + resize to img_size (+ horizontal flip for training)        crop_resize
      -> RandAugment (training, when `Augment.randaug_n` > 0)             rand_augment
      -> patchify (N, P*P*C)                                                patchify

The preprocessing spec is `ImageTransform.for_model(model_cfg, train, augment)`: the model's size,
patch, eval crop, interpolation and mean colour from its ViTConfig, the training augmentations from
`Augment` (the pretraining job's `data.*` flags). make_shards' checks, the training stream, evaluation,
batch inference and the figures all build their transform this way. Adding an augmentation is one
`Augment` field and one step function called from `ImageTransform.__call__`.

Everything stays uint8 here; normalisation to float happens on the accelerator inside the model.
Crops are chosen in the source image's coordinates from its header alone, so JPEG draft mode can
decode at 1/2, 1/4 or 1/8 scale whenever the crop will be shrunk that much anyway.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from pydantic import Field

from pipeline.core.config import Section
from pipeline.data.images import (
    TRANSPOSED,
    DecodeRules,
    ImageDecodeError,
    display_size,
    open_image,
    orientation,
    to_rgb,
    upright,
)
from vit_model import ViTConfig, check_patch_grid

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> Box:
    """Inception-style crop: area fraction in `scale`, aspect ratio log-uniform in `ratio`.

    Ten tries as torchvision does, then a center crop clamped to the ratio range.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.integers(0, width - w + 1)
            top = rng.integers(0, height - h + 1)
            return float(left), float(top), float(left + w), float(top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def center_crop_box(width: int, height: int, crop_fraction: float = 0.9) -> Box:
    """Resize-shorter-side-to size/crop_fraction then center-crop `size`, expressed as one box."""
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def crop_resize(
    img: Image.Image,
    box: Box,
    size: int,
    draft: bool = True,
    flip: bool = False,
    backend: str = "torch",
    interpolation: str = "bicubic",
) -> np.ndarray:
    """Cut `box` out of an opened image, mirror it if `flip`, resize it to (size, size, 3) uint8
    (antialiased `interpolation`: bicubic, timm's ViT default, or bilinear).

    With `draft`, a JPEG is decoded directly at the smallest 1/2^k scale that still leaves the
    crop at least `size` pixels, which skips most of the decode work on large photos.
    `backend="torch"` resizes with torch's vectorised uint8 antialiased kernel (the one torchvision's
    v2 transforms use; about 2.5x faster than Pillow's here, within 1 level of Pillow's output on
    99.7% of pixels); `"pil"` uses Pillow's resize with the box directly. One backend everywhere keeps
    training, evaluation and batch inference on identical pixels. The torch kernel pays off with one
    intra-op thread, as in Ray's 1-CPU data tasks; a plain loop in a process whose torch pool has
    several threads spends more CPU waking them per image (`torch.set_num_threads(1)` there).
    """
    if backend not in ("torch", "pil"):  # before any decoding work
        raise ValueError(f"unknown resize backend {backend!r}: use 'torch' or 'pil'")
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"unknown interpolation {interpolation!r}: use 'bicubic' or 'bilinear'")
    orient = orientation(img)
    swap = orient in TRANSPOSED
    w, h = img.size  # as stored; `box` is in displayed (upright) coordinates
    dw, dh = (h, w) if swap else (w, h)
    if draft and img.format in ("JPEG", "MPO"):
        cw, ch = box[2] - box[0], box[3] - box[1]
        img.draft("RGB", (math.ceil(w * size / (ch if swap else cw)), math.ceil(h * size / (cw if swap else ch))))
    try:
        img.load()
        img = to_rgb(upright(img, orient))
    except Exception as e:
        raise ImageDecodeError(f"does not decode ({type(e).__name__}: {e})") from None
    sx, sy = img.size[0] / dw, img.size[1] / dh  # < 1 where draft decoded at a reduced scale
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if backend == "pil":
        out = img.resize((size, size), Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR, box=box)
        return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)
    left, top = int(box[0]), int(box[1])
    right, bottom = max(left + 1, round(box[2])), max(top + 1, round(box[3]))
    crop = img.crop((left, top, right, bottom))
    if flip:  # Pillow mirrors whole pixels; numpy's [:, ::-1] copy is ~15x slower on HWC uint8
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _resize_torch(np.asarray(crop), size, interpolation)


def _resize_torch(pixels: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3) uint8 with torch's antialiased uint8 kernels (bicubic or bilinear)."""
    import torch  # a dependency of the project; imported on first use so header-only users stay light

    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    # (1, 3, h, w) over HWC memory is channels-last: the layout torch's fast uint8 path wants.
    with warnings.catch_warnings():  # Pillow's arrays are read-only; interpolate only reads them
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=(size, size), mode=interpolation, antialias=True, align_corners=False)
    return y[0].permute(1, 2, 0).contiguous().numpy()


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (N, P*P*C), patches row-major, pixels (row, col, channel) inside.

    Same order as `vit_model.patchify`, so the model's linear patch embedding sees the same vector.
    """
    h, w, c = image.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = image.reshape(h // p, p, w // p, p, c).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(x.reshape((h // p) * (w // p), p * p * c))


def unpatchify(patches: np.ndarray, patch_size: int, channels: int = 3) -> np.ndarray:
    """(N, P*P*C) -> (H, W, C) for a square grid; the inverse of `patchify`."""
    n = patches.shape[0]
    g, p = math.isqrt(n), patch_size
    return patches.reshape(g, g, p, p, channels).transpose(0, 2, 1, 3, 4).reshape(g * p, g * p, channels)


# RandAugment (Cubuk et al. 2020) with timm's semantics, e.g. `rand-m9-mstd0.5-inc1` (DeiT): n ops drawn
# uniformly with replacement, each applied with p=0.5 at a magnitude drawn from N(m, mstd) clipped to
# [0, 10]; with `increasing`, every op gets stronger as the magnitude grows (posterize keeps 4 - int(0.4 m)
# bits, solarize's threshold falls, enhancements move further from 1). Geometric ops resample with the
# model's interpolation and fill with the mean colour, as timm's `img_mean`.
def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() < 0.5 else v


def _enhance(m: float, rng, increasing: bool) -> float:
    if increasing:
        return max(0.1, 1.0 + _signed(m / 10 * 0.9, rng))
    return m / 10 * 1.8 + 0.1


def posterize_bits(m: float, increasing: bool) -> int:
    """Bits posterize keeps: 4 down to 0 as m grows (increasing), else 0 up to 4 (timm's two level maps)."""
    return 4 - int(m / 10 * 4) if increasing else int(m / 10 * 4)


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep `bits` bits per channel. 0 bits (magnitude 10 on timm's increasing map, which m9 + noise reaches)
    is a black image, as Pillow gave before it began refusing bits < 1 (which stopped an epoch)."""
    return ImageOps.posterize(img, bits) if bits >= 1 else img.point([0] * 256 * len(img.getbands()))


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _affine(img: Image.Image, matrix, resample, fill) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


RAND_AUGMENT_OPS = {  # name -> fn(img, magnitude, rng, increasing, resample, fill)
    "AutoContrast": lambda img, m, rng, inc, rs, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng, inc, rs, fill: ImageOps.equalize(img),
    "Invert": lambda img, m, rng, inc, rs, fill: ImageOps.invert(img),
    "Rotate": lambda img, m, rng, inc, rs, fill: img.rotate(_signed(m / 10 * 30, rng), resample=rs, fillcolor=fill),
    "Posterize": lambda img, m, rng, inc, rs, fill: _posterize(img, posterize_bits(m, inc)),
    "Solarize": lambda img, m, rng, inc, rs, fill: ImageOps.solarize(
        img, (256 - int(m / 10 * 256)) if inc else int(m / 10 * 256)
    ),
    "SolarizeAdd": lambda img, m, rng, inc, rs, fill: _solarize_add(img, int(m / 10 * 110)),
    "Color": lambda img, m, rng, inc, rs, fill: ImageEnhance.Color(img).enhance(_enhance(m, rng, inc)),
    "Contrast": lambda img, m, rng, inc, rs, fill: ImageEnhance.Contrast(img).enhance(_enhance(m, rng, inc)),
    "Brightness": lambda img, m, rng, inc, rs, fill: ImageEnhance.Brightness(img).enhance(_enhance(m, rng, inc)),
    "Sharpness": lambda img, m, rng, inc, rs, fill: ImageEnhance.Sharpness(img).enhance(_enhance(m, rng, inc)),
    "ShearX": lambda img, m, rng, inc, rs, fill: _affine(img, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0), rs, fill),
    "ShearY": lambda img, m, rng, inc, rs, fill: _affine(img, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0), rs, fill),
    "TranslateXRel": lambda img, m, rng, inc, rs, fill: _affine(
        img, (1, 0, _signed(m / 10 * 0.45, rng) * img.width, 0, 1, 0), rs, fill
    ),
    "TranslateYRel": lambda img, m, rng, inc, rs, fill: _affine(
        img, (1, 0, 0, 0, 1, _signed(m / 10 * 0.45, rng) * img.height), rs, fill
    ),
}


def rand_augment(
    pixels: np.ndarray,
    n: int,
    m: float,
    rng: np.random.Generator,
    *,
    mstd: float = 0.5,
    increasing: bool = True,
    interpolation: str = "bicubic",
    fill=(128, 128, 128),
) -> np.ndarray:
    """Apply `n` RandAugment ops of magnitude `m` (0-10, noise `mstd`) to (H, W, 3) uint8, each with p=0.5."""
    img = Image.fromarray(pixels)
    names = list(RAND_AUGMENT_OPS)
    resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    for i in rng.choice(len(names), size=n, replace=True):
        if rng.random() >= 0.5:
            continue
        mag = rng.normal(m, mstd) if mstd > 0 else m
        img = RAND_AUGMENT_OPS[names[i]](img, min(max(mag, 0.0), 10.0), rng, increasing, resample, tuple(fill))
    return np.asarray(img)


class Augment(Section):
    """The training augmentations on CPU workers, in the order they run; each field is also a flag of the
    pretraining job (`--data.<field>`, `DataSection` inherits them). Evaluation uses none of them."""

    scale_min: float = Field(0.08, gt=0, le=1, description="random-resized-crop minimum area fraction")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    randaug_n: int = Field(0, ge=0, le=6, description="RandAugment ops per training image (0: off; DeiT: 2)")
    randaug_m: float = Field(9.0, ge=0, le=10, description="RandAugment magnitude (DeiT: 9)")
    randaug_mstd: float = Field(0.5, ge=0, description="RandAugment magnitude noise std (timm's mstd; DeiT: 0.5)")
    randaug_increasing: bool = Field(True, description="timm's 'inc1' op set: every op stronger as the magnitude grows")

    @classmethod
    def of(cls, section: Section) -> Augment:
        """The augmentation fields of a larger section (the job's `data`)."""
        return cls(**{k: getattr(section, k) for k in cls.model_fields})


@dataclass(frozen=True)
class ImageTransform:
    """The preprocessing spec: encoded image -> (N, P*P*C) uint8, by the steps in the module docstring.

    `__call__(data, rng)` returns (N, P*P*C) uint8; raises ImageDecodeError for bad input. The size
    rule (img_size a multiple of patch_size) is `vit_model.check_patch_grid`, ViTConfig's own.
    """

    img_size: int
    patch_size: int
    train: bool
    crop_fraction: float = 0.9  # eval center crop (timm's crop_pct); the model's config says which
    interpolation: str = "bicubic"  # resize and RandAugment's geometric ops
    fill: tuple[int, int, int] = (128, 128, 128)  # RandAugment's fill: the model's mean colour
    augment: Augment = field(default_factory=Augment)  # training only
    rules: DecodeRules = field(
        default_factory=DecodeRules
    )  # shape limits (a shard set's own: `StreamConfig.under_rules_of`)
    draft: bool = True  # JPEG draft decoding when the crop will be shrunk that much anyway
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect range

    def __post_init__(self):
        check_patch_grid(self.img_size, self.patch_size)

    @classmethod
    def for_model(
        cls, mcfg: ViTConfig, train: bool, augment: Augment | None = None, rules: DecodeRules | None = None, **kw
    ) -> ImageTransform:
        """What a model of `mcfg` expects: its size, patch, eval crop, interpolation and mean colour."""
        return cls(
            mcfg.img_size,
            mcfg.patch_size,
            train,
            crop_fraction=mcfg.crop_pct,
            interpolation=mcfg.interpolation,
            fill=tuple(round(255 * m) for m in mcfg.mean[:3]),
            augment=augment or Augment(),
            rules=rules or DecodeRules(),
            **kw,
        )

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        img = open_image(data)
        w, h = display_size(img)
        if min(w, h) < self.patch_size:
            raise ImageDecodeError(f"image of {w}x{h} px is smaller than one {self.patch_size}x{self.patch_size} patch")
        self.rules.check_shape(w, h)
        aug = self.augment
        if self.train:
            box = random_resized_crop_box(w, h, rng, (aug.scale_min, 1.0), self.ratio)
        else:
            box = center_crop_box(w, h, self.crop_fraction)
        flip = self.train and aug.hflip > 0 and rng.random() < aug.hflip
        try:
            pixels = crop_resize(img, box, self.img_size, self.draft, flip, interpolation=self.interpolation)
        except ImageDecodeError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"does not decode ({type(e).__name__}: {e})") from None
        if self.train and aug.randaug_n:
            pixels = rand_augment(
                np.ascontiguousarray(pixels),
                aug.randaug_n,
                aug.randaug_m,
                rng,
                mstd=aug.randaug_mstd,
                increasing=aug.randaug_increasing,
                interpolation=self.interpolation,
                fill=self.fill,
            )
        return patchify(pixels, self.patch_size)


def decode_to_patches(
    images: list, keys, transform: ImageTransform, rng: np.random.Generator | list | None, failed: list | None = None
):
    """Encoded images -> ((B, N, P*P*C) uint8 patches, (B,) bool valid, [error or ""] per row). `rng`: one
    generator for the batch, or one per row (a sample's augmentation then depends on its own seed only).
    `failed`: a reason per row found before decoding ("" for none; an unreadable or oversized object),
    kept and logged as it is instead of decoding.

    The one decode step of training, evaluation and batch inference: a sample that cannot be used
    keeps its row, marked invalid with the reason, and is logged with its key.
    """
    n = len(images)
    patches = np.zeros((n, (transform.img_size // transform.patch_size) ** 2, transform.patch_size**2 * 3), np.uint8)
    valid = np.zeros(n, bool)
    errors = [""] * n
    for i, data in enumerate(images):
        try:
            if failed is not None and failed[i]:
                raise ImageDecodeError(failed[i])
            if data is None:
                raise ImageDecodeError("sample has no image member")
            patches[i] = transform(bytes(data), rng[i] if isinstance(rng, list) else rng)
            valid[i] = True
        except ImageDecodeError as e:
            errors[i] = str(e)
            log.warning("cannot use sample %s: %s", keys[i] if keys is not None else i, e)
    return patches, valid, errors
