"""Weights in and out: timm's config.json and key layout, older exports, timm folders, the paper's JAX .npz,
position-embedding resampling as timm's, and the DeiT batch augmentations (Mixup, CutMix, random erasing)."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vit_model
from pipeline.core import exported
from pipeline.data.transforms import ImageTransform
from pipeline.training.mixing import Mixer, box_index, cutmix_box, random_erase_, soft_target_cross_entropy


def tiny(**kw):
    torch.manual_seed(0)
    m = vit_model.VisionTransformer(
        vit_model.ViTConfig(
            **{**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5), **kw}
        )
    )
    with torch.no_grad():  # non-trivial values everywhere, so layout mistakes show in the logits
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def timm_keys(depth: int, global_pool: str) -> set[str]:
    """timm's VisionTransformer state dict keys (timm docs / `vit_base_patch16_224`): `norm` on the tokens
    for token pooling; for avg pooling timm's default fc_norm=True puts the LayerNorm after the pool."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "head.weight", "head.bias"}
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
    final = "fc_norm" if global_pool == "avg" else "norm"
    return keys | {f"{final}.weight", f"{final}.bias"}


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("pos_embed", ["learn", "sincos2d"])
@pytest.mark.parametrize("img_size", [224, 384])
def test_export_has_timm_fields_and_exactly_timm_keys(global_pool, pos_embed, img_size):
    m = vit_model.create_model(
        "vit_base_patch16_224",
        img_size=img_size,
        global_pool=global_pool,
        pos_embed=pos_embed,
        num_classes=10,
        device="meta",
    )
    sd_keys = set(m.state_dict())
    assert sd_keys == timm_keys(12, global_pool) and len(sd_keys) == 152
    cfg = vit_model.timm_config(m.cfg, [f"c{i}" for i in range(10)])
    assert cfg["architecture"] == ("vit_base_patch16_384" if img_size == 384 else "vit_base_patch16_224")
    assert cfg["num_classes"] == 10 and cfg["global_pool"] == global_pool and cfg["label_names"][3] == "c3"
    args = cfg["model_args"]
    assert args["depth"] == 12 and args["embed_dim"] == 768 and args["img_size"] == img_size
    assert args["fc_norm"] is (global_pool == "avg") and args["class_token"] is True
    p = cfg["pretrained_cfg"]
    assert p["input_size"] == [3, img_size, img_size] and p["interpolation"] == "bicubic" and p["crop_pct"] == 0.9
    assert p["mean"] == [0.5, 0.5, 0.5] and p["first_conv"] == "patch_embed.proj" and p["classifier"] == "head"


def test_export_reads_back_as_this_projects_and_as_a_timm_config(tmp_path):
    m = tiny(
        global_pool="avg",
        crop_pct=0.75,
        interpolation="bilinear",
        mean=vit_model.IMAGENET_MEAN,
        std=vit_model.IMAGENET_STD,
    )
    w, c = vit_model.export_bytes(m, class_names=list("abcde"))
    meta = json.loads(c)
    x = torch.randn(3, 3, 32, 32)
    # the same file read through its timm fields only (what timm itself reads)
    timm_only = json.dumps({k: v for k, v in meta.items() if k not in ("model", "class_names")}).encode()
    for config in (c, timm_only):
        m2, meta2 = vit_model.model_from_bytes(w, config)
        assert m2.cfg.crop_pct == 0.75 and m2.cfg.interpolation == "bilinear" and m2.cfg.mean == vit_model.IMAGENET_MEAN
        assert m2.cfg.use_fc_norm and meta2["class_names"] == list("abcde")
        assert torch.equal(m2(x), m(x))


def test_avg_pool_normalises_after_the_pool_and_older_exports_still_load():
    m = tiny(global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    tokens = m.forward_tokens(x)[0]
    expected = m.head(F.layer_norm(tokens[:, 1:].mean(1), (32,), m.fc_norm.weight, m.fc_norm.bias, 1e-6))
    assert torch.allclose(m(x), expected, atol=1e-6)
    # an export from before fc_norm: avg pooling over normalised tokens, 0.875 bilinear eval crop
    old = tiny(global_pool="avg", fc_norm=False)
    w, c = vit_model.export_bytes(old)
    meta = json.loads(c)
    legacy = {"model": {k: v for k, v in meta["model"].items() if k not in ("fc_norm", "crop_pct", "interpolation")}}
    m2, _ = vit_model.model_from_bytes(w, json.dumps(legacy).encode())
    assert not m2.cfg.use_fc_norm and m2.cfg.crop_pct == 0.875 and m2.cfg.interpolation == "bilinear"
    assert torch.equal(m2(x), old(x))
    with pytest.raises(ValueError, match="set model.fc_norm: false"):
        vit_model.load_weights(tiny(global_pool="avg"), old.state_dict())


def test_a_timm_save_for_hf_folder_loads_for_inference_and_init(tmp_path):
    """A folder as timm's `save_for_hf` writes it (config.json fields per timm's _hub.py), weights from a model."""
    src = tiny(num_classes=4)
    folder = tmp_path / "hub"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_base_patch16_224",
                "num_classes": 4,
                "num_features": 32,
                "global_pool": "token",
                "label_names": ["w", "x", "y", "z"],
                "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                "pretrained_cfg": {
                    "input_size": [3, 32, 32],
                    "interpolation": "bicubic",
                    "crop_pct": 0.9,
                    "crop_mode": "center",
                    "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225],
                    "num_classes": 4,
                },
            }
        )
    )
    weights, config = exported.read(str(folder))
    model, meta = vit_model.model_from_bytes(weights, config)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), src(x)) and exported.class_names(config) == ["w", "x", "y", "z"]
    assert model.cfg.mean == (0.485, 0.456, 0.406)
    target = tiny(num_classes=7, img_size=48)  # fine-tune: other classes, other resolution
    own_head = target.head.weight.detach().clone()
    exported.load_init_weights(target, str(folder))
    assert torch.equal(target.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.equal(target.head.weight, own_head) and target.pos_embed.shape == (1, 37, 32)
    # what this model cannot be: LayerScale, register tokens, map pooling are refused by name
    for extra, word in (
        ({"init_values": 1e-5}, "init_values"),
        ({"reg_tokens": 4}, "reg_tokens"),
        ({"global_pool": "map"}, "map"),
    ):
        bad = json.loads(config)
        bad["model_args"].update(extra)
        with pytest.raises(ValueError, match=word):
            vit_model.config_from_json(bad)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(Exception, match="pickle, never loaded"):
        exported.read(str(folder))


def test_pre_logits_export_states_timm_has_no_slot():
    m = tiny(pre_logits=True)
    with pytest.warns(UserWarning, match="not loadable by timm: pre_logits"):
        _, c = vit_model.export_bytes(m)
    meta = json.loads(c)
    assert "architecture" not in meta and "pre_logits" in meta["timm_incompatible"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, c = vit_model.export_bytes(tiny(pos_embed="sincos2d"))  # loads in timm: a note, no warning
    assert "sincos2d" in json.loads(c)["timm_notes"][0]


# ---- the paper's .npz ------------------------------------------------------------------------------
def to_published_npz(
    model: vit_model.VisionTransformer, num_classes_head: int | None = None, pre_logits=False, rng=None
) -> bytes:
    """The google-research/vision_transformer layout, written from a model's own weights (the test's
    independent statement of that layout: HWIO kernels, per-head q/k/v, `Transformer/...` paths)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, h = model.cfg.embed_dim, model.cfg.num_heads
    a = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(model.cfg.depth):
        b, pre = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        wq, wk, wv = np.split(sd[b + "attn.qkv.weight"], 3)
        bq, bk, bv = np.split(sd[b + "attn.qkv.bias"], 3)
        for name, wt, bias in (("query", wq, bq), ("key", wk, bk), ("value", wv, bv)):
            a[f"{pre}MultiHeadDotProductAttention_1/{name}/kernel"] = wt.T.reshape(d, h, d // h)
            a[f"{pre}MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(h, d // h)
        a[f"{pre}MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(h, d // h, d)
        a[f"{pre}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        a[f"{pre}LayerNorm_0/scale"], a[f"{pre}LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        a[f"{pre}LayerNorm_2/scale"], a[f"{pre}LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        a[f"{pre}MlpBlock_3/Dense_0/kernel"], a[f"{pre}MlpBlock_3/Dense_0/bias"] = (
            sd[b + "mlp.fc1.weight"].T,
            sd[b + "mlp.fc1.bias"],
        )
        a[f"{pre}MlpBlock_3/Dense_1/kernel"], a[f"{pre}MlpBlock_3/Dense_1/bias"] = (
            sd[b + "mlp.fc2.weight"].T,
            sd[b + "mlp.fc2.bias"],
        )
    if num_classes_head is None:
        a["head/kernel"], a["head/bias"] = sd["head.weight"].T, sd["head.bias"]
    else:
        a["head/kernel"] = rng.normal(size=(d, num_classes_head)).astype(np.float32)
        a["head/bias"] = np.zeros(num_classes_head, np.float32)
    if pre_logits:
        a["pre_logits/kernel"] = rng.normal(size=(d, d)).astype(np.float32)
        a["pre_logits/bias"] = np.zeros(d, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **a)
    return buf.getvalue()


def test_published_npz_loads_back_to_the_same_logits(tmp_path):
    m = vit_model.VisionTransformer(
        vit_model.ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=6)
    )
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd, fields = vit_model.load_npz_bytes(to_published_npz(m))
    assert fields["depth"] == 2 and fields["num_heads"] == 4 and fields["img_size"] == 32 and fields["num_classes"] == 6
    m2 = vit_model.VisionTransformer(vit_model.ViTConfig(**fields, mean=m.cfg.mean, std=m.cfg.std))
    vit_model.load_weights(m2, sd)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m2.eval()(x), m.eval()(x), atol=1e-5, rtol=1e-5)
    # a pickled .npz is never opened
    buf = io.BytesIO()
    np.savez(buf, evil=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="never loaded"):
        vit_model.load_npz_bytes(buf.getvalue())


def test_21k_style_npz_with_pre_logits_fine_tunes_to_10_classes_at_384(tmp_path):
    src = vit_model.VisionTransformer(
        vit_model.ViTConfig(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=1)
    )
    path = tmp_path / "ViT-Ti_16-21k.npz"
    path.write_bytes(to_published_npz(src, num_classes_head=21843, pre_logits=True, rng=np.random.default_rng(0)))
    sd, fields = vit_model.load_npz_bytes(path.read_bytes())
    assert fields["pre_logits"] and fields["num_classes"] == 21843 and sd["pos_embed"].shape == (1, 197, 32)
    model = vit_model.VisionTransformer(
        vit_model.ViTConfig(img_size=384, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    )
    exported.load_init_weights(model, str(path))
    assert model.pos_embed.shape == (1, 577, 32) and model.head.weight.shape == (10, 32)
    assert model.head.weight.abs().sum() == 0  # the paper's zero-initialised new head
    assert torch.equal(model.pos_embed[:, 0], src.pos_embed[:, 0])
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    # it fine-tunes: a few steps on a fixed batch lower the loss
    x, y = torch.randn(4, 3, 384, 384), torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("old,new", [(14, 24), (24, 14)])
def test_resampling_matches_antialiased_bicubic_and_keeps_the_class_slot(old, new):
    pos = torch.randn(1, 1 + old * old, 16)
    out = vit_model.resample_pos_embed(pos, new)
    grid = pos[:, 1:].reshape(1, old, old, 16).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(out[:, 0], pos[:, 0])
    torch.testing.assert_close(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, new * new, 16))


# ---- preprocessing that travels with the weights ---------------------------------------------------
def test_the_eval_stream_uses_the_exports_crop_interpolation_and_mean():
    m = tiny(crop_pct=0.6, interpolation="bilinear", mean=vit_model.IMAGENET_MEAN, std=vit_model.IMAGENET_STD)
    _, config = vit_model.export_bytes(m)
    t = ImageTransform.for_model(exported.model_config(config), False)
    assert (t.crop_fraction, t.interpolation, t.fill) == (0.6, "bilinear", (124, 116, 104))
    img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(img).save(buf, "PNG")
    got = t(buf.getvalue(), None)
    assert np.array_equal(
        got, ImageTransform(32, 8, False, crop_fraction=0.6, interpolation="bilinear")(buf.getvalue(), None)
    )
    assert not np.array_equal(got, ImageTransform(32, 8, False)(buf.getvalue(), None))
    # uint8 patches are normalised with the export's mean/std inside the model
    x = torch.from_numpy(got)[None]
    mean, std = torch.tensor(vit_model.IMAGENET_MEAN), torch.tensor(vit_model.IMAGENET_STD)
    images = (vit_model.unpatchify(x.float(), 8) / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(m(x), m(images), atol=1e-5, rtol=1e-5)


# ---- DeiT batch augmentations ----------------------------------------------------------------------
# They work on the model's input, normalised patches (B, N, P*P*C); the tests look at them as images
# through unpatchify, and compare with the same draws done on images (the reference, as timm does it).
P = 8


def _as_patches(images):
    return vit_model.patchify(images, P)


def _as_images(patches):
    return vit_model.unpatchify(patches, P, 3)


def test_mixup_and_cutmix_targets_and_switching():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    images = torch.randn(6, 3, 32, 32)
    for kind, mixer in (
        ("mixup", Mixer(10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.0)),
        ("cutmix", Mixer(10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0)),
    ):
        for seed in range(20):
            r = mixer(_as_patches(images), labels, generator=torch.Generator().manual_seed(seed), patch_size=P)
            assert r.kind == kind
            torch.testing.assert_close(r.targets.sum(1), torch.ones(6))
            got = _as_images(r.patches)
            if kind == "mixup":
                torch.testing.assert_close(got, r.lam * images + (1 - r.lam) * images.flip(0))
            else:  # the pasted area is exactly 1 - lambda of the image
                pasted = (got != images).any(1).float().mean((1, 2))
                assert abs(float(pasted[0]) - (1 - r.lam)) < 1e-6 or r.lam == 1.0
            # the own label carries lam (+ smoothing share), the partner's 1 - lam
            assert float(r.targets[0, 0]) == pytest.approx(r.lam * 0.91 + (1 - r.lam) * 0.01, abs=1e-5)
    off = Mixer(10, mixup_alpha=0.8, prob=0.0)
    assert not off.active
    # a partner that is an invalid sample leaves the row unmixed
    valid = torch.tensor([True, True, True, True, True, False])
    r = Mixer(10, mixup_alpha=1.0)(_as_patches(images), labels, valid, torch.Generator().manual_seed(1), patch_size=P)
    torch.testing.assert_close(_as_images(r.patches)[0], images[0])
    assert float(r.targets[0, 0]) == pytest.approx(0.91)


def test_cutmix_on_patches_pastes_the_image_box_of_the_same_draw():
    """The reference: the same generator state gives the same box; pasting it in image space and cutting
    the result into patches equals pasting on the patches."""
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    mixer = Mixer(10, cutmix_alpha=1.0)
    for seed in range(10):
        r = mixer(_as_patches(images), labels, generator=torch.Generator().manual_seed(seed), patch_size=P)
        gen = torch.Generator().manual_seed(seed)
        lam, _ = mixer._draw(gen)
        top, bottom, left, right = cutmix_box(32, 32, lam, gen)
        want = images.clone()
        want[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
        torch.testing.assert_close(r.patches, _as_patches(want), rtol=0, atol=0)


def test_box_index_addresses_the_image_box_in_patch_order():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    patches = vit_model.patchify(images, 4)
    token, column = box_index((3, 9, 5, 14), 4, 3, 4)
    torch.testing.assert_close(patches[1, token, column], images[1, :, 3:9, 5:14].flatten(), rtol=0, atol=0)


def test_cutmix_box_area_matches_lambda_when_not_clipped():
    for lam in (0.1, 0.5, 0.9):
        top, bottom, left, right = cutmix_box(224, 224, lam, torch.Generator().manual_seed(0))
        side = int(224 * (1 - lam) ** 0.5)
        assert bottom - top <= side and right - left <= side
    # a box drawn away from the border is exactly (side // 2) * 2 on each axis: area 1 - lam up to rounding
    gen = torch.Generator().manual_seed(3)
    boxes = [cutmix_box(224, 224, 0.75, gen) for _ in range(50)]
    inside = [b for b in boxes if 0 < b[0] and b[1] < 224 and 0 < b[2] and b[3] < 224]
    assert inside and all(b[1] - b[0] == b[3] - b[2] == 112 for b in inside)
    assert any(b not in inside for b in boxes)  # and some are clipped (lambda is then corrected)


def test_random_erasing_and_soft_target_loss():
    patches = torch.zeros(64, 16, P * P * 3)  # 32 px images
    erased = random_erase_(patches, 0.25, torch.Generator().manual_seed(0), patch_size=P)
    assert 6 <= int(erased.sum()) <= 28
    images = _as_images(patches)
    changed = (images != 0).flatten(1).any(1)
    assert torch.equal(changed, erased)
    frac = (images[erased] != 0).any(1).float().mean((1, 2))
    assert float(frac.min()) >= 0.015 and float(frac.max()) <= 0.34
    # each erased image holds one box: its changed pixels fill their bounding rectangle
    for img in images[erased]:
        rows, cols = (img != 0).any(0).nonzero(as_tuple=True)
        box = (img[:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] != 0).any(0)
        assert bool(box.all())
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    soft = Mixer(10, smoothing=0.1)(torch.randn(4, 16, P * P * 3), labels, patch_size=P).targets
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, soft), F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.1)
    )


def test_a_shape_timm_has_no_name_for_exports_under_the_nearest_name_not_base():
    """The size word means one thing: a micro model (width 64) was exported as `vit_base_patch16_224`."""
    micro = vit_model.create_model("vit_micro_patch4_32", num_classes=10, device="meta").cfg
    assert vit_model.timm_config(micro)["architecture"].startswith("vit_tiny_")
    base8 = vit_model.create_model("vit_base_patch16_224", patch_size=8, device="meta").cfg
    assert vit_model.timm_config(base8)["architecture"] == "vit_base_patch16_224"  # nearest patch, same width
    large = vit_model.create_model("vit_large_patch16_224", img_size=320, device="meta").cfg
    assert vit_model.timm_config(large)["architecture"] == "vit_large_patch16_384"
