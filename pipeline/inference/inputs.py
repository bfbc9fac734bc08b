"""What batch inference reads: the inputs listed, and each one's bytes fetched and turned into patches.

list_inputs(): --input as shards (a manifest), a class tree (`<class>/<image>`, labels known) or a
               plain prefix of images -> an Arrow table (image_uri, label_id, size, input_version)
fetch_and_preprocess(): map_batches step, image URIs -> bytes (`reads` GETs in flight) -> eval patches
shard_rows(): map_batches step, WebDataset/Parquet shard rows -> (image_uri, bytes, label_id)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.core import storage
from pipeline.data.images import ImageDecodeError
from pipeline.data.manifest import MANIFEST, load_manifest
from pipeline.data.sources import name_rule
from pipeline.data.transforms import ImageTransform
from pipeline.inference.infer_config import InferConfig
from pipeline.inference.predictor import preprocess

INPUT_SCHEMA = pa.schema(
    [("image_uri", pa.string()), ("label_id", pa.int64()), ("size", pa.int64()), ("input_version", pa.string())]
)
TRANSIENT, PERMANENT = "transient", "permanent"  # error kinds: retried by a later run, or final for this version


@dataclass
class Inputs:
    """The listed inputs of one run as Arrow (image_uri, label_id or -1, listed size or -1, input_version:
    `size:mtime`, what tells a changed object), their kind, and what the naming rule
    (`sources.name_rule`, make_shards' own) left out, with the reason."""

    table: pa.Table
    kind: str  # "images", "class-tree" or "shards"
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]

    def __len__(self) -> int:
        return self.table.num_rows


def _version(f) -> str:
    mtime = f.mtime.timestamp() if f.mtime is not None else 0
    return f"{f.size}:{int(mtime)}"


def is_shards(uri: str) -> bool:
    loc = storage.parse_uri(uri)
    return loc.uri.endswith(".json") or storage.exists(loc.join(MANIFEST).uri)


def list_inputs(cfg: InferConfig, class_names: list[str], start_after: str | None = None) -> Inputs:
    """Every input under --input by make_shards' naming rule (`_DSC0001.JPG` is an input, a hidden name a
    listed skip, our own bookkeeping passed over), sorted as listed, keys exactly as the listing gave them."""
    loc = storage.parse_uri(cfg.input)
    if is_shards(loc.uri):
        manifest = load_manifest(loc.uri)
        uris = [u for split in manifest.splits if cfg.split in (None, split) for u in manifest.shard_uris(split)]
        n = len(uris)
        return Inputs(
            pa.table([uris, [-1] * n, [-1] * n, pa.nulls(n, pa.string())], schema=INPUT_SCHEMA),
            "shards",
        )
    files, skipped = [], []
    for f in storage.list_files(loc.uri, start_after=start_after):
        rel = f.path[len(loc.path) :].lstrip("/" if loc.scheme == "s3" else os.sep).replace(os.sep, "/")
        rule = name_rule(rel)
        if rule:
            skipped.append({"path": storage.to_uri(loc, f.path), "reason": rule})
        elif rule is None:
            files.append((f, rel))
    if not files and start_after:
        return Inputs(INPUT_SCHEMA.empty_table(), "images", skipped)  # nothing new since the high-water mark
    if not files:
        raise storage.StorageError(
            f"no input files under {loc.uri}: check --input" + (f" ({len(skipped)} hidden names)" if skipped else "")
        )
    index = {c: i for i, c in enumerate(class_names)}
    tree = all(r.count("/") == 1 for _, r in files) and all(r.split("/")[0] in index for _, r in files)
    table = pa.table(
        [
            [storage.to_uri(loc, f.path) for f, _ in files],
            [index[r.split("/")[0]] if tree else -1 for _, r in files],
            [f.size if f.size is not None else -1 for f, _ in files],
            [_version(f) for f, _ in files],
        ],
        schema=INPUT_SCHEMA,
    )
    return Inputs(table, "class-tree" if tree else "images", skipped)


def fetch_and_preprocess(batch: dict, transform: ImageTransform, reads: int) -> dict:
    """map_batches step: image URIs -> their bytes (`reads` GETs in flight) -> eval-transformed patches.
    A file that cannot be read, or is over the size cap by its listed size (never read), keeps its row
    with the reason, as an undecodable one does."""
    uris = list(batch["image_uri"])
    sizes = list(batch["size"]) if "size" in batch else [None] * len(uris)

    def get(i):
        try:
            size = sizes[i]
            transform.rules.check_object_size(None if size is None or size < 0 else int(size))
            return storage.read_bytes(uris[i]), "", None
        except ImageDecodeError as e:
            return b"", str(e), PERMANENT  # over the size cap: final until the object changes
        except (storage.StorageError, OSError) as e:
            return b"", f"cannot read ({e})", TRANSIENT  # a timeout, a refused or lost connection

    with ThreadPoolExecutor(max(1, min(reads, len(uris)))) as pool:
        got = list(pool.map(get, range(len(uris))))
    out = preprocess(
        {
            "image_uri": batch["image_uri"],
            "label_id": batch["label_id"],
            "bytes": np.asarray([b for b, _, _ in got], dtype=object),
            "error": np.asarray([e for _, e, _ in got], dtype=object),
        },
        transform,
    )
    kinds = np.asarray([PERMANENT if e else None for e in out["error"]], dtype=object)  # undecodable bytes
    for i, (_, err, kind) in enumerate(got):
        if err:
            out["error"][i], kinds[i] = err, kind
    out["error_kind"] = kinds
    if "input_version" in batch:
        out["input_version"] = batch["input_version"]
    return out


def shard_rows(batch: dict) -> dict:
    """map_batches step: a shard set's samples (`streams.sample_stream`) -> (image_uri `<shard>#<key>`, bytes,
    label_id)."""
    return {
        "image_uri": np.asarray([f"{u}#{k}" for u, k in zip(batch["shard"], batch["key"])], dtype=object),
        "bytes": np.asarray([b if b is not None else b"" for b in batch["image"]], dtype=object),
        "label_id": np.asarray(batch["label"], dtype=np.int64),
    }
