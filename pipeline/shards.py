"""Shard sets: WebDataset (or Parquet) shards and their manifest, written by a Ray Data job, never changed after.

Layout under the output prefix:
  manifest.json                          the current version, replaced in one PUT once a version is complete
  versions/<version>/manifest.json       the same manifest, kept with its version
  versions/<version>/train/shard-00000.tar ...
  versions/<version>/val/shard-00000.tar ...
Every run writes a version folder of its own and only then points manifest.json at it: a job that
loaded the previous manifest goes on reading the previous version's files, which nothing rewrites.
Readers open exactly the files a manifest names and check each one's sha256 (`unpack_shards`).
`keep_versions` prunes the oldest complete versions (and incomplete ones a crashed run left a day ago).

A sample is three members: `{key}.image` (the original bytes), `{key}.cls` (the label), `{key}.json`
({"source", "label", "format", "width", "height"}); Parquet shards hold the same as columns. What goes
in is exactly what the training stream and batch inference decode (`transforms.check_decodes`, the one
set of decode rules); everything else is listed in the manifest's `skipped` with its reason.

Deterministic: with the same inputs, seed and arguments, every sample lands in the same split and
shard, and the shard bytes are identical (sorted listing, seeded permutation, tar headers with mtime 0).

The plan (listing, split, shard assignment) is made on the driver; each shard is one Ray Data task
that reads its images with a few concurrent GETs, checks them, streams the shard to a local temporary
file (memory bounded by a handful of images, not by the shard) and uploads it.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import resource
import tarfile
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import storage
from .transforms import ImageDecodeError, check_decodes

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
VERSIONS = "versions"
SPLITS = ("train", "val")
IMAGE_MEMBER = "image"
DEFAULT_MIN_SIZE = 32  # the largest patch size of the offered variants: every kept image fits every model
STALE_INCOMPLETE_S = 24 * 3600


class ShardIntegrityError(RuntimeError):
    """A shard's bytes differ from what its manifest recorded."""


@dataclass
class Plan:
    classes: list[str]
    shards: list[dict] = field(default_factory=list)  # {"split", "name", "keys", "sources", "labels", "data"?}
    skipped: list[dict] = field(default_factory=list)
    inputs: int = 0


# ---- listing -------------------------------------------------------------------------------------
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
        raise storage.StorageError(f"no files under {source}: expected class folders <class>/<image>, "
                                   "train/ and val/ of class folders, or a flat prefix with --labels")
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
                    raise ValueError(f"{labels_uri} line {n}: expected {{\"path\": ..., \"label\": ...}} ({e})") from None
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


def plan_source(source: str, *, labels: str | None = None, val_fraction: float, seed: int) -> tuple[list[str], list[tuple], list[dict]]:
    """Classes (sorted), samples (key, uri, label, split) and what was skipped before reading."""
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
            skipped.append({"path": f"{source.rstrip('/')}/{rel}", "reason": "in the labels file but not under --source"})
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
            samples.append((hashlib.sha1(rel.encode()).hexdigest()[:16], uri, label, split))  # stable, tar- and URL-safe
    return classes, samples, skipped


def plan_digits(val_fraction: float, seed: int, size: int = 32) -> tuple[list[str], list[tuple]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upscaled to `size` px RGB PNG: (key, source, label, split, bytes)."""
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
        samples.append((f"digit{i:04d}", f"sklearn:digits/{i}", int(label), "val" if is_val[i] else "train", buf.getvalue()))
    return [str(c) for c in range(10)], samples


def assign_shards(samples: list[tuple], shard_size: int, seed: int, ext: str, prefix: str) -> list[dict]:
    """Per split: sort by key, permute by seed (classes mixed within shards), cut into shards."""
    rng = np.random.default_rng(seed)
    out = []
    for split in SPLITS:
        rows = sorted((s for s in samples if s[3] == split), key=lambda s: s[0])
        rows = [rows[i] for i in rng.permutation(len(rows))]
        for j in range(0, len(rows), shard_size):
            chunk = rows[j:j + shard_size]
            desc = {"split": split, "name": f"{prefix}{split}/shard-{j // shard_size:05d}.{ext}",
                    "keys": [s[0] for s in chunk], "sources": [s[1] for s in chunk], "labels": [int(s[2]) for s in chunk]}
            if len(chunk[0]) > 4:  # inline bytes (the embedded digits)
                desc["data"] = [base64.b64encode(s[4]).decode() for s in chunk]
            out.append(desc)
    return out


# ---- one shard: read, check, write, upload ------------------------------------------------------
def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _read_ahead(desc: dict, reads: int):
    """(index, bytes or None, error or None) for each sample in order, at most `reads` GETs in flight."""
    inline = desc.get("data")

    def load(i):
        if inline is not None:
            return i, base64.b64decode(inline[i]), None
        try:
            return i, storage.read_bytes(desc["sources"][i]), None
        except (storage.StorageError, OSError) as e:
            return i, None, f"cannot read ({e})"

    n = len(desc["keys"])
    with ThreadPoolExecutor(max(1, reads)) as pool:
        pending: deque = deque()
        for i in range(n):
            pending.append(pool.submit(load, i))
            if len(pending) >= reads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _ShardSink:
    """Streams samples into a local temporary file (tar or Parquet), hashing nothing until it is closed."""

    def __init__(self, fmt: str, folder: str):
        self.fmt, self.path = fmt, os.path.join(folder, "shard")
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                                     ("format", pa.string()), ("source", pa.string()), ("width", pa.int32()),
                                     ("height", pa.int32())])
            self.writer = pq.ParquetWriter(self.path, self.schema)
            self.rows: list[dict] = []
        else:
            self.tar = tarfile.open(self.path, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key, data, label, fmt, source, width, height):
        if self.fmt == "parquet":
            self.rows.append(dict(key=key, image=data, label=label, format=fmt, source=source, width=width, height=height))
            if len(self.rows) >= 64:
                self._flush()
            return
        _tar_member(self.tar, f"{key}.{IMAGE_MEMBER}", data)
        _tar_member(self.tar, f"{key}.cls", str(label).encode())
        meta = {"source": source, "label": label, "format": fmt, "width": width, "height": height}
        _tar_member(self.tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())

    def _flush(self):
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema), row_group_size=64)
            self.rows = []

    def close(self) -> tuple[int, str]:
        if self.fmt == "parquet":
            self._flush()
            self.writer.close()
        else:
            self.tar.close()
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return os.path.getsize(self.path), h.hexdigest()


def write_shard(desc: dict, output: str, fmt: str, min_size: int, reads: int = 8) -> dict:
    """Read, check and pack one shard, then upload it to `output`/`desc["name"]`. Returns its manifest
    entry with per-class counts and the skipped samples; writes nothing when every sample was skipped."""
    t0 = time.time()
    skipped, per_label = [], {}
    with tempfile.TemporaryDirectory(prefix="vitray-shard-") as tmp:
        sink = _ShardSink(fmt, tmp)
        count = 0
        for i, data, err in _read_ahead(desc, reads):
            source = desc["sources"][i]
            if err is None:
                try:
                    width, height, image_format = check_decodes(data, min_size)
                except ImageDecodeError as e:
                    err = str(e)
            if err is not None:
                skipped.append({"path": source, "reason": err})
                log.warning("skipping %s: %s", source, err)
                continue
            label = desc["labels"][i]
            sink.add(desc["keys"][i], data, label, image_format, source, width, height)
            per_label[label] = per_label.get(label, 0) + 1
            count += 1
        size, sha = sink.close()
        if count:
            storage.upload_file(sink.path, storage.parse_uri(output).join(desc["name"]).uri)
    return {"split": desc["split"], "name": desc["name"], "count": count, "bytes": size if count else 0,
            "sha256": sha if count else "", "per_label": {str(k): v for k, v in per_label.items()},
            "skipped": json.dumps(skipped), "seconds": time.time() - t0,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _write_rows(row: dict, output: str, fmt: str, min_size: int, reads: int) -> dict:
    """Ray Data `map` step: one shard descriptor (JSON) -> its manifest entry."""
    return write_shard(json.loads(row["desc"]), output, fmt, min_size, reads)


# ---- the job ------------------------------------------------------------------------------------
_last_version_us = 0


def new_version() -> str:
    """A version id that sorts in creation order (pruning keeps the newest by name): UTC time to the
    microsecond, strictly increasing within a process. Against an id of the older whole-second format
    it sorts by the second (within the same second either way)."""
    global _last_version_us
    us = _last_version_us = max(time.time_ns() // 1000, _last_version_us + 1)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(us // 1_000_000))}.{us % 1_000_000:06d}Z-{uuid.uuid4().hex[:6]}"


def make_shards(source: str, output: str, *, labels: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                shard_size: int = 256, fmt: str = "webdataset", min_size: int = DEFAULT_MIN_SIZE, reads: int = 8,
                executor: str = "ray", keep_versions: int | None = None, progress: bool = True,
                on_result=None) -> dict:
    """Check, split and pack `source` into a new version of shards under `output`; returns the manifest.

    `executor="ray"`: one Ray Data task per shard on the cluster (or the job's local Ray);
    `"local"`: the same per-shard function, one shard after another in this process.
    """
    if fmt not in ("webdataset", "parquet"):
        raise ValueError(f"--format must be webdataset or parquet, got {fmt!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if min_size < 1:
        raise ValueError(f"--min-size must be at least 1, got {min_size}")
    if keep_versions is not None and keep_versions < 1:
        raise ValueError(f"--keep-versions must be at least 1 (the version just written), got {keep_versions}")
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    out = storage.parse_uri(output)
    storage.check_bucket(out.uri)
    t0 = time.time()
    if source == "digits":
        classes, samples = plan_digits(val_fraction, seed)
        skipped: list[dict] = []
    else:
        storage.check_bucket(source)
        if labels:
            storage.check_bucket(labels)
        classes, samples, skipped = plan_source(source, labels=labels, val_fraction=val_fraction, seed=seed)
    version = new_version()
    prefix = f"{VERSIONS}/{version}/"
    descs = assign_shards(samples, shard_size, seed, "parquet" if fmt == "parquet" else "tar", prefix)
    n_inputs = len(samples)
    del samples

    entries = []
    results = _run_ray(descs, out.uri, fmt, min_size, reads, progress) if executor == "ray" else \
        (write_shard(d, out.uri, fmt, min_size, reads) for d in descs)
    bar = _progress(len(descs), progress)
    for r in results:
        entries.append(r)
        if on_result:
            on_result(r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(images=sum(e["count"] for e in entries), skipped=sum(len(json.loads(e["skipped"])) for e in entries))
    if bar is not None:
        bar.close()

    manifest = {"format": fmt, "layout": 2, "version": version, "classes": classes, "source": source, "seed": seed,
                "shard_size": shard_size, "val_fraction": val_fraction, "min_size": min_size,
                "image_member": IMAGE_MEMBER, "splits": {}, "skipped": []}
    for split in SPLITS:
        mine = sorted((e for e in entries if e["split"] == split), key=lambda e: e["name"])
        per_class = {c: 0 for c in classes}
        for e in mine:
            for label, n in e["per_label"].items():
                per_class[classes[int(label)]] += n
        manifest["splits"][split] = {
            "count": sum(e["count"] for e in mine), "per_class": per_class,
            "shards": [{k: e[k] for k in ("name", "count", "bytes", "sha256")} for e in mine if e["count"]]}
    for e in entries:
        skipped.extend(json.loads(e["skipped"]))
    manifest["skipped"] = sorted(skipped, key=lambda d: d["path"])
    body = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_bytes(out.join(prefix + MANIFEST).uri, body)  # the version is complete
    storage.write_bytes(out.join(MANIFEST).uri, body)  # and current: one PUT replaces the pointer
    pruned = prune_versions(out.uri, keep_versions) if keep_versions else []
    dt = time.time() - t0
    total_bytes = sum(e["bytes"] for e in entries)
    n_shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    manifest["_summary"] = (
        f"{manifest['splits']['train']['count'] + manifest['splits']['val']['count']} images "
        f"({manifest['splits']['train']['count']} train, {manifest['splits']['val']['count']} val), {len(classes)} classes, "
        f"{n_shards} shards, {len(manifest['skipped'])} skipped, {total_bytes / 1e6:.1f} MB, "
        f"{n_inputs / max(dt, 1e-9):.0f} images/s -> version {version} at {out.join(MANIFEST).uri}"
        + (f"; pruned {len(pruned)} old version(s)" if pruned else ""))
    manifest["_tasks"] = entries
    return manifest


def _progress(total: int, on: bool):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="make_shards", dynamic_ncols=True)


def _run_ray(descs: list[dict], output: str, fmt: str, min_size: int, reads: int, progress: bool):
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    ds = ray.data.from_items([{"desc": json.dumps(d)} for d in descs], override_num_blocks=max(1, len(descs)))
    ds = ds.map(_write_rows, fn_kwargs={"output": output, "fmt": fmt, "min_size": min_size, "reads": reads}, num_cpus=1)
    return ds.iter_rows()


def prune_versions(output: str, keep: int, now: float | None = None) -> list[str]:
    """Remove all but the newest `keep` complete versions, and incomplete version folders older than a day
    (a crashed run's); never the version manifest.json names. Returns the removed version ids."""
    out = storage.parse_uri(output)
    current = json.loads(storage.read_bytes(out.join(MANIFEST).uri)).get("version")
    files = storage.list_files(out.join(VERSIONS).uri)
    versions: dict[str, dict] = {}
    base = out.join(VERSIONS).path
    for f in files:
        rel = posixpath.relpath(f.path, base) if out.scheme == "s3" else os.path.relpath(f.path, base).replace(os.sep, "/")
        v = rel.split("/", 1)[0]
        info = versions.setdefault(v, {"complete": False, "newest": 0.0})
        info["complete"] |= rel == f"{v}/{MANIFEST}"
        if f.mtime is not None:
            info["newest"] = max(info["newest"], f.mtime.timestamp())
    now = now or time.time()
    complete = sorted(v for v, i in versions.items() if i["complete"])
    doomed = [v for v in complete[:-keep] if v != current]
    doomed += [v for v, i in versions.items() if not i["complete"] and v != current and now - i["newest"] > STALE_INCOMPLETE_S]
    for v in doomed:
        storage.delete(out.join(f"{VERSIONS}/{v}").uri, recursive=True)
    return sorted(doomed)


# ---- reading ------------------------------------------------------------------------------------
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
    base = posixpath.dirname(loc.uri) if loc.scheme == "s3" else os.path.dirname(loc.path)
    if manifest.get("layout", 1) >= 2 and base.endswith(f"{VERSIONS}/{manifest['version']}"):
        base = base[: -len(f"/{VERSIONS}/{manifest['version']}")]  # a version's own copy: names are relative to the root
    manifest["_base"] = base
    return manifest


def shard_uris(manifest: dict, split: str) -> list[str]:
    base = manifest["_base"]
    if split not in manifest["splits"]:
        raise ValueError(f"the manifest has no {split!r} split (has {sorted(manifest['splits'])})")
    return [f"{base}/{s['name']}" for s in manifest["splits"][split]["shards"]]


def expected_digests(manifest: dict, split: str) -> dict[str, str]:
    """{filesystem path: sha256} of a split's shards, as `read_binary_files` reports paths."""
    return {storage.parse_uri(u).path: s.get("sha256")
            for u, s in zip(shard_uris(manifest, split), manifest["splits"][split]["shards"])}


def unpack_shards(batch: dict, digests: dict[str, str], fmt: str) -> dict:
    """map_batches step: whole shard files (`bytes`, `path`) -> one row per sample {key, image, label,
    format, __url__}, each file's sha256 checked against the manifest first."""
    keys, images, labels, formats, urls = [], [], [], [], []
    for data, path in zip(batch["bytes"], batch["path"]):
        data = bytes(data)
        want = digests.get(path)
        got = hashlib.sha256(data).hexdigest()
        if want and got != want:
            raise ShardIntegrityError(
                f"shard {path} does not match its manifest: sha256 {got} != {want}. The file changed after the "
                "manifest was written (overwritten or damaged in storage); run make_shards again to write a new version")
        for key, image, label, image_format in _samples_of(data, fmt):
            keys.append(key)
            images.append(image)
            labels.append(label)
            formats.append(image_format)
            urls.append(path)
    return {"key": np.asarray(keys, dtype=object), "image": np.asarray(images, dtype=object),
            "label": np.asarray(labels, dtype=np.int64), "format": np.asarray(formats, dtype=object),
            "__url__": np.asarray(urls, dtype=object)}


def _tar_files(data: bytes):
    """(name, content) of every regular file in a tar archive held in memory.

    Plain ustar/v7 headers (what make_shards writes) are parsed directly: tarfile's generic reader
    costs about as much per member as the sha256 of the shard. Any other entry (pax or GNU long
    names, sparse files) hands the whole archive to tarfile, which reads every format."""
    view, pos, out = memoryview(data), 0, []
    while pos + 512 <= len(data):
        header = data[pos:pos + 512]
        if header.count(0) == 512:  # end-of-archive blocks
            return out
        kind = header[156:157]
        try:
            size = int(header[124:136].rstrip(b"\0 ").decode("ascii") or "0", 8)
        except ValueError:
            break
        if kind not in (b"0", b"\0", b"5") or sum(header[:148]) + 256 + sum(header[156:]) != _checksum(header):
            break
        start = pos + 512
        if start + size > len(data):  # truncated: let tarfile say so
            break
        if kind != b"5":
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            out.append((name.decode("utf-8"), bytes(view[start:start + size])))
        pos = start + (size + 511) // 512 * 512
    # no end-of-archive marker where one was due, or an entry of another kind: tarfile decides
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _checksum(header: bytes) -> int:
    try:
        return int(header[148:156].rstrip(b"\0 ").decode("ascii"), 8)
    except ValueError:
        return -1


def _samples_of(data: bytes, fmt: str):
    """(key, image bytes or None, label, format) of every sample in one shard file (both layouts)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
        cols = table.column_names
        fmts = table.column("format" if "format" in cols else "ext").to_pylist()
        yield from zip(table.column("key").to_pylist(), table.column("image").to_pylist(),
                       table.column("label").to_pylist(), fmts)
        return
    members: dict[str, dict[str, bytes]] = {}
    order = []
    for name, content in _tar_files(data):
        key, _, ext = name.rpartition(".")
        if key not in members:
            members[key] = {}
            order.append(key)
        members[key][ext] = content
    for key in order:
        parts = members[key]
        label = int(parts["cls"].decode()) if "cls" in parts else -1
        meta = json.loads(parts["json"]) if "json" in parts else {}
        image = parts.get(IMAGE_MEMBER)
        if image is None:  # layout 1: the image member named by its format's extension
            image = next((v for k, v in parts.items() if k not in ("cls", "json")), None)
        yield key, image, label, meta.get("format", "")
