"""Make WebDataset (or Parquet) shards from a class-folder tree or the embedded digits, with a manifest.

Layout under the output prefix:
  manifest.json                 written last: a reader that finds it finds a complete data set
  train/shard-00000.tar ...     `{key}.{jpg|png|gif|...}` (original bytes), `{key}.cls`, `{key}.json`
  val/shard-00000.tar ...
Shards are deterministic for the same inputs and arguments: sample order by seed, fixed tar
headers (mtime 0, uid 0), no timestamps in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import sys
import tarfile
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import storage
from .transforms import ImageDecodeError, check_decodes

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FORMAT_EXT = {"jpeg": "jpg", "png": "png", "gif": "gif", "bmp": "bmp", "webp": "webp", "tiff": "tiff", "ppm": "ppm"}
SPLITS = ("train", "val")


@dataclass
class Sample:
    key: str
    source: str  # where the bytes came from (URI, or sklearn:digits/i)
    label: int
    split: str
    data: bytes | None = None


def _list_tree(source: str) -> list[tuple[str, str]]:
    """(uri, relative path) of every file under a local folder or S3 prefix, sorted."""
    loc = storage.parse_uri(source)
    files = storage.list_files(loc.uri)
    if not files:
        raise storage.StorageError(f"no files under {loc.uri}: expected a class-folder tree <split?>/<class>/<image>")
    out = []
    for info in files:
        rel = posixpath.relpath(info.path, loc.path) if loc.scheme == "s3" else os.path.relpath(info.path, loc.path)
        out.append((storage.to_uri(loc, info.path), rel.replace(os.sep, "/")))
    return out


def plan_class_tree(source: str, val_fraction: float, seed: int) -> tuple[list[str], list[Sample], list[dict]]:
    """Classes (sorted), samples with labels and splits, and files skipped before reading."""
    entries = _list_tree(source)
    skipped = []
    has_split = set(SPLITS) <= {rel.split("/", 1)[0] for _, rel in entries}  # keep an existing split
    by_class: dict[str, list[tuple[str, str, str]]] = {}
    for uri, rel in entries:
        parts = rel.split("/")
        if parts[-1].startswith("."):
            continue  # hidden files (.DS_Store) are not inputs
        if has_split:
            if parts[0] not in SPLITS or len(parts) != 3:
                skipped.append({"path": uri, "reason": "not under <split>/<class>/<file>"})
                continue
            split, cls = parts[0], parts[1]
        else:
            if len(parts) != 2:
                skipped.append({"path": uri, "reason": "not under <class>/<file>"})
                continue
            split, cls = "", parts[0]
        by_class.setdefault(cls, []).append((uri, rel, split))
    classes = sorted(by_class)
    if not classes:
        raise ValueError(f"no class folders found under {source}")
    rng = np.random.default_rng(seed)
    samples = []
    for label, cls in enumerate(classes):
        items = by_class[cls]
        if not has_split:  # stratified split, deterministic by seed
            val = set(rng.permutation(len(items))[: int(round(len(items) * val_fraction))].tolist())
            items = [(u, r, "val" if i in val else "train") for i, (u, r, _) in enumerate(items)]
        for uri, rel, split in items:
            key = hashlib.sha1(rel.encode()).hexdigest()[:16]  # stable, tar- and URL-safe
            samples.append(Sample(key, uri, label, split))
    return classes, samples, skipped


def plan_digits(val_fraction: float, seed: int, size: int = 32) -> tuple[list[str], list[Sample]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to `size` px RGB PNG."""
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
        samples.append(Sample(f"digit{i:04d}", f"sklearn:digits/{i}", int(label), "val" if is_val[i] else "train", buf.getvalue()))
    return [str(c) for c in range(10)], samples


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _shard_bytes(samples: list[Sample], fmt: str, exts: dict[str, str]) -> bytes:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"key": [s.key for s in samples], "image": [s.data for s in samples],
                          "label": pa.array([s.label for s in samples], pa.int64()),
                          "ext": [exts[s.key] for s in samples], "source": [s.source for s in samples]})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=64)
        return buf.getvalue()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _tar_member(tar, f"{s.key}.{exts[s.key]}", s.data)
            _tar_member(tar, f"{s.key}.cls", str(s.label).encode())
            _tar_member(tar, f"{s.key}.json", json.dumps({"source": s.source, "label": s.label}).encode())
    return buf.getvalue()


def _put(uri: str, data: bytes) -> None:
    """Upload under a temporary name, then move into place (server-side copy on S3)."""
    loc = storage.parse_uri(uri)
    tmp = f"{posixpath.dirname(loc.uri)}/_tmp-{uuid.uuid4().hex[:8]}-{posixpath.basename(loc.uri)}" if loc.scheme == "s3" else None
    if tmp is None:
        storage.write_bytes(uri, data)  # local: temp file + atomic rename
        return
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        storage.upload_file(f.name, tmp)  # multipart, parallel parts, retries
    storage.copy(tmp, uri)
    storage.delete(tmp)


def make_shards(source: str, output: str, *, val_fraction: float = 0.1, seed: int = 0, shard_size: int = 256,
                fmt: str = "webdataset", workers: int = 8, progress: bool = True) -> dict:
    """Check, split and pack the inputs into shards under `output`; returns the manifest."""
    if fmt not in ("webdataset", "parquet"):
        raise ValueError(f"--format must be webdataset or parquet, got {fmt!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out = storage.parse_uri(output)
    storage.check_bucket(out.uri)
    t0 = time.time()
    if source == "digits":
        classes, samples = plan_digits(val_fraction, seed)
        skipped: list[dict] = []
    else:
        storage.check_bucket(source)
        classes, samples, skipped = plan_class_tree(source, val_fraction, seed)

    # Read and check every input: original bytes are kept only if they decode.
    def load(s: Sample):
        try:
            data = s.data if s.data is not None else storage.read_bytes(s.source)
            _, _, fmt_name = check_decodes(data)
            return s, data, FORMAT_EXT.get(fmt_name, fmt_name or "img"), None
        except ImageDecodeError as e:
            return s, None, None, str(e)

    good: list[Sample] = []
    exts: dict[str, str] = {}
    with ThreadPoolExecutor(workers) as pool:
        for i, (s, data, ext, err) in enumerate(pool.map(load, samples), 1):
            if err:
                skipped.append({"path": s.source, "reason": err})
                log.warning("skipping %s: %s", s.source, err)
            else:
                s.data, exts[s.key] = data, ext
                good.append(s)
            if progress and (i % 200 == 0 or i == len(samples)):
                print(f"\rchecked {i}/{len(samples)} inputs, {len(skipped)} skipped", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)

    # Any older manifest goes first: from here until the new one lands, readers see no data set.
    storage.delete(out.join(MANIFEST).uri)
    rng = np.random.default_rng(seed)
    manifest = {"format": fmt, "version": 1, "classes": classes, "source": source, "seed": seed,
                "shard_size": shard_size, "val_fraction": val_fraction, "splits": {},
                "skipped": sorted(skipped, key=lambda d: d["path"])}
    total_bytes = 0
    ext = "parquet" if fmt == "parquet" else "tar"
    jobs = []
    for split in SPLITS:
        rows = sorted((s for s in good if s.split == split), key=lambda s: s.key)
        rows = [rows[i] for i in rng.permutation(len(rows))]  # classes mixed within shards
        shards = [rows[i : i + shard_size] for i in range(0, len(rows), shard_size)]
        per_class = {c: 0 for c in classes}
        for s in rows:
            per_class[classes[s.label]] += 1
        manifest["splits"][split] = {"count": len(rows), "per_class": per_class, "shards": []}
        for j, chunk in enumerate(shards):
            jobs.append((split, f"{split}/shard-{j:05d}.{ext}", chunk))

    def write(job):
        split, name, chunk = job
        data = _shard_bytes(chunk, fmt, exts)
        _put(out.join(name).uri, data)
        return split, {"name": name, "count": len(chunk), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    with ThreadPoolExecutor(min(workers, 4)) as pool:
        for split, entry in pool.map(write, jobs):
            manifest["splits"][split]["shards"].append(entry)
            total_bytes += entry["bytes"]
    storage.write_bytes(out.join(MANIFEST).uri, json.dumps(manifest, indent=2, sort_keys=True).encode())
    dt = time.time() - t0
    n_shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    summary = (f"{len(good)} images ({manifest['splits']['train']['count']} train, {manifest['splits']['val']['count']} val), "
               f"{len(classes)} classes, {n_shards} shards, {len(skipped)} skipped, {total_bytes / 1e6:.1f} MB, "
               f"{len(samples) / max(dt, 1e-9):.0f} images/s -> {out.join(MANIFEST).uri}")
    manifest["_summary"] = summary
    return manifest


def load_manifest(uri: str) -> dict:
    """Read a manifest by its URI, or by the prefix that holds it."""
    loc = storage.parse_uri(uri)
    if not loc.uri.endswith(".json"):
        loc = loc.join(MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(loc.uri))
    except storage.StorageError as e:
        if "no such object" in str(e):
            raise storage.StorageError(
                f"no manifest at {loc.uri}: make shards first (`python jobs/make_shards.py --output "
                f"{posixpath.dirname(loc.uri)}`) or pass the manifest's URI"
            ) from None
        raise
    manifest["_base"] = posixpath.dirname(loc.uri) if loc.scheme == "s3" else os.path.dirname(loc.path)
    return manifest


def shard_uris(manifest: dict, split: str) -> list[str]:
    base = manifest["_base"]
    if split not in manifest["splits"]:
        raise ValueError(f"the manifest has no {split!r} split (has {sorted(manifest['splits'])})")
    return [f"{base}/{s['name']}" for s in manifest["splits"][split]["shards"]]
