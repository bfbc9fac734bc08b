"""Writing a shard set: a Ray Data job that packs WebDataset (or Parquet) shards and their manifest.

Every run writes a version folder of its own (`shard_reader` has the layout) and only then points
manifest.json at it: a job that loaded the previous manifest goes on reading the previous version's
files, which nothing rewrites. `keep_versions` prunes the oldest complete versions (and incomplete
ones a crashed run left a day ago). What goes in is exactly what the training stream and batch
inference decode (`images.DecodeRules`, the one set of decode rules); everything else is listed
in the manifest's `skipped` with its reason. The shard bytes are identical for the same inputs, seed
and arguments (tar headers with mtime 0).

The plan (listing, split, shard assignment: `sources`) is made on the driver; each shard is one Ray
Data task that reads its images with a few concurrent GETs, checks them, streams the shard to a local
temporary file (memory bounded by a handful of images, not by the shard) and uploads it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import resource
import shutil
import tarfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.core import scratch, storage
from pipeline.data.images import DecodeRules, ImageDecodeError, shrink
from pipeline.data.manifest import (
    IMAGE_MEMBER,
    MANIFEST,
    SPLITS,
    VERSIONS,
    Manifest,
    ShardEntry,
    Split,
    prune_versions,
    write_manifest,
)
from pipeline.data.sources import assign_shards, plan_digits, plan_source, skip_counts, skip_examples

log = logging.getLogger(__name__)
SHARD_TMP_PREFIX = "vitray-shard-"


# ---- one shard: read, check, write, upload ------------------------------------------------------
def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _read_ahead(desc: dict, reads: int, rules: DecodeRules):
    """(index, bytes or None, error or None) for each sample in order, at most `reads` GETs in flight;
    an object over the size cap is never read (memory: at most `reads` x the cap)."""
    inline = desc.get("data")
    sizes = desc.get("sizes") or [None] * len(desc["keys"])

    def load(i):
        if inline is not None:
            return i, base64.b64decode(inline[i]), None
        try:
            rules.check_object_size(sizes[i])
            return i, storage.read_bytes(desc["sources"][i]), None
        except ImageDecodeError as e:
            return i, None, str(e)
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

            self.schema = pa.schema(
                [
                    ("key", pa.string()),
                    ("image", pa.binary()),
                    ("label", pa.int64()),
                    ("format", pa.string()),
                    ("source", pa.string()),
                    ("width", pa.int32()),
                    ("height", pa.int32()),
                ]
            )
            self.writer = pq.ParquetWriter(self.path, self.schema)
            self.rows: list[dict] = []
        else:
            self.tar = tarfile.open(self.path, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, key, data, label, fmt, source, width, height):
        if self.fmt == "parquet":
            self.rows.append(
                dict(key=key, image=data, label=label, format=fmt, source=source, width=width, height=height)
            )
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


def write_shard(
    desc: dict, output: str, fmt: str, rules: DecodeRules, reads: int = 8, max_side: int | None = None
) -> dict:
    """Read, check and pack one shard, then upload it to `output`/`desc["name"]`. Returns its manifest
    entry with per-class counts and the skipped samples; writes nothing when every sample was skipped."""
    t0 = time.time()
    skipped, per_label = [], {}
    scratch.remove_dead_owners(SHARD_TMP_PREFIX)  # what a task killed with SIGKILL left on this node
    tmp = scratch.owned_temp_dir(SHARD_TMP_PREFIX)
    try:
        sink = _ShardSink(fmt, tmp)
        count = 0
        for i, data, err in _read_ahead(desc, reads, rules):
            source = desc["sources"][i]
            if err is None:
                try:
                    width, height, image_format = rules.check(data)
                    if max_side and max(width, height) > max_side:  # stored at training size, aspect kept
                        data, width, height, image_format = shrink(data, max_side)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "split": desc["split"],
        "name": desc["name"],
        "count": count,
        "bytes": size if count else 0,
        "sha256": sha if count else "",
        "per_label": {str(k): v for k, v in per_label.items()},
        "skipped": json.dumps(skipped),
        "seconds": time.time() - t0,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _write_rows(row: dict, output: str, fmt: str, rules: DecodeRules, reads: int, max_side: int | None) -> dict:
    """Ray Data `map` step: one shard descriptor (JSON) -> its manifest entry."""
    return write_shard(json.loads(row["desc"]), output, fmt, rules, reads, max_side)


# ---- the job ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSetWritten:
    """What one make_shards run wrote: the manifest (now current), a line for people, and each shard task's
    own figures (count, bytes, seconds, peak RSS) for benchmarks."""

    manifest: Manifest
    summary: str
    tasks: list[dict]


_last_version_us = 0


def new_version() -> str:
    """A version id that sorts in creation order (pruning keeps the newest by name): UTC time to the
    microsecond, strictly increasing within a process. Against an id of the older whole-second format
    it sorts by the second (within the same second either way)."""
    global _last_version_us
    us = _last_version_us = max(time.time_ns() // 1000, _last_version_us + 1)
    return (
        f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(us // 1_000_000))}.{us % 1_000_000:06d}Z-{uuid.uuid4().hex[:6]}"
    )


def make_shards(
    source: str,
    output: str,
    *,
    labels: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 256,
    fmt: str = "webdataset",
    rules: DecodeRules | None = None,
    unlabeled: bool = False,
    max_side: int | None = None,
    reads: int = 8,
    executor: str = "ray",
    keep_versions: int | None = None,
    prune_in_use: bool = False,
    provenance: dict | None = None,
    label_skips: dict[str, str] | None = None,
    progress: bool = True,
    on_result=None,
) -> ShardSetWritten:
    """Check, split and pack `source` into a new version of shards under `output`.

    `executor="ray"`: one Ray Data task per shard on the cluster (or the job's local Ray);
    `"local"`: the same per-shard function, one shard after another in this process.
    """
    if fmt not in ("webdataset", "parquet"):
        raise ValueError(f"--format must be webdataset or parquet, got {fmt!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    rules = rules or DecodeRules()
    if max_side is not None and max_side < rules.min_side:
        raise ValueError(f"--max-side {max_side} is below --min-size {rules.min_side}: no image could be stored")
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
        classes, samples, skipped = plan_source(
            source, labels=labels, val_fraction=val_fraction, seed=seed, unlabeled=unlabeled
        )
        if label_skips:  # why an input got no label (pseudo-labels): said instead of "not in the labels file"
            skipped = [{**x, "reason": label_skips.get(x["path"], x["reason"])} for x in skipped]
    version = new_version()
    descs = assign_shards(samples, shard_size, seed, "parquet" if fmt == "parquet" else "tar", f"{VERSIONS}/{version}/")
    n_inputs = len(samples)
    del samples

    entries = []
    results = (
        _run_ray(descs, out.uri, fmt, rules, reads, max_side, progress)
        if executor == "ray"
        else (write_shard(d, out.uri, fmt, rules, reads, max_side) for d in descs)
    )
    bar = _progress(len(descs), progress)
    for r in results:
        entries.append(r)
        if on_result:
            on_result(r)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                images=sum(e["count"] for e in entries), skipped=sum(len(json.loads(e["skipped"])) for e in entries)
            )
    if bar is not None:
        bar.close()

    splits = {}
    for split in SPLITS:
        mine = sorted((e for e in entries if e["split"] == split), key=lambda e: e["name"])
        per_class = {c: 0 for c in classes}  # {} in an unlabeled set
        for e in mine:
            for label, n in e["per_label"].items():
                if int(label) >= 0:
                    per_class[classes[int(label)]] += n
        shards = [ShardEntry(e["name"], e["count"], e["bytes"], e["sha256"]) for e in mine if e["count"]]
        splits[split] = Split(sum(e["count"] for e in mine), per_class, shards)
    for e in entries:
        skipped.extend(json.loads(e["skipped"]))
    skipped.sort(key=lambda d: d["path"])
    empty = [s for s in SPLITS if not splits[s].count and (s == "train" or val_fraction > 0)]
    if empty:  # nothing is published: the version folder goes, manifest.json keeps naming the previous one
        storage.delete(out.join(VERSIONS, version).uri, recursive=True)
        what = "nothing usable" if not any(splits[s].count for s in SPLITS) else f"the {empty[0]} split is empty"
        raise ValueError(
            f"{what} in {source}: {n_inputs} inputs, {len(skipped)} skipped{skip_examples(skipped)}"
            + ("" if what == "nothing usable" else "; lower --val-fraction to 0 or add images")
        )
    manifest = Manifest(
        format=fmt,
        version=version,
        classes=classes,
        splits=splits,
        skipped=skipped,
        source=source,
        seed=seed,
        shard_size=shard_size,
        val_fraction=val_fraction,
        min_size=rules.min_side,
        max_aspect=rules.max_aspect,
        max_object_mb=rules.max_object_mb,
        max_side=max_side,
        provenance=provenance,
        skip_counts=skip_counts(skipped),
        base=out.uri if out.scheme == "s3" else out.path,  # as load_manifest gives it
    )
    write_manifest(out.uri, manifest)
    pruned, in_use = prune_versions(out.uri, keep_versions, prune_in_use=prune_in_use) if keep_versions else ([], {})
    dt = time.time() - t0
    summary = (
        f"{manifest.summary()}, {n_inputs / max(dt, 1e-9):.0f} images/s -> version {version} at "
        f"{out.join(MANIFEST).uri}"
        + (f"; pruned {len(pruned)} old version(s)" if pruned else "")
        + (
            f"; kept {len(in_use)} old version(s) that unfinished runs use ({_users(in_use)}; "
            "--prune-in-use removes them anyway, and those runs can then never resume)"
            if in_use
            else ""
        )
    )
    return ShardSetWritten(manifest, summary, entries)


def _users(in_use: dict[str, list[str]]) -> str:
    return ", ".join(f"{v}: {', '.join(runs[:3])}" + (" ..." if len(runs) > 3 else "") for v, runs in in_use.items())


def _progress(total: int, on: bool):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="shard", desc="make_shards", dynamic_ncols=True)


def _run_ray(
    descs: list[dict], output: str, fmt: str, rules: DecodeRules, reads: int, max_side: int | None, progress: bool
):
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress
    ds = ray.data.from_items([{"desc": json.dumps(d)} for d in descs], override_num_blocks=max(1, len(descs)))
    kwargs = {"output": output, "fmt": fmt, "rules": rules, "reads": reads, "max_side": max_side}
    ds = ds.map(_write_rows, fn_kwargs=kwargs, num_cpus=1)
    return ds.iter_rows()
