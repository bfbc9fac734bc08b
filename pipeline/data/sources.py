"""What goes into a shard set: the source listed, labelled and split, and the samples cut into shards.

Accepted sources: class folders `<class>/<image>`, `train/` and `val/` of class folders (the split
kept), a flat prefix with a `--labels` CSV / JSON-lines file, or `digits` (scikit-learn's handwritten
digits, the embedded demo set). Deterministic: with the same inputs, seed and arguments, every sample
lands in the same split and shard (sorted listing, seeded permutation).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass

import numpy as np

from pipeline.core import storage
from pipeline.data.manifest import SPLITS


@dataclass(frozen=True)
class Sample:
    """One image planned into a shard set."""

    key: str  # stable, tar- and URL-safe (sha1 of the relative path, or digitNNNN)
    source: str  # where its bytes are read from
    label: int  # index into the set's classes
    split: str  # "train" or "val"
    data: bytes | None = None  # the bytes themselves, for an embedded set (the digits)


def _list_local(root: str) -> tuple[list[tuple[str, str]], list[dict], list[str]]:
    """(uri, relative path) of files, skipped entries (dangling symlinks), and folders without files."""
    files, skipped, empty = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        visible = [f for f in filenames if not f.startswith(".")]
        if not visible and not dirnames and rel_dir != ".":
            empty.append(rel_dir)
        for name in sorted(visible):
            path = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if os.path.islink(path) and not os.path.exists(path):
                skipped.append({"path": path, "reason": f"dangling symlink (points to {os.readlink(path)})"})
                continue
            files.append((path, rel))
    return files, skipped, empty


def _list_source(source: str) -> tuple[list[tuple[str, str]], list[dict], list[str]]:
    loc = storage.parse_uri(source)
    if loc.scheme == "file":
        if not os.path.isdir(loc.path):
            raise storage.StorageError(f"--source {source} is not a folder")
        files, skipped, empty = _list_local(loc.path)
    else:
        files, skipped, empty = [], [], []
        for info in storage.list_files(loc.uri):
            rel = posixpath.relpath(info.path, loc.path)
            if posixpath.basename(rel).startswith("."):
                continue
            if info.size == 0 and info.path.endswith("/"):  # a console-made "folder" marker
                continue
            files.append((storage.to_uri(loc, info.path), rel))
    if not files and not skipped:
        raise storage.StorageError(
            f"no files under {source}: expected class folders <class>/<image>, "
            "train/ and val/ of class folders, or a flat prefix with --labels"
        )
    return files, skipped, empty


def _read_labels(labels_uri: str) -> dict[str, str]:
    """path -> label from a CSV (`path,label`, header optional) or JSON lines ({"path": ..., "label": ...})."""
    text = storage.read_bytes(labels_uri).decode("utf-8-sig")
    out: dict[str, str] = {}
    if labels_uri.endswith((".jsonl", ".json", ".ndjson")):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    out[str(row["path"]).lstrip("/")] = str(row["label"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f'{labels_uri} line {n}: expected {{"path": ..., "label": ...}} ({e})') from None
    else:
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2:
                raise ValueError(f"{labels_uri} line {n}: expected path,label")
            out[row[0].strip().lstrip("/")] = row[1].strip()
    if not out:
        raise ValueError(f"{labels_uri} holds no labels")
    return out


def plan_source(
    source: str, *, labels: str | None = None, val_fraction: float, seed: int
) -> tuple[list[str], list[Sample], list[dict]]:
    """Classes (sorted), the samples and what was skipped before reading."""
    files, skipped, empty = _list_source(source)
    for folder in empty:
        skipped.append({"path": f"{source.rstrip('/')}/{folder}", "reason": "empty folder (no images): not a class"})
    by_class: dict[str, list[tuple[str, str, str]]] = {}
    if labels:
        table = _read_labels(labels)
        seen = set()
        for uri, rel in files:
            if rel in table:
                by_class.setdefault(table[rel], []).append((uri, rel, ""))
                seen.add(rel)
            else:
                skipped.append({"path": uri, "reason": f"not in the labels file {labels}"})
        for rel in sorted(set(table) - seen):
            skipped.append(
                {"path": f"{source.rstrip('/')}/{rel}", "reason": "in the labels file but not under --source"}
            )
    else:
        has_split = set(SPLITS) <= {rel.split("/", 1)[0] for _, rel in files}  # keep an existing split
        for uri, rel in files:
            parts = rel.split("/")
            if has_split:
                if parts[0] not in SPLITS or len(parts) != 3:
                    skipped.append({"path": uri, "reason": "not under <split>/<class>/<file>"})
                    continue
                by_class.setdefault(parts[1], []).append((uri, rel, parts[0]))
            elif len(parts) != 2:
                skipped.append({"path": uri, "reason": "not under <class>/<file> (use --labels for a flat prefix)"})
            else:
                by_class.setdefault(parts[0], []).append((uri, rel, ""))
    classes = sorted(by_class)
    if not classes:
        raise ValueError(f"no labelled images found under {source}")
    rng = np.random.default_rng(seed)
    samples = []
    for label, cls in enumerate(classes):
        items = by_class[cls]
        if any(not split for _, _, split in items):  # stratified split, deterministic by seed
            val = set(rng.permutation(len(items))[: int(round(len(items) * val_fraction))].tolist())
            items = [(u, r, "val" if i in val else "train") for i, (u, r, _) in enumerate(items)]
        for uri, rel, split in items:
            samples.append(Sample(hashlib.sha1(rel.encode()).hexdigest()[:16], uri, label, split))
    return classes, samples, skipped


def plan_digits(val_fraction: float, seed: int, size: int = 32) -> tuple[list[str], list[Sample]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to `size` px RGB PNG (inline bytes)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(digits.target), bool)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        is_val[rng.permutation(idx)[: int(round(len(idx) * val_fraction))]] = True
    samples = []
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (img * (255.0 / 16.0)).round().astype(np.uint8)
        pil = Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        pil.save(buf, format="PNG", optimize=False)
        split = "val" if is_val[i] else "train"
        samples.append(Sample(f"digit{i:04d}", f"sklearn:digits/{i}", int(label), split, buf.getvalue()))
    return [str(c) for c in range(10)], samples


def assign_shards(samples: list[Sample], shard_size: int, seed: int, ext: str, prefix: str) -> list[dict]:
    """Per split: sort by key, permute by seed (classes mixed within shards), cut into shards."""
    rng = np.random.default_rng(seed)
    out = []
    for split in SPLITS:
        rows = sorted((s for s in samples if s.split == split), key=lambda s: s.key)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        for j in range(0, len(rows), shard_size):
            chunk = rows[j : j + shard_size]
            desc = {
                "split": split,
                "name": f"{prefix}{split}/shard-{j // shard_size:05d}.{ext}",
                "keys": [s.key for s in chunk],
                "sources": [s.source for s in chunk],
                "labels": [s.label for s in chunk],
            }
            if chunk[0].data is not None:  # inline bytes (the embedded digits); the descriptor travels as JSON
                desc["data"] = [base64.b64encode(s.data).decode() for s in chunk]
            out.append(desc)
    return out
