"""The CPU image steps, one at a time, on the local filesystem."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import vit_model
from pipeline import transforms as T


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
    img = T.open_image(data)
    out = T.crop_resize(img, (0, 0, 2000, 1500), 224, draft=True)
    assert out.shape == (224, 224, 3)
    img2 = T.open_image(data)
    img2.draft("RGB", (2000 * 224 // 2000 + 1, 1500 * 224 // 1500 + 1))
    assert img2.size[0] < 2000  # libjpeg scaled the decode down
    full = T.crop_resize(T.open_image(data), (0, 0, 2000, 1500), 224, draft=False)
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
    by = {b: T.crop_resize(T.open_image(data), box, 224, flip=flip, backend=b).astype(int) for b in ("torch", "pil")}
    assert by["torch"].shape == by["pil"].shape == (224, 224, 3)
    diff = np.abs(by["torch"] - by["pil"])
    assert diff.mean() < 0.5 and (diff <= 1).mean() > 0.99
    if flip:
        plain = T.crop_resize(T.open_image(data), box, 224, backend="torch").astype(int)
        assert np.abs(by["torch"] - plain[:, ::-1]).max() <= 1
    with pytest.raises(ValueError, match="unknown resize backend"):
        T.crop_resize(T.open_image(data), box, 224, backend="cv2")


def test_resize_pixels_do_not_depend_on_the_callers_thread_count():
    # Ray's data tasks run torch with 1 thread, a CPU inference replica or a test process with more:
    # training, evaluation and batch inference must still see identical pixels.
    import torch

    data, box, before = _photo_like(640, 480), (11.0, 7.0, 611.0, 457.0), torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = T.crop_resize(T.open_image(data), box, 224, flip=True)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(out[1], out[2])


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"this is text, not a jpeg", "not an image"),
    (_jpeg(64, 64)[:1500], "does not decode"),
])
def test_bad_inputs_raise_image_decode_error(data, reason):
    t = T.ImageTransform(32, 4, train=True)
    with pytest.raises(T.ImageDecodeError, match=reason):
        if reason == "does not decode":
            T.check_decodes(data)
        t(data, np.random.default_rng(0))


def test_image_smaller_than_a_patch_is_refused():
    buf = io.BytesIO()
    Image.new("RGB", (3, 3)).save(buf, "PNG")
    with pytest.raises(T.ImageDecodeError, match="smaller than one 16x16 patch"):
        T.ImageTransform(224, 16, train=False)(buf.getvalue(), None)


def test_patch_size_must_divide_image_size():
    with pytest.raises(ValueError, match="not divisible by patch_size 16"):
        T.ImageTransform(100, 16, train=True)


def test_rand_augment_changes_pixels_keeps_shape_and_every_op_runs():
    img = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    for name, op in T.RAND_AUGMENT_OPS.items():
        out = np.asarray(op(Image.fromarray(img), 9, rng))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8, name
    changed = [not np.array_equal(T.rand_augment(img, 2, 9, rng), img) for _ in range(20)]
    assert any(changed)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    t = T.ImageTransform(32, 4, train=True, randaug_n=2, randaug_m=9)
    assert t(buf.getvalue(), rng).shape == (64, 48)
