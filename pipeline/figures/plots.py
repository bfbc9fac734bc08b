"""PNG figures of a trained ViT (matplotlib, headless), written to a folder or an S3 prefix.

The arrays behind each figure come from `vit_model.analysis`; `compute_all` returns them for notebooks.
"""

from __future__ import annotations

import io
import json
import math
import posixpath

import numpy as np
import torch

import vit_model
from pipeline.core import storage
from pipeline.core.runs import RunLayout
from pipeline.data.transforms import ImageDecodeError, ImageTransform, unpatchify
from vit_model import analysis
from vit_model.mae import DECODER_NAME, mae_from_parts

FIGURES = ("filters", "posemb", "distance", "attention", "curves", "reconstruction")
GRID_THRESHOLD = 0.2  # grid_structure_score above this: the embeddings encode the 2-D layout


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, uri: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def load_images(
    uris: list[str], model: vit_model.VisionTransformer
) -> tuple[torch.Tensor, list[np.ndarray], list[str]]:
    """Encoded images -> eval-transformed patches (B, N, P*P*C) uint8 and the cropped pixels.

    Raises ImageDecodeError naming the file that is not an image or is smaller than a patch."""
    c = model.cfg
    t = ImageTransform.for_model(c, False)
    patches, pixels = [], []
    for uri in uris:
        try:
            p = t(storage.read_bytes(uri), None)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{uri}: {e}") from None
        patches.append(p)
        pixels.append(unpatchify(p, model.cfg.patch_size))
    return torch.from_numpy(np.stack(patches)), pixels, uris


def compute_all(model: vit_model.VisionTransformer, patches: torch.Tensor | None) -> dict:
    out = {"filters": analysis.embedding_filters(model), "posemb_similarity": analysis.pos_embed_similarity(model)}
    out["grid_structure"] = analysis.grid_structure_score(out["posemb_similarity"])
    if patches is not None and len(patches):
        attns = analysis.collect_attention(model, patches)
        out["attention"] = attns
        out["mean_distance"] = analysis.mean_attention_distance(
            torch.stack(attns).transpose(0, 1).mean(0), model.cfg.patch_size
        )
        out["rollout"] = analysis.attention_rollout(attns)
    return out


def fig_filters(filters: np.ndarray, uri: str) -> str:
    plt = _plt()
    k = len(filters)
    cols = 7
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.3))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < k:
            ax.imshow(filters[i] if filters.shape[-1] == 3 else filters[i, ..., 0], interpolation="nearest")
    fig.suptitle(f"RGB embedding filters (first {k} principal components)")
    return _save(fig, uri)


def fig_posemb(sim: np.ndarray, score: dict, uri: str) -> str:
    plt = _plt()
    g = sim.shape[0]
    fig, axes = plt.subplots(g, g, figsize=(min(12, g * 0.9 + 1), min(12, g * 0.9)))
    for r in range(g):
        for c in range(g):
            ax = axes[r, c]
            im = ax.imshow(sim[r, c], vmin=-1, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r + 1), fontsize=7)
            if r == g - 1:
                ax.set_xlabel(str(c + 1), fontsize=7)
    fig.supxlabel("input patch column")
    fig.supylabel("input patch row")
    verdict = "grid structure present" if score["score"] > GRID_THRESHOLD else "no grid structure"
    fig.suptitle(
        f"Position embedding similarity: {verdict} (grid neighbours {score['neighbours']:.2f} vs other pairs "
        f"{score['other']:.2f}, score {score['score']:.2f})"
    )
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine similarity")
    return _save(fig, uri)


def fig_distance(dist: np.ndarray, uri: str, img_size: int) -> str:
    plt = _plt()
    layers, heads = dist.shape
    fig, ax = plt.subplots(figsize=(5, 4))
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), dist[:, h], s=14, label=f"head {h + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, img_size)
    ax.set_title("Mean attention distance per head")
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, uri)


def fig_attention(
    pixels: list[np.ndarray], rollout: torch.Tensor, last: torch.Tensor, uri: str, names: list[str]
) -> str:
    """Rollout and the last layer's class-token attention per head, overlaid on each image."""
    plt = _plt()
    b, heads = len(pixels), last.shape[1]
    g = int(round((rollout.shape[-1] - 1) ** 0.5))
    cols = 2 + heads
    fig, axes = plt.subplots(b, cols, figsize=(cols * 1.6, b * 1.7), squeeze=False)
    for i in range(b):
        img = pixels[i]
        maps = [rollout[i, 0, 1:]] + [last[i, h, 0, 1:] for h in range(heads)]
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(posixpath.basename(names[i])[:18], fontsize=6)
        for j, m in enumerate(maps):
            m = m.reshape(g, g).numpy()
            m = (m - m.min()) / max(m.max() - m.min(), 1e-12)
            ax = axes[i, j + 1]
            ax.imshow(img)
            im = ax.imshow(
                np.kron(m, np.ones((img.shape[0] // g, img.shape[1] // g))), alpha=0.6, cmap="inferno", vmin=0, vmax=1
            )
            ax.set_title("rollout" if j == 0 else f"last layer h{j}", fontsize=6)
        for ax in axes[i]:
            ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.5, label="attention (normalised)")
    return _save(fig, uri)


def fig_curves(lines: list[dict], uri: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, key, label in zip(
        axes, ("loss", "lr", "val_top1", "images_per_s"), ("train loss", "learning rate", "val top-1", "images/s")
    ):
        if key == "val_top1" and not any(key in m for m in lines):  # an MAE run: its k-NN monitor
            key, label = "knn_top1", "k-NN top-1"
        pts = [(m["step"], m[key]) for m in lines if key in m and "step" in m]
        if pts:
            ax.plot(*zip(*pts), marker="." if key.endswith("top1") else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    return _save(fig, uri)


def reconstructions(mae, patches: torch.Tensor, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original, masked, reconstruction) images (B, H, W, C) float in [0, 1] for MAE's Figure 2: masks drawn
    from `seed`, the visible patches pasted into the reconstruction as the paper shows them."""
    from vit_model.mae import random_masking

    masking = random_masking(len(patches), patches.shape[1], mae.cfg.mask_ratio, torch.Generator().manual_seed(seed))
    x = mae.encoder.normalize(patches)
    masked, recon = mae.reconstruct(patches, masking)
    c = mae.encoder.cfg
    mean = torch.tensor(c.mean).repeat(c.patch_size**2)
    std = torch.tensor(c.std).repeat(c.patch_size**2)
    grey = (0.5 - mean) / std  # masked patches shown grey

    def image(t: torch.Tensor) -> np.ndarray:
        pix = vit_model.unpatchify((t * std + mean).clamp(0, 1), c.patch_size, c.in_chans)
        return pix.permute(0, 2, 3, 1).numpy()

    m = masking.mask[..., None]
    return image(x), image(masked + grey * m), image(recon)


def fig_reconstruction(
    original: np.ndarray, masked: np.ndarray, recon: np.ndarray, uri: str, ratio: float, norm_pix: bool = True
) -> str:
    """Rows of original | masked | reconstruction (He et al. 2021, Figure 2). With norm-pix targets the decoder
    predicts each patch's normalised pixels; its mean and variance come from the original, as in MAE's demo,
    and the column title says so."""
    plt = _plt()
    b = len(original)
    fig, axes = plt.subplots(b, 3, figsize=(3 * 1.6, b * 1.6), squeeze=False)
    for i in range(b):
        for j, (img, title) in enumerate(
            (
                (original, "original"),
                (masked, f"masked {ratio:.0%}"),
                (recon, "reconstruction" + ("\n(patch mean/var of the original)" if norm_pix else "")),
            )
        ):
            axes[i, j].imshow(img[i], interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
    return _save(fig, uri)


def write_figures(
    model_uri: str, image_uris: list[str], output: str, which=FIGURES, run_uri: str | None = None
) -> dict:
    """Load the model, compute the arrays, write the PNGs; returns {figure: uri} and the arrays."""
    from pipeline.core import exported

    model, _ = vit_model.model_from_bytes(*exported.read(model_uri))
    out = storage.parse_uri(output)
    patches = pixels = None
    if image_uris and ({"distance", "attention", "reconstruction"} & set(which)):
        patches, pixels, image_uris = load_images(image_uris, model)
    arrays = compute_all(model, patches)
    written = {}
    if "filters" in which:
        written["filters"] = fig_filters(arrays["filters"], out.join("filters.png").uri)
    if "posemb" in which:
        written["posemb"] = fig_posemb(
            arrays["posemb_similarity"], arrays["grid_structure"], out.join("posemb.png").uri
        )
    if "distance" in which and patches is not None:
        written["distance"] = fig_distance(arrays["mean_distance"], out.join("distance.png").uri, model.cfg.img_size)
    if "attention" in which and patches is not None:
        written["attention"] = fig_attention(
            pixels[:6],
            arrays["rollout"][:6],
            arrays["attention"][-1][:6],
            out.join("attention.png").uri,
            image_uris[:6],
        )
    decoder_uri = storage.parse_uri(model_uri).join(DECODER_NAME).uri
    skipped = {}
    if "reconstruction" in which and not storage.exists(decoder_uri):
        skipped["reconstruction"] = f"not an MAE model (no {DECODER_NAME} beside the weights)"
    elif "reconstruction" in which and patches is None:
        skipped["reconstruction"] = "needs --images"
    elif "reconstruction" in which:
        mae = mae_from_parts(model, storage.read_bytes(decoder_uri, large=True))
        original, masked, recon = reconstructions(mae, patches[:8])
        arrays["reconstruction_mse"] = float(((recon - original) ** 2).mean())
        written["reconstruction"] = fig_reconstruction(
            original, masked, recon, out.join("reconstruction.png").uri, mae.cfg.mask_ratio, mae.cfg.norm_pix_loss
        )
    if "curves" in which and run_uri:
        written["curves"] = fig_curves(RunLayout.at(run_uri).read_metrics(), out.join("curves.png").uri)
    storage.write_bytes(
        out.join("summary.json").uri,
        json.dumps(
            {
                "figures": written,
                "grid_structure": arrays["grid_structure"],
                "mean_distance": arrays["mean_distance"].tolist() if "mean_distance" in arrays else None,
                "reconstruction_mse": arrays.get("reconstruction_mse"),
            },
            indent=2,
        ).encode(),
    )
    return {"figures": written, "arrays": arrays, "skipped": skipped}


def resolve_images(spec: str, limit: int = 16) -> list[str]:
    """Image URIs from a comma-separated list, a prefix/folder, or a shards manifest (its val split)."""
    from pipeline.data.manifest import load_manifest

    parts = [p for p in spec.split(",") if p]
    if len(parts) == 1 and (parts[0].endswith("manifest.json")):
        return _images_from_shards(load_manifest(parts[0]), limit)
    uris = []
    for p in parts:
        loc = storage.parse_uri(p)
        files = storage.list_files(loc.uri)
        uris += [storage.to_uri(loc, f.path) for f in files] if files else [loc.uri]
    return uris[:limit]


def _images_from_shards(manifest, limit: int) -> list[str]:
    """Extract the first `limit` images of the val (or train) split from the shards to a temp folder."""
    import atexit
    import shutil
    import tempfile

    from pipeline.data.shard_reader import read_shard

    split = "val" if manifest.count("val") else "train"
    folder = tempfile.mkdtemp(prefix="vitray-viz-")
    atexit.register(shutil.rmtree, folder, True)  # read within this process; nothing stays in the temp folder
    out = []
    digests = manifest.digests(split)
    for uri in manifest.shard_uris(split):
        for key, image, _, _ in read_shard(uri, digests.get(storage.parse_uri(uri).path), manifest.format):
            if image is not None:
                out.append(f"{folder}/{key}.img")
                with open(out[-1], "wb") as f:
                    f.write(image)
                if len(out) >= limit:
                    return out
    return out
