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
import re
import stat
from dataclasses import dataclass

import numpy as np

from pipeline.core import storage
from pipeline.data.manifest import SPLITS

# Names, the one rule of both jobs (make_shards and batch inference):
#   our own bookkeeping (the `_staging/`, `_commits/`, `_rolled_back/`, `_runs/`, `_ledger/` folders, a
#     `_tmp/` folder anywhere, `_SUCCESS`, `_lease.json`, `_accuracy.json`, `_probe-*`) is passed over
#     without a word: it is not anybody's data;
#   a hidden name (a path component beginning with `.`: `.DS_Store`, `.git/`) is a counted, listed skip;
#   everything else is an input, `_DSC0001.JPG` and `_MG_1234.JPG` (what cameras write) included.
BOOKKEEPING_FOLDERS = ("_staging", "_commits", "_rolled_back", "_runs", "_ledger", "_timeline")
BOOKKEEPING_FILES = ("_SUCCESS", "_lease.json", "_accuracy.json")


def name_rule(rel: str) -> str | None:
    """None for an input; "" for our own bookkeeping (silent); otherwise the reason of a listed skip."""
    parts = rel.split("/")
    if parts[0] in BOOKKEEPING_FOLDERS or parts[-1] in BOOKKEEPING_FILES or storage.LOCAL_TMP in parts[:-1]:
        return ""
    if len(parts) == 1 and parts[0].startswith("_probe-"):
        return ""
    if ".." in parts:
        return "a '..' path component (read as a path it would name another folder)"
    if any(p.startswith(".") for p in parts):
        return "hidden name (a path component begins with '.')"
    return None


@dataclass(frozen=True)
class Listed:
    """One file of a source, as the listing gave it."""

    uri: str
    rel: str  # relative to the source, '/'-separated
    size: int | None  # bytes, from the listing (None where it has none)


@dataclass(frozen=True)
class Sample:
    """One image planned into a shard set."""

    key: str  # stable, tar- and URL-safe (sha1 of the relative path, or digitNNNN)
    source: str  # where its bytes are read from
    label: int  # index into the set's classes; -1 in an unlabeled set
    split: str  # "train" or "val"
    data: bytes | None = None  # the bytes themselves, for an embedded set (the digits)
    size: int | None = None  # listed bytes: an object over the size cap is skipped without being read


def _skip(path: str, reason: str) -> dict:
    return {"path": path, "reason": reason}


def list_local(root: str, progress=None) -> tuple[list[Listed], list[dict], list[str]]:
    """Files, skipped entries, and folders without files. Symlinked folders and files are followed; a
    folder reached again through a link (a loop) and a dangling link are listed skips. `progress(n)`:
    called with each folder's count of entries as it is listed."""
    files, skipped, empty = [], [], []
    seen = {os.path.realpath(root): root}  # real folder -> the path it was first listed under
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if progress:
            progress(len(dirnames) + len(filenames))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        real_here = os.path.realpath(dirpath)
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            rel = d if rel_dir == "." else f"{rel_dir}/{d}"
            rule = name_rule(rel)
            target = os.path.realpath(full)
            if rule is not None:
                if rule:
                    skipped.append(_skip(full, rule))
            elif real_here == target or real_here.startswith(target + os.sep):  # a link to a folder above it
                skipped.append(_skip(full, f"symlink loop (points to {os.readlink(full)}, a folder above it)"))
            elif target in seen:
                skipped.append(_skip(full, f"the same folder as {seen[target]} (listed once)"))
            else:
                seen[target] = full
                keep.append(d)
        dirnames[:] = keep
        names = []
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            rule = name_rule(rel)
            if rule:
                skipped.append(_skip(os.path.join(dirpath, name), rule))
            elif rule is None:
                names.append(name)
        if not names and not dirnames and rel_dir != ".":
            empty.append(rel_dir)
        for name in names:
            path = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if os.path.islink(path) and not os.path.exists(path):
                skipped.append(_skip(path, f"dangling symlink (points to {os.readlink(path)})"))
                continue
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:  # os.walk hands undecodable bytes over as surrogates: no URI, no key
                shown = os.fsencode(path).decode("utf-8", "backslashreplace")
                skipped.append(_skip(shown, "file name is not UTF-8: rename it (e.g. convmv -f latin1 -t utf8)"))
                continue
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):  # a FIFO, socket or device: a read would block or never end
                skipped.append(_skip(path, "not a regular file (a FIFO, socket or device): never read"))
                continue
            files.append(Listed(path, rel, st.st_size))
    return files, skipped, empty


def _list_source(source: str) -> tuple[list[Listed], list[dict], list[str]]:
    loc = storage.parse_uri(source)
    if loc.scheme == "file":
        if not os.path.isdir(loc.path):
            raise storage.StorageError(f"--source {source} is not a folder")
        files, skipped, empty = list_local(loc.path)
    else:
        files, skipped, empty = [], [], []
        for info in storage.list_files(loc.uri):
            if info.size == 0 and info.path.endswith("/"):  # a console-made "folder" marker
                continue
            rel = info.path[len(loc.path) :].lstrip("/") if info.path.startswith(loc.path) else info.path
            uri = storage.to_uri(loc, info.path)
            rule = name_rule(rel)
            if rule:
                skipped.append(_skip(uri, rule))
            elif rule is None:
                files.append(Listed(uri, rel, info.size))
    if not files and not skipped:
        raise storage.StorageError(
            f"no files under {source}: expected class folders <class>/<image>, "
            "train/ and val/ of class folders, a flat prefix with --labels, or --unlabeled"
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
    source: str, *, labels: str | None = None, val_fraction: float, seed: int, unlabeled: bool = False
) -> tuple[list[str], list[Sample], list[dict]]:
    """Classes (sorted; [] for an unlabeled set), the samples and what was skipped before reading.

    The layout decides: `--labels` (a flat prefix and a CSV / JSON-lines file), `train/` and `val/` of
    class folders, class folders, or, with `unlabeled` or for a flat folder without labels, every image
    as an unlabeled sample (label -1; the split drawn by `val_fraction`).
    """
    files, skipped, empty = _list_source(source)
    root = source.rstrip("/")
    groups: dict[str, list[tuple[Listed, str]]] = {}  # class ("" unlabeled) -> [(file, split or "")]
    flat = all("/" not in f.rel for f in files)
    if labels:
        table = _read_labels(labels)
        seen = set()
        for f in files:
            if f.rel in table:
                groups.setdefault(table[f.rel], []).append((f, ""))
                seen.add(f.rel)
            else:
                skipped.append(_skip(f.uri, f"not in the labels file {labels}"))
        for rel in sorted(set(table) - seen):
            skipped.append(_skip(f"{root}/{rel}", "in the labels file but not under --source"))
    elif unlabeled or flat:
        groups[""] = [(f, "") for f in files]
    else:
        for folder in empty:
            skipped.append(_skip(f"{root}/{folder}", "empty folder (no images): not a class"))
        has_split = set(SPLITS) <= {f.rel.split("/", 1)[0] for f in files}  # keep an existing split
        for f in files:
            parts = f.rel.split("/")
            if has_split:
                if parts[0] not in SPLITS or len(parts) != 3:
                    skipped.append(_skip(f.uri, "not under <split>/<class>/<file>"))
                    continue
                groups.setdefault(parts[1], []).append((f, parts[0]))
            elif len(parts) != 2:
                skipped.append(_skip(f.uri, "not under <class>/<file> (--labels for a flat prefix, --unlabeled)"))
            else:
                groups.setdefault(parts[0], []).append((f, ""))
    if not groups or not any(groups.values()):
        raise ValueError(f"no images found under {source} ({len(skipped)} entries skipped){skip_examples(skipped)}")
    classes = sorted(c for c in groups if c)
    rng = np.random.default_rng(seed)
    samples = []
    for label, cls in [(-1, "")] if "" in groups else list(enumerate(classes)):
        items = groups[cls]
        if any(not split for _, split in items):  # stratified split, deterministic by seed
            val = set(rng.permutation(len(items))[: int(round(len(items) * val_fraction))].tolist())
            items = [(f, "val" if i in val else "train") for i, (f, _) in enumerate(items)]
        for f, split in items:
            key = hashlib.sha1(f.rel.encode()).hexdigest()[:16]  # stable, tar- and URL-safe
            samples.append(Sample(key, f.uri, label, split, size=f.size))
    return classes, samples, skipped


def skip_counts(skipped: list[dict]) -> dict[str, int]:
    """How many skips of each kind: the reason up to its first parenthesis or colon (numbers left out)."""
    out: dict[str, int] = {}
    for s in skipped:
        kind = _kind(s["reason"])
        out[kind] = out.get(kind, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _kind(reason: str) -> str:
    return re.sub(r"\d+(\.\d+)?(x\d+)?", "N", re.split(r"[(:]", reason, maxsplit=1)[0]).strip()


def skip_examples(skipped: list[dict], most: int = 3) -> str:
    """': 4 smaller than ... (e.g. a/1.png: image of 4x4 px ...); ...' for an error message."""
    if not skipped:
        return ""
    first: dict[str, dict] = {}
    for s in skipped:
        first.setdefault(_kind(s["reason"]), s)
    counts = skip_counts(skipped)
    return ": " + "; ".join(
        f"{n} {k} (e.g. {first[k]['path']}: {first[k]['reason']})" for k, n in list(counts.items())[:most]
    )


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
                "sizes": [s.size for s in chunk],
            }
            if chunk[0].data is not None:  # inline bytes (the embedded digits); the descriptor travels as JSON
                desc["data"] = [base64.b64encode(s.data).decode() for s in chunk]
            out.append(desc)
    return out
