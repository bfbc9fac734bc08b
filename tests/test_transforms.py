"""The CPU image steps, one at a time, on the local filesystem."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vit_model
from pipeline.data import images
from pipeline.data import transforms as T


def _jpeg(w, h, seed=0, quality=90):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_random_resized_crop_box_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(500):
        l, t, r, b = T.random_resized_crop_box(500, 375, rng)
        w, h = r - l, b - t
        assert 0 <= l < r <= 500 and 0 <= t < b <= 375
        area = w * h / (500 * 375)
        assert 0.07 <= area <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02 or area > 0.9


def test_patchify_matches_model_patchify_and_inverts():
    img = np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    p = T.patchify(img, 8)
    assert p.shape == (24, 192) and p.dtype == np.uint8
    torch_p = vit_model.patchify(torch.from_numpy(img).permute(2, 0, 1)[None], 8)[0].numpy()
    assert np.array_equal(p, torch_p)
    sq = img[:, :32]
    assert np.array_equal(T.unpatchify(T.patchify(sq, 8), 8), sq)


def test_eval_transform_at_full_crop_keeps_pixels():
    img = np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    t = T.ImageTransform(32, 4, train=False, crop_fraction=1.0)
    assert np.array_equal(T.unpatchify(t(buf.getvalue(), None), 4), img)


def test_draft_mode_decodes_large_jpeg_smaller_with_same_output_shape():
    data = _jpeg(2000, 1500)
    img = images.open_image(data)
    out = T.crop_resize(img, (0, 0, 2000, 1500), 224, draft=True)
    assert out.shape == (224, 224, 3)
    img2 = images.open_image(data)
    img2.draft("RGB", (2000 * 224 // 2000 + 1, 1500 * 224 // 1500 + 1))
    assert img2.size[0] < 2000  # libjpeg scaled the decode down
    full = T.crop_resize(images.open_image(data), (0, 0, 2000, 1500), 224, draft=False)
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 40  # same picture, noise image: loose


def _photo_like(w, h):
    """A smooth gradient with a little noise: what photos look like to a resize kernel."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(2)
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("flip", [False, True])
def test_torch_and_pillow_resize_agree_and_flip_mirrors(flip):
    data = _photo_like(500, 375)
    box = (37.0, 20.0, 337.0, 345.0)
    img = images.open_image
    by = {b: T.crop_resize(img(data), box, 224, flip=flip, backend=b).astype(int) for b in ("torch", "pil")}
    assert by["torch"].shape == by["pil"].shape == (224, 224, 3)
    diff = np.abs(by["torch"] - by["pil"])
    assert diff.mean() < 0.5 and (diff <= 1).mean() > 0.99
    if flip:
        plain = T.crop_resize(images.open_image(data), box, 224, backend="torch").astype(int)
        assert np.abs(by["torch"] - plain[:, ::-1]).max() <= 1
    with pytest.raises(ValueError, match="unknown resize backend"):
        T.crop_resize(images.open_image(data), box, 224, backend="cv2")


def test_resize_pixels_do_not_depend_on_the_callers_thread_count():
    # Ray's data tasks run torch with 1 thread, a CPU inference replica or a test process with more:
    # training, evaluation and batch inference must still see identical pixels.
    import torch

    data, box, before = _photo_like(640, 480), (11.0, 7.0, 611.0, 457.0), torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = T.crop_resize(images.open_image(data), box, 224, flip=True)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(out[1], out[2])


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"this is text, not a jpeg", "not an image"),
        (_jpeg(64, 64)[:1500], "does not decode"),
    ],
)
def test_bad_inputs_raise_image_decode_error(data, reason):
    t = T.ImageTransform(32, 4, train=True)
    with pytest.raises(images.ImageDecodeError, match=reason):
        if reason == "does not decode":
            images.DecodeRules().check(data)
        t(data, np.random.default_rng(0))


def test_image_smaller_than_a_patch_is_refused():
    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, "PNG")
    with pytest.raises(images.ImageDecodeError, match="smaller than one 16x16 patch"):
        T.ImageTransform(224, 16, train=False)(buf.getvalue(), None)


def test_patch_size_must_divide_image_size():
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        T.ImageTransform(100, 16, train=True)


def test_rand_augment_changes_pixels_keeps_shape_and_every_op_runs():
    img = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    assert len(T.RAND_AUGMENT_OPS) == 15  # timm's _RAND_INCREASING_TRANSFORMS, Cutout left to random erasing
    for name, op in T.RAND_AUGMENT_OPS.items():
        out = np.asarray(op(Image.fromarray(img), 9, rng, True, Image.BICUBIC, (124, 116, 104)))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
    # two ops, each applied with p=0.5: over 200 draws about a quarter leave the image as it was
    unchanged = sum(np.array_equal(T.rand_augment(img, 2, 9, rng), img) for _ in range(200))
    assert 25 < unchanged < 80
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    t = T.ImageTransform(32, 4, train=True, augment=T.Augment(randaug_n=2, randaug_m=9))
    assert t(buf.getvalue(), rng).shape == (64, 48)


class _Sign:
    """An rng whose draws are fixed: `_signed` keeps the sign for 0.9 and flips it for 0.1."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


def test_rand_augment_ops_give_fixed_expected_pixels():
    """Each op on a known image against pixels written from the op's definition (not from PIL)."""
    values = np.array([0, 50, 100, 150, 200, 250], dtype=np.uint8)
    img = np.stack([values, values[::-1], np.full(6, 100, np.uint8)], axis=-1)[None]  # (1, 6, 3)

    def op(name, m, sign=0.9, source=img):
        out = T.RAND_AUGMENT_OPS[name](Image.fromarray(source), m, _Sign(sign), True, Image.NEAREST, (7, 8, 9))
        return np.asarray(out)

    assert np.array_equal(op("Invert", 5), 255 - img)
    assert np.array_equal(op("Posterize", 9), img & 0b10000000)  # inc1 at m9 keeps one bit
    assert np.array_equal(op("Solarize", 5), np.where(img >= 128, 255 - img, img))  # threshold 128
    assert np.array_equal(op("SolarizeAdd", 10), np.where(img < 128, np.minimum(img.astype(int) + 110, 255), img))
    assert np.array_equal(op("Brightness", 10, sign=0.1), img // 10)  # factor 1 - 0.9 = 0.1
    # per channel (x - lo) * 255 / (hi - lo), truncated; the constant channel is left as it is
    auto = img.astype(float)
    for c in (0, 1):
        auto[..., c] = np.floor(auto[..., c] * 255 / 250)
    assert np.array_equal(op("AutoContrast", 5), auto.astype(np.uint8))
    # translate by 0.45 of the width at m10: 9 of 20 columns, the rest filled with the fill colour
    wide = np.random.default_rng(0).integers(0, 255, (3, 20, 3), dtype=np.uint8)
    right = op("TranslateXRel", 10, source=wide)
    assert np.array_equal(right[:, :11], wide[:, 9:]) and (right[:, 11:] == (7, 8, 9)).all()
    left = op("TranslateXRel", 10, sign=0.1, source=wide)
    assert np.array_equal(left[:, 9:], wide[:, :11]) and (left[:, :9] == (7, 8, 9)).all()
    down = op("TranslateYRel", 10, source=wide.transpose(1, 0, 2).copy())
    assert np.array_equal(down[:11], wide.transpose(1, 0, 2)[9:])


def test_rand_augment_follows_timm_rand_m9_mstd05_inc1(monkeypatch):
    # posterize: inc1 keeps 4 - int(0.4 m) bits (1 at m9), the plain map int(0.4 m) (3 at m9)
    assert T.posterize_bits(9, True) == 1 and T.posterize_bits(9, False) == 3 and T.posterize_bits(0, True) == 4
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (4, 1, 3))
    post = np.asarray(T.RAND_AUGMENT_OPS["Posterize"](Image.fromarray(ramp), 9, None, True, Image.BICUBIC, (0, 0, 0)))
    assert len(np.unique(post)) == 2  # one bit kept
    # m9 with mstd 0.5 reaches the clamp at 10: 0 bits, a black image (Pillow refuses bits < 1; seen stopping
    # an epoch of real CIFAR photos), never an exception
    black = np.asarray(T.RAND_AUGMENT_OPS["Posterize"](Image.fromarray(ramp), 10, None, True, Image.BICUBIC, (0,) * 3))
    assert T.posterize_bits(10, True) == 0 and not black.any() and black.shape == ramp.shape
    for seed in range(300):  # the whole op set at the clamp, every op drawn many times
        out = T.rand_augment(ramp, 2, 10, np.random.default_rng(seed), mstd=0.5)
        assert out.shape == ramp.shape and out.dtype == np.uint8
    # solarize (inc): threshold 256 - int(25.6 m); m=10 inverts nothing below 0 -> every pixel >= 0 inverted
    sol = np.asarray(T.RAND_AUGMENT_OPS["Solarize"](Image.fromarray(ramp), 10, None, True, Image.BICUBIC, (0, 0, 0)))
    assert np.array_equal(sol, 255 - ramp)
    # increasing enhancements: factor 1 +- 0.09 m, so m=0 is the identity
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        out = T.RAND_AUGMENT_OPS[name](Image.fromarray(img), 0, rng, True, Image.BICUBIC, (0, 0, 0))
        assert np.array_equal(np.asarray(out), img), name
    # magnitude noise: each applied op draws its magnitude from N(m, mstd) clipped to [0, 10]; about half apply
    seen = []
    monkeypatch.setattr(T, "RAND_AUGMENT_OPS", {"Record": lambda im, m, *a: seen.append(m) or im})
    T.rand_augment(img, 400, 9, np.random.default_rng(0), mstd=0.5)
    assert 150 < len(seen) < 250 and 0.4 < np.std(seen) < 0.6 and abs(np.mean(seen) - 9) < 0.1 and max(seen) <= 10
    seen.clear()
    T.rand_augment(img, 50, 9, np.random.default_rng(0), mstd=0.0)
    assert set(seen) == {9}
    monkeypatch.undo()
    ramp_img = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    # geometric ops fill with the given colour and resample with the given filter
    rot = np.asarray(
        T.RAND_AUGMENT_OPS["Rotate"](
            Image.fromarray(ramp_img), 10, np.random.default_rng(0), True, Image.BICUBIC, (1, 2, 3)
        )
    )
    assert tuple(rot[0, 0]) == (1, 2, 3)


def test_exif_rotated_photo_comes_out_upright():
    upright = np.zeros((64, 40, 3), np.uint8)
    upright[:32] = 255  # portrait: bright top half, dark bottom half
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as a phone stores it: landscape
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    assert images.open_image(data).size == (64, 40) and images.display_size(images.open_image(data)) == (40, 64)
    decoded = np.asarray(images.decode_rgb(data)).astype(int)
    assert decoded.shape == (64, 40, 3) and decoded[:28].mean() > 240 and decoded[36:].mean() < 15
    for draft in (True, False):
        pixels = T.unpatchify(T.ImageTransform(32, 4, train=False, crop_fraction=1.0, draft=draft)(data, None), 4)
        assert pixels[:12].mean() > 240 and pixels[20:].mean() < 15, draft


def test_sixteen_bit_and_alpha_and_cmyk_become_8bit_rgb_keeping_their_range():
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (40, 1))
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, "PNG")
    out = np.asarray(images.decode_rgb(buf.getvalue()))
    assert out.shape == (40, 256, 3) and out.min() == 0 and out.max() == 255
    assert abs(out.mean() - 127.5) < 1.5 and np.all(np.diff(out[0, :, 0].astype(int)) >= 0)  # not saturated
    la = Image.fromarray(np.stack([np.full((32, 32), 0, np.uint8), np.zeros((32, 32), np.uint8)], -1), "LA")
    buf = io.BytesIO()
    la.save(buf, "PNG")
    assert np.asarray(images.decode_rgb(buf.getvalue())).min() == 255  # fully transparent -> white, not black
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).convert("CMYK").save(buf, "JPEG")
    r, g, b = np.asarray(images.decode_rgb(buf.getvalue())).reshape(-1, 3).mean(0)
    assert r > 150 and g < 80 and b < 80


def test_decompression_bomb_is_a_skip_with_the_reason(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, "PNG")  # 1600 px > 1000: Pillow only warns below 2x
    with pytest.raises(images.ImageDecodeError, match="decompression-bomb limit of 1000 pixels"):
        images.DecodeRules().check(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, "PNG")
    assert images.DecodeRules(min_side=8).check(buf.getvalue())[:2] == (10, 10)
