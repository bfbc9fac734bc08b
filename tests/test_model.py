"""vit_model against the paper's sizes, torch's own encoder layer, and its own invariants."""

import pytest
import torch
from torch import nn

import vit_model
from vit_model import create_model, interop, patchify, unpatchify

REFERENCE_PARAMS = {  # timm 1.0.31 at 224 px, 1000 classes
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    "vit_large_patch32_224": 306_535_400,
    "vit_huge_patch14_224": 632_045_800,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(name):
    model = create_model(name, device="meta")
    assert vit_model.count_parameters(model) == REFERENCE_PARAMS[name]


def test_vit_import_has_no_ray():
    import subprocess
    import sys

    code = "import sys, vit_model; m = vit_model.create_model('vit_micro_patch4_32'); print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def _small(**kw):
    torch.manual_seed(0)
    m = create_model("vit_micro_patch4_32", **{"num_classes": 10, **kw})
    with torch.no_grad():  # a zero head gives zero logits; make outputs informative
        m.head.weight.normal_()
    return m.eval()


def test_patch_embedding_linear_equals_strided_conv():
    m = _small()
    x = torch.randn(2, 3, 32, 32)
    conv = m.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
    lin = m.patch_embed(patchify(x, 4))
    torch.testing.assert_close(lin, conv, rtol=1e-5, atol=1e-5)


def test_uint8_patches_and_float_images_give_identical_outputs():
    m = _small()
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(m.cfg.mean)[:, None, None]
    std = torch.tensor(m.cfg.std)[:, None, None]
    images = (pixels.float() / 255 - mean) / std
    out_img = m(images)
    out_patch = m(patchify(pixels, 4))
    torch.testing.assert_close(out_patch, out_img, rtol=1e-5, atol=1e-5)
    assert torch.equal(unpatchify(patchify(pixels, 4), 4), pixels)


def test_block_equals_torch_transformer_encoder_layer():
    m = _small()
    blk, d, h = m.blocks[0], m.cfg.embed_dim, m.cfg.num_heads
    ref = nn.TransformerEncoderLayer(
        d,
        h,
        dim_feedforward=4 * d,
        dropout=0.0,
        activation="gelu",
        layer_norm_eps=1e-6,
        batch_first=True,
        norm_first=True,
    ).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.2)
        ref.self_attn.in_proj_weight.copy_(blk.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(blk.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(blk.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(blk.attn.proj.bias)
        ref.linear1.load_state_dict(blk.mlp.fc1.state_dict())
        ref.linear2.load_state_dict(blk.mlp.fc2.state_dict())
        ref.norm1.load_state_dict(blk.norm1.state_dict())
        ref.norm2.load_state_dict(blk.norm2.state_dict())
    x = torch.randn(2, 65, d)
    ours, _ = blk(x)
    theirs = ref(x)
    rel = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 1e-5, rel
    explicit, attn = blk(x, return_attn=True)
    torch.testing.assert_close(explicit, ours, rtol=1e-5, atol=1e-5)
    assert attn.shape == (2, h, 65, 65)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, h, 65))


def test_explicit_attention_path_matches_fused_and_returns_every_layer():
    m = _small()
    x = torch.randn(2, 3, 32, 32)
    logits, attns = m.forward_with_attention(x)
    torch.testing.assert_close(logits, m(x), rtol=1e-5, atol=1e-5)
    assert len(attns) == m.cfg.depth and attns[0].shape == (2, 4, 65, 65)


def test_gap_sincos_prelogits_and_features():
    m = _small(global_pool="avg", pos_embed="sincos2d", pre_logits=True)
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape == (2, 64)
    assert m(x).shape == (2, 10)
    assert not m.pos_embed.requires_grad
    names = {n for g in vit_model.param_groups(m, 0.1) for n in [id(p) for p in g["params"]]}
    assert id(m.pos_embed) not in names  # fixed embeddings are not optimised


def test_init_matches_reference_implementations():
    m = create_model("vit_micro_patch4_32")
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    assert m.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)
    assert m.blocks[0].mlp.fc1.bias.abs().max() < 1e-4
    w = m.blocks[0].attn.proj.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_param_groups_decay_only_matrices():
    m = create_model("vit_micro_patch4_32")
    decay, no_decay = vit_model.param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.attn.qkv.bias"} <= nd
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_flops_and_mfu():
    cfg = vit_model.variant_config("vit_base_patch16_224")
    fwd = vit_model.flops_per_image(cfg)
    assert 2 * 17.4e9 < fwd < 2 * 17.7e9  # timm: 17.58 GMACs
    assert vit_model.mfu(1000, cfg, 1000 * 3 * fwd) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_micro_patch4_32"])
def test_flops_match_an_independent_count(name):
    """torch's own FlopCounterMode over a real forward (attention on the math kernel, whose matmuls it
    sees) counts exactly our formula; forward + backward comes within 1% of 3x (the patch embedding
    needs no input gradient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    m = create_model(name, num_classes=10)
    x = torch.randn(2, 3, m.cfg.img_size, m.cfg.img_size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        m(x)
    assert fwd.get_total_flops() / 2 == vit_model.flops_per_image(m.cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train:
        m(x).sum().backward()
    assert train.get_total_flops() / 2 == pytest.approx(vit_model.flops_per_image(m.cfg, training=True), rel=0.01)


def test_export_roundtrip_is_bit_exact_and_resamples_to_384(tmp_path):
    m = create_model("vit_base_patch16_224", num_classes=5)
    folder = vit_model.save_pretrained(m, tmp_path / "m", class_names=list("abcde"))
    loaded, meta = vit_model.load_pretrained(folder)
    assert meta["class_names"] == list("abcde")
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    big, _ = vit_model.load_pretrained(folder, img_size=384)
    assert big.pos_embed.shape == (1, 1 + 24 * 24, 768)
    assert torch.equal(big.pos_embed[:, 0], m.pos_embed[:, 0])  # the class slot is kept
    x = torch.randn(1, 3, 384, 384)
    assert big(x).shape == (1, 5)


def test_strict_load_of_timm_and_torchvision_layouts():
    m = _small()
    timm_sd = interop.to_timm_state_dict(m)
    assert list(timm_sd)[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    tv = {
        "class_token": timm_sd["cls_token"],
        "conv_proj.weight": timm_sd["patch_embed.proj.weight"],
        "conv_proj.bias": timm_sd["patch_embed.proj.bias"],
        "encoder.pos_embedding": timm_sd["pos_embed"],
        "encoder.ln.weight": timm_sd["norm.weight"],
        "encoder.ln.bias": timm_sd["norm.bias"],
        "heads.head.weight": timm_sd["head.weight"],
        "heads.head.bias": timm_sd["head.bias"],
    }
    for i in range(m.cfg.depth):
        p, q = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
        for a, b in [
            ("norm1", "ln_1"),
            ("norm2", "ln_2"),
            ("attn.proj", "self_attention.out_proj"),
            ("mlp.fc1", "mlp.0"),
            ("mlp.fc2", "mlp.3"),
        ]:
            for s in ("weight", "bias"):
                tv[f"{q}{b}.{s}"] = timm_sd[f"{p}{a}.{s}"]
        tv[f"{q}self_attention.in_proj_weight"] = timm_sd[f"{p}attn.qkv.weight"]
        tv[f"{q}self_attention.in_proj_bias"] = timm_sd[f"{p}attn.qkv.bias"]
    other = create_model("vit_micro_patch4_32", num_classes=10)
    vit_model.load_weights(other, tv)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(other.eval()(x), m(x))


def test_loading_another_architecture_is_refused():
    small = interop.to_timm_state_dict(create_model("vit_micro_patch4_32"))
    with pytest.raises(ValueError, match="another architecture|does not match"):
        vit_model.load_weights(create_model("vit_mini_patch4_32"), small)


def test_bad_input_is_explained():
    m = _small()
    with pytest.raises(ValueError, match="expected 3 channels"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        m(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match="P\\*P\\*C = 4\\*4\\*3 = 48"):
        m(torch.zeros(1, 64, 47, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown model variant 'vit_gigantic'.*vit_base_patch16_224"):
        create_model("vit_gigantic")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_model("vit_base_patch16_224", img_size=250)
