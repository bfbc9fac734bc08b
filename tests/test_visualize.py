"""Figure 7 arrays on hand-built inputs, and the figures written for a model in the local S3 server."""

import io
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import vit_model
from pipeline.core import storage
from pipeline.figures import plots as figures
from vit_model import analysis

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_grid_score_separates_sincos_from_random_embeddings():
    grid = vit_model.create_model("vit_micro_patch4_32", pos_embed="sincos2d")
    rand = vit_model.create_model("vit_micro_patch4_32")
    with torch.no_grad():
        rand.pos_embed.normal_()
    s_grid = analysis.grid_structure_score(analysis.pos_embed_similarity(grid))
    s_rand = analysis.grid_structure_score(analysis.pos_embed_similarity(rand))
    assert s_grid["score"] > figures.GRID_THRESHOLD > abs(s_rand["score"]), (s_grid, s_rand)


def test_mean_attention_distance_is_exact_on_hand_built_attention():
    g, p, n = 4, 8, 16
    self_attn = torch.eye(n + 1).expand(2, 3, n + 1, n + 1)  # (L, H, T, T)
    assert np.allclose(analysis.mean_attention_distance(self_attn, p), 0.0)
    uniform = torch.full((2, 3, n + 1, n + 1), 1.0 / (n + 1))
    r, c = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    pts = np.stack([r.ravel(), c.ravel()], 1) * p
    analytic = np.mean([np.hypot(*(a - b)) for a in pts for b in pts])
    assert np.allclose(analysis.mean_attention_distance(uniform, p), analytic)


def test_rollout_of_identity_attention_is_identity():
    attns = [torch.eye(5).expand(2, 4, 5, 5) for _ in range(3)]
    assert torch.allclose(analysis.attention_rollout(attns), torch.eye(5).expand(2, 5, 5))


def test_filters_shape_and_range():
    f = analysis.embedding_filters(vit_model.create_model("vit_micro_patch4_32"))
    assert f.shape == (28, 4, 4, 3) and f.min() >= 0 and f.max() <= 1


def _png(size, color=(200, 20, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_figures_for_a_model_in_s3_and_bad_inputs(stack, bucket, tmp_path):
    m = vit_model.create_model("vit_micro_patch4_32")
    w, c = vit_model.export_bytes(m, class_names=[str(i) for i in range(10)])
    storage.write_bytes(f"{bucket}/m/model.safetensors", w)
    storage.write_bytes(f"{bucket}/m/config.json", c)
    for i in range(3):
        storage.write_bytes(f"{bucket}/img/{i}.png", _png((40 + i, 36), (50 * i, 90, 20)))
    # a run from before the metrics folder (metrics.jsonl), resumed by this version (metrics/*.jsonl)
    storage.write_bytes(f"{bucket}/run/metrics.jsonl", b'{"step": 1, "loss": 2.3, "lr": 0.001, "images_per_s": 10}\n')
    storage.write_bytes(
        f"{bucket}/run/metrics/000000000002-1.jsonl", b'{"step": 2, "loss": 2.1, "lr": 0.001, "val_top1": 0.3}\n'
    )
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/visualize.py"),
            "--model",
            f"{bucket}/m",
            "--images",
            f"{bucket}/img",
            "--output",
            f"{bucket}/figs",
            "--run",
            f"{bucket}/run",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "reconstruction skipped: not an MAE model" in r.stdout  # a plain classifier has no decoder
    for name in [f for f in figures.FIGURES if f != "reconstruction"]:
        data = storage.read_bytes(f"{bucket}/figs/{name}.png")
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.width > 200 and img.height > 150, name
        assert np.asarray(img.convert("L")).std() > 1  # not blank
    storage.write_bytes(f"{bucket}/bad/notes.txt", b"hello")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/visualize.py"),
            "--model",
            f"{bucket}/m",
            "--images",
            f"{bucket}/bad",
            "--output",
            f"{bucket}/figs2",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "notes.txt" in r.stderr and "not an image" in r.stderr
    storage.write_bytes(f"{bucket}/tiny/t.png", _png((2, 2)))
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/visualize.py"),
            "--model",
            f"{bucket}/m",
            "--images",
            f"{bucket}/tiny",
            "--output",
            f"{bucket}/figs3",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "smaller than one 4x4 patch" in r.stderr


def test_reconstruction_figure_of_an_mae_model(tmp_path):
    """An MAE export (encoder + mae_decoder.safetensors) gets reconstruction.png: original | masked |
    reconstruction rows; the visible patches come back exactly, the masked ones from the decoder. The same
    figure is not offered for a plain classifier."""
    from pipeline.core import exported
    from vit_model.mae import DECODER_NAME, MAEConfig, create_mae, decoder_bytes

    torch.manual_seed(0)
    mae = create_mae(
        vit_model.variant_config("vit_micro_patch4_32"), MAEConfig(decoder_depth=1, decoder_width=32, decoder_heads=2)
    )
    exported.write(str(tmp_path / "mae"), mae.encoder, class_names=[], extra_files={DECODER_NAME: decoder_bytes(mae)})
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png((32, 32), (60 * i, 90, 200 - 50 * i)))
    images = [str(tmp_path / f"{i}.png") for i in range(3)]
    out = figures.write_figures(str(tmp_path / "mae"), images, str(tmp_path / "figs"), ("reconstruction",))
    assert (tmp_path / "figs" / "reconstruction.png").stat().st_size > 1000
    patches, _, _ = figures.load_images(images, mae.encoder)
    original, masked, recon = figures.reconstructions(mae, patches)
    assert original.shape == recon.shape == (3, 32, 32, 3) and 0 <= recon.min() and recon.max() <= 1
    same = np.isclose(recon, original, atol=1e-5).all(axis=-1)  # per pixel
    assert 0.15 < same.mean() < 0.4  # the 25% visible come back as they were, the masked are predicted
    assert out["arrays"]["reconstruction_mse"] > 0
    plain = vit_model.create_model("vit_micro_patch4_32")
    exported.write(str(tmp_path / "plain"), plain, class_names=[str(i) for i in range(10)])
    out = figures.write_figures(str(tmp_path / "plain"), images, str(tmp_path / "figs2"), ("reconstruction",))
    assert "reconstruction" not in out["figures"]
