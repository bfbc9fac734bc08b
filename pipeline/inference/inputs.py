"""What batch inference reads: the inputs listed, and each one's bytes fetched and turned into patches.

list_inputs(): --input as shards (a manifest), a class tree (`<class>/<image>`, labels known) or a
               plain prefix of images -> an Arrow table of the `listing` columns of `rows`
fetch_and_preprocess(): map_batches step, image URIs -> bytes (`reads` GETs in flight) -> eval patches
shard_rows(): map_batches step, a shard set's samples -> (listing columns, bytes)
preprocess(): map_batches step, encoded images -> eval patches; the carried columns passed on as they are
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from pipeline.core import storage
from pipeline.data.images import ImageDecodeError
from pipeline.data.manifest import MANIFEST, load_manifest
from pipeline.data.sources import list_local, name_rule
from pipeline.data.transforms import ImageTransform
from pipeline.inference import rows
from pipeline.inference.infer_config import InferConfig
from pipeline.inference.rows import INPUT_SCHEMA, PERMANENT, TRANSIENT


@dataclass
class Inputs:
    """The listed inputs of one run as Arrow (`rows.INPUT_SCHEMA`: image_uri, label_id, input_version:
    `size:mtime`, what tells a changed object, input_size; null where unknown), their kind, and what the naming rule
    (`sources.name_rule`, make_shards' own) left out, with the reason."""

    table: pa.Table
    kind: str  # "images", "class-tree" or "shards"
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]

    def __len__(self) -> int:
        return self.table.num_rows


def object_version(f) -> str:
    """An object's `input_version`: its size and whole-second mtime (what tells a changed object)."""
    mtime = f.mtime.timestamp() if f.mtime is not None else 0
    return f"{f.size}:{int(mtime)}"


def is_shards(uri: str) -> bool:
    loc = storage.parse_uri(uri)
    return loc.uri.endswith(".json") or storage.exists(loc.join(MANIFEST).uri)


def list_inputs(cfg: InferConfig, class_names: list[str], start_after: str | None = None, progress=None) -> Inputs:
    """Every input under --input by make_shards' naming rule (`_DSC0001.JPG` is an input, a hidden name a
    listed skip, our own bookkeeping passed over), sorted as listed, keys exactly as the listing gave them.
    `progress(n)`: called as each page (folder) of n entries is listed."""
    loc = storage.parse_uri(cfg.input)
    if is_shards(loc.uri):
        manifest = load_manifest(loc.uri)
        uris = [u for split in manifest.splits if cfg.split in (None, split) for u in manifest.shard_uris(split)]
        return Inputs(rows.input_table({"image_uri": uris}), "shards")
    files, skipped = [], []
    if loc.scheme == "file":  # make_shards' walker: a symlink loop, a dangling link, a FIFO are listed skips
        listed, skipped, _ = list_local(loc.path, progress)
        after = storage.parse_uri(start_after).path if start_after else ""
        for item in sorted(listed, key=lambda x: x.uri):
            if item.uri > after:
                st = os.stat(item.uri)
                info = SimpleNamespace(
                    path=item.uri, size=st.st_size, mtime=dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)
                )
                files.append((info, item.rel))
    for f in storage.list_files(loc.uri, start_after=start_after, progress=progress) if loc.scheme != "file" else []:
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
    table = rows.input_table(
        {
            "image_uri": [storage.to_uri(loc, f.path) for f, _ in files],
            "label_id": [index[r.split("/")[0]] if tree else None for _, r in files],
            "input_version": [object_version(f) for f, _ in files],
            "input_size": [f.size for f, _ in files],
        }
    )
    return Inputs(table, "class-tree" if tree else "images", skipped)


def fetch_and_preprocess(
    batch: dict, transform: ImageTransform, reads: int, marks: str | None = None, poison: dict | None = None
) -> dict:
    """map_batches step: image URIs -> their bytes (`reads` GETs in flight) -> eval-transformed patches.
    A file that cannot be read, or is over the size cap by its listed size (never read; one without a
    listed size, such as an input the ledger added back, is read only up to the cap plus one byte), keeps
    its row with the reason, as an undecodable one does."""
    n = len(batch["image_uri"])
    uris, sizes = rows.values(batch, "image_uri", n), rows.values(batch, "input_size", n)
    cap = int(transform.rules.max_object_mb * 1e6)
    poison = poison or {}

    def get(i):
        if uris[i] in poison:  # it killed every process that decoded it (`isolate`): never read again
            return b"", poison[uris[i]], PERMANENT
        try:
            transform.rules.check_object_size(sizes[i])
            if sizes[i] is None:
                data = storage.read_bytes(uris[i], limit=cap + 1)
                if len(data) > cap:
                    raise ImageDecodeError(
                        f"object larger than --max-object-mb {transform.rules.max_object_mb:g} (read no further): "
                        "not read"
                    )
                return data, "", None
            return storage.read_bytes(uris[i]), "", None
        except ImageDecodeError as e:
            return b"", str(e), PERMANENT  # over the size cap: final until the object changes
        except (storage.StorageError, OSError) as e:
            return b"", f"cannot read ({e})", TRANSIENT  # a timeout, a refused or lost connection

    with ThreadPoolExecutor(max(1, min(reads, n))) as pool:
        got = list(pool.map(get, range(n)))
    found = {
        "input_size": [s if s is not None else (len(b) if b else None) for s, (b, _, _) in zip(sizes, got)],
        "error": [e or None for _, e, _ in got],
        "error_kind": [k for _, _, k in got],
    }
    mark = marks and f"{marks}/{uuid.uuid4().hex}.json"
    if mark:  # removed once decoded: a mark that stays names the inputs of a task whose process died
        storage.write_bytes(mark, json.dumps(uris).encode())
    out = preprocess({**batch, **found, "bytes": [b for b, _, _ in got]}, transform)
    if mark:
        storage.delete(mark)
    return out


DECODING = "_decoding"  # under a run's staging: the marks of blocks being decoded
ISOLATE_TRIES = 2  # fresh processes an input must kill before it is recorded as poison
_DECODE_ALONE = """
import sys
from pipeline.core import storage
from pipeline.data.images import decode_rgb
try:
    decode_rgb(storage.read_bytes(sys.argv[1]))
except MemoryError:
    sys.exit(86)
except Exception:
    pass  # an ordinary decode error: the run's error row says it
"""


def crashed_inputs(marks: str) -> list[str]:
    """The inputs of blocks whose decode never finished (their marks under `marks` stayed)."""
    found: set[str] = set()
    for f in storage.list_files(marks):
        try:
            found.update(json.loads(storage.read_bytes(storage.to_uri(storage.parse_uri(marks), f.path))))
        except (storage.StorageError, ValueError, TypeError):
            continue
    return sorted(found)


def isolate(uris: list[str], tries: int = ISOLATE_TRIES, timeout_s: float = 300.0) -> dict[str, str]:
    """Decode each suspect alone in a fresh process, up to `tries` times: {input: reason} for those that
    killed it (a signal, MemoryError, or no end within `timeout_s`) every time. The others decode, or fail
    with an ordinary error, on their own: the crash was not theirs."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    poison = {}
    for uri in uris:
        deaths = []
        for _ in range(tries):
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", _DECODE_ALONE, uri], env=env, capture_output=True, timeout=timeout_s
                )
            except subprocess.TimeoutExpired:
                deaths.append(f"no end within {timeout_s:.0f} s")
                continue
            if proc.returncode < 0:
                deaths.append(f"killed by {signal.Signals(-proc.returncode).name}")
            elif proc.returncode == 86:
                deaths.append("MemoryError")
            else:
                break
        if len(deaths) == tries:
            poison[uri] = (
                f"decoding it killed its process {tries} times alone ({deaths[-1]}) after its task's worker died: "
                "recorded as a permanent error until the object changes"
            )
    return poison


def shard_rows(batch: dict) -> dict:
    """map_batches step: a shard set's samples (`streams.sample_stream`) -> image_uri `<shard>#<key>`, the label,
    the sample's size and its bytes."""
    images = [b if b is not None else b"" for b in batch["image"]]
    return {
        "image_uri": np.asarray([f"{u}#{k}" for u, k in zip(batch["shard"], batch["key"])], dtype=object),
        "label_id": np.asarray([int(v) if v >= 0 else None for v in batch["label"]], dtype=object),  # -1: none
        "input_size": np.asarray([len(b) if b else None for b in images], dtype=object),
        "bytes": np.asarray(images, dtype=object),
    }


def preprocess(batch: dict, transform: ImageTransform) -> dict:
    """map_batches step: encoded images -> patches by the export's eval transform (size, crop, interpolation).
    An input that cannot be used keeps its row with the reason (undecodable: permanent for this version)."""
    from pipeline.data.transforms import decode_to_patches

    n = len(batch["image_uri"])
    out = rows.carried(batch, n)
    failed = [e or "" for e in out["error"]]  # found while fetching: not decoded
    patches, valid, errors = decode_to_patches(list(batch["bytes"]), out["image_uri"], transform, None, failed)
    for i, err in enumerate(errors):
        if err and not failed[i]:
            out["error"][i], out["error_kind"][i] = err, PERMANENT
    return {**out, "patches": patches, "valid": valid}
