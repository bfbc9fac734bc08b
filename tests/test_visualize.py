"""Figure 7 arrays on hand-built inputs, and the figures written for a model in the local S3 server."""

import io
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import vit_model
from pipeline.core import storage
from pipeline.inference import figures
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
    storage.write_bytes(
        f"{bucket}/run/metrics.jsonl",
        b'{"step": 1, "loss": 2.3, "lr": 0.001, "images_per_s": 10}\n'
        b'{"step": 2, "loss": 2.1, "lr": 0.001, "val_top1": 0.3}\n',
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
    for name in figures.FIGURES:
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
