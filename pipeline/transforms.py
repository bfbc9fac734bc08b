"""Image steps on CPU workers, one small named function each: decode -> crop box -> flip -> resize -> patchify.

Everything stays uint8 here; normalisation to float happens on the accelerator inside the model.
Crops are chosen in the source image's coordinates from its header alone, so JPEG draft mode can
decode at 1/2, 1/4 or 1/8 scale whenever the crop will be shrunk that much anyway.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps

log = logging.getLogger(__name__)
Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs beyond ~14k x 14k
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey half-image

Box = tuple[float, float, float, float]


class ImageDecodeError(ValueError):
    """An input that is not a decodable image, or too small to cut one patch from."""


def open_image(data: bytes) -> Image.Image:
    """Open (header only) encoded bytes; raises ImageDecodeError with the reason."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:
        raise ImageDecodeError(f"not an image Pillow can read ({type(e).__name__}: {e})") from None


def check_decodes(data: bytes) -> tuple[int, int, str]:
    """Fully decode once (catches truncation); returns (width, height, format)."""
    img = open_image(data)
    try:
        img.load()
    except Exception as e:
        raise ImageDecodeError(f"does not decode ({type(e).__name__}: {e})") from None
    return img.width, img.height, (img.format or "").lower()


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Box:
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


def center_crop_box(width: int, height: int, crop_fraction: float = 0.875) -> Box:
    """Resize-shorter-side-to size/crop_fraction then center-crop `size`, expressed as one box."""
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def crop_resize(img: Image.Image, box: Box, size: int, draft: bool = True, flip: bool = False,
                backend: str = "torch") -> np.ndarray:
    """Cut `box` out of an opened image, mirror it if `flip`, resize it to (size, size, 3) uint8 (antialiased bilinear).

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
    w, h = img.size
    if draft and img.format == "JPEG":
        cw, ch = box[2] - box[0], box[3] - box[1]
        img.draft("RGB", (math.ceil(w * size / cw), math.ceil(h * size / ch)))
        sx, sy = img.size[0] / w, img.size[1] / h
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    try:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if backend == "pil":
            out = img.resize((size, size), Image.BILINEAR, box=box)
            return np.asarray(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)
        img.load()
    except Exception as e:
        raise ImageDecodeError(f"does not decode ({type(e).__name__}: {e})") from None
    left, top = int(box[0]), int(box[1])
    right, bottom = max(left + 1, round(box[2])), max(top + 1, round(box[3]))
    crop = img.crop((left, top, right, bottom))
    if flip:  # Pillow mirrors whole pixels; numpy's [:, ::-1] copy is ~15x slower on HWC uint8
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _resize_torch(np.asarray(crop), size)


def _resize_torch(pixels: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3) uint8 with torch's antialiased bilinear uint8 kernel."""
    import torch  # a dependency of the project; imported on first use so header-only users stay light

    if pixels.shape[0] == size and pixels.shape[1] == size:
        return pixels
    # (1, 3, h, w) over HWC memory is channels-last: the layout torch's fast uint8 path wants.
    with warnings.catch_warnings():  # Pillow's arrays are read-only; interpolate only reads them
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
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


# RandAugment (Cubuk et al. 2020) as timm's `rand-m9-n2`: n ops drawn uniformly, magnitude m of 10.
def _level(m: float, hi: float, rng: np.random.Generator, signed: bool = True) -> float:
    v = m / 10.0 * hi
    return -v if signed and rng.random() < 0.5 else v


_FILL = (128, 128, 128)
RAND_AUGMENT_OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_level(m, 30, rng), fillcolor=_FILL),
    "Posterize": lambda img, m, rng: ImageOps.posterize(img, max(1, 8 - int(m / 10 * 4))),
    "Solarize": lambda img, m, rng: ImageOps.solarize(img, 256 - int(m / 10 * 256)),
    "Color": lambda img, m, rng: ImageEnhance.Color(img).enhance(1 + _level(m, 0.9, rng)),
    "Contrast": lambda img, m, rng: ImageEnhance.Contrast(img).enhance(1 + _level(m, 0.9, rng)),
    "Brightness": lambda img, m, rng: ImageEnhance.Brightness(img).enhance(1 + _level(m, 0.9, rng)),
    "Sharpness": lambda img, m, rng: ImageEnhance.Sharpness(img).enhance(1 + _level(m, 0.9, rng)),
    "ShearX": lambda img, m, rng: img.transform(img.size, Image.AFFINE, (1, _level(m, 0.3, rng), 0, 0, 1, 0), fillcolor=_FILL),
    "ShearY": lambda img, m, rng: img.transform(img.size, Image.AFFINE, (1, 0, 0, _level(m, 0.3, rng), 1, 0), fillcolor=_FILL),
    "TranslateX": lambda img, m, rng: img.transform(img.size, Image.AFFINE, (1, 0, _level(m, 0.45, rng) * img.width, 0, 1, 0), fillcolor=_FILL),
    "TranslateY": lambda img, m, rng: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, _level(m, 0.45, rng) * img.height), fillcolor=_FILL),
}


def rand_augment(pixels: np.ndarray, n: int, m: float, rng: np.random.Generator) -> np.ndarray:
    """Apply `n` RandAugment ops of magnitude `m` (0-10) to (H, W, 3) uint8, each with p=0.5 as timm."""
    img = Image.fromarray(pixels)
    names = list(RAND_AUGMENT_OPS)
    for i in rng.choice(len(names), size=n, replace=True):
        if rng.random() < 0.5:
            img = RAND_AUGMENT_OPS[names[i]](img, m, rng)
    return np.asarray(img)


@dataclass(frozen=True)
class ImageTransform:
    """decode -> crop (random-resized for training, center for eval) -> resize -> flip -> patchify.

    `__call__(data, rng)` returns (N, P*P*C) uint8; raises ImageDecodeError for bad input.
    """

    img_size: int
    patch_size: int
    train: bool
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    crop_fraction: float = 0.875
    draft: bool = True
    randaug_n: int = 0  # RandAugment ops per image (training only; 0: off)
    randaug_m: float = 9.0  # RandAugment magnitude, 0-10

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: "
                f"choose an img_size that is a multiple of {self.patch_size}"
            )

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        img = open_image(data)
        w, h = img.size
        if min(w, h) < self.patch_size:
            raise ImageDecodeError(f"image of {w}x{h} px is smaller than one {self.patch_size}x{self.patch_size} patch")
        if self.train:
            box = random_resized_crop_box(w, h, rng, self.scale, self.ratio)
        else:
            box = center_crop_box(w, h, self.crop_fraction)
        flip = self.train and self.hflip > 0 and rng.random() < self.hflip
        try:
            pixels = crop_resize(img, box, self.img_size, self.draft, flip)
        except ImageDecodeError:
            raise
        except Exception as e:
            raise ImageDecodeError(f"does not decode ({type(e).__name__}: {e})") from None
        if self.train and self.randaug_n:
            pixels = rand_augment(np.ascontiguousarray(pixels), self.randaug_n, self.randaug_m, rng)
        return patchify(pixels, self.patch_size)
