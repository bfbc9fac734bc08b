"""What counts as an image: the one set of decode rules that make_shards, the training stream,
evaluation and batch inference apply, and the decode itself (bytes -> upright 8-bit RGB).

    formats    exactly ALLOWED_FORMATS (Pillow's names); anything else is "not an allowed image format"
    bytes      at most `max_object_mb` per object, decided from the listing's size before any read: a
               larger object is never read whole (a counted skip in make_shards, an error row in batch
               inference), so a task's memory is bounded by its concurrent reads x the cap
    pixels     Pillow's decompression-bomb limit (89.5 Mpx; VITRAY_MAX_IMAGE_PIXELS to change it), its
               warning an error: a skip with the reason, never a 1 GB decode in one task
    shape      the shorter side at least `min_side` px and the longer at most `max_aspect` times the
               shorter (see `DecodeRules`)
    EXIF       orientation applied (phone photos come out upright)
    modes      16-bit -> 8-bit by the top byte (not clipped), alpha composited on white, palette,
               CMYK, LA, 1-bit, YCbCr ... -> 8-bit RGB
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey half-image

ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "TGA", "ICO")  # JPEG covers phones' MPO
MAX_IMAGE_PIXELS = int(os.environ.get("VITRAY_MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS or 89_478_485))
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageDecodeError(ValueError):
    """An input that is not a decodable image, or too small to cut one patch from."""


def open_image(data: bytes) -> Image.Image:
    """Open (header only) encoded bytes by the decode rules; raises ImageDecodeError with the reason."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            if img.width * img.height > MAX_IMAGE_PIXELS:  # some decoders report their size late
                raise Image.DecompressionBombError("")
            return img
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageDecodeError(
            f"image larger than the decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels "
            "(VITRAY_MAX_IMAGE_PIXELS raises it)"
        ) from None
    except Exception as e:
        try:  # say which format it is when Pillow knows it but it is not allowed
            fmt = Image.open(io.BytesIO(data)).format
        except Exception:
            fmt = None
        if fmt:
            raise ImageDecodeError(
                f"image format {fmt} is not one of the allowed formats {', '.join(ALLOWED_FORMATS)}"
            ) from None
        raise ImageDecodeError(f"not an image Pillow can read ({type(e).__name__}: {e})") from None


def orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def display_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image is meant to be seen: EXIF orientation applied."""
    w, h = img.size
    return (h, w) if orientation(img) in TRANSPOSED else (w, h)


TO_RGB_CHUNK_PX = 1 << 18  # pixels converted at once from 16/32-bit: bounds the int64 copies to 2 MB each


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB: 16/32-bit integer by the top byte, alpha over white, the rest by Pillow."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        peak = 65535 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        out = np.empty(a.shape, np.uint8)
        rows = max(1, TO_RGB_CHUNK_PX // max(a.shape[1], 1))  # int64 working copies of a few rows, not the image
        for r in range(0, a.shape[0], rows):
            block = np.clip(a[r : r + rows].astype(np.int64), 0, peak)
            out[r : r + rows] = (block * 255 + peak // 2) // peak
        return Image.fromarray(out, "L").convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, np.float32)
        scale = 255.0 if a.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def upright(img: Image.Image, orient: int) -> Image.Image:
    return ImageOps.exif_transpose(img) if orient != 1 else img


def decode_rgb(data: bytes) -> Image.Image:
    """Fully decode by the rules: opened, loaded (catches truncation), upright, 8-bit RGB."""
    img = open_image(data)
    orient = orientation(img)
    try:
        img.load()
        return to_rgb(upright(img, orient))
    except Exception as e:
        raise ImageDecodeError(f"does not decode ({type(e).__name__}: {e})") from None


DEFAULT_MIN_SIDE = 16
DEFAULT_MAX_ASPECT = 20.0
DEFAULT_MAX_OBJECT_MB = 64.0


@dataclass(frozen=True)
class DecodeRules:
    """The limits both jobs apply to every input, with the same words for the same decision.

    min_side 16 px: every standard data set passes (MNIST, Fashion-MNIST and EMNIST are 28 px, CIFAR and
    SVHN 32, STL-10 96, ImageNet larger); every input is resized to the model's input anyway, so the rule
    is about content, not patches: below 16 px an upscaled image is mostly interpolation.
    max_aspect 20: a 16x4000 strip is a banner or a sensor dump; a center crop of it sees a sliver.
    max_object_mb 64: a photo is a few MB; a larger object in an image prefix is a mistake (a video, an
    archive), and reading it whole could kill the worker.
    """

    min_side: int = DEFAULT_MIN_SIDE
    max_aspect: float = DEFAULT_MAX_ASPECT
    max_object_mb: float = DEFAULT_MAX_OBJECT_MB

    def __post_init__(self):
        if self.min_side < 1:
            raise ValueError(f"--min-size must be at least 1 px, got {self.min_side}")
        if self.max_aspect < 1:
            raise ValueError(f"--max-aspect must be at least 1, got {self.max_aspect}")
        if self.max_object_mb <= 0:
            raise ValueError(f"--max-object-mb must be positive, got {self.max_object_mb}")

    def check_object_size(self, nbytes: int | None) -> None:
        """Before reading: an object larger than the cap is refused by its listed size."""
        if nbytes is not None and nbytes > self.max_object_mb * 1e6:
            raise ImageDecodeError(
                f"object of {nbytes / 1e6:.1f} MB is larger than --max-object-mb {self.max_object_mb:g}: not read"
            )

    def check_shape(self, width: int, height: int) -> None:
        short, long = min(width, height), max(width, height)
        if short < self.min_side:
            raise ImageDecodeError(
                f"image of {width}x{height} px is smaller than the minimum of {self.min_side} px per side (--min-size)"
            )
        if long > self.max_aspect * short:
            raise ImageDecodeError(
                f"image of {width}x{height} px is more than {self.max_aspect:g} times as long as it is wide "
                "(--max-aspect)"
            )

    def check(self, data: bytes) -> tuple[int, int, str]:
        """What make_shards keeps: within the cap, decodes by the rules, of an allowed shape.
        Returns (width, height, format) as displayed."""
        self.check_object_size(len(data))
        img = open_image(data)
        w, h = display_size(img)
        self.check_shape(w, h)
        fmt = (img.format or "").lower()
        decode_rgb(data)
        return w, h, fmt


JPEG_QUALITY = 90  # shard-time resizing re-encodes JPEGs at this quality (FFCV's default), 4:2:0 as cameras do


def shrink(data: bytes, max_side: int) -> tuple[bytes, int, int, str]:
    """Shard-time resizing: an image whose longer side exceeds `max_side` is decoded by the rules (upright,
    8-bit RGB), resized with its aspect kept (Pillow's antialiased Lanczos) and re-encoded in its kind:
    JPEG at JPEG_QUALITY, everything else as lossless PNG. Smaller images come back unchanged.
    Returns (bytes, width, height, format)."""
    img = open_image(data)
    w, h = display_size(img)
    fmt = (img.format or "").lower()
    if max(w, h) <= max_side:
        return data, w, h, fmt
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = decode_rgb(data).resize(size, Image.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    if fmt in ("jpeg", "mpo"):
        small.save(buf, "JPEG", quality=JPEG_QUALITY)
        fmt = "jpeg"
    else:
        small.save(buf, "PNG")
        fmt = "png"
    return buf.getvalue(), size[0], size[1], fmt
