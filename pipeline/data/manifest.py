"""The shard-set manifest as a record: the only place that reads or writes `manifest.json`.

    {"format": "webdataset" | "parquet", "layout": 2, "version": "<id>", "classes": [...],
     "splits": {"train": {"count", "per_class": {class: n}, "shards": [{"name", "count", "bytes", "sha256"}]},
                "val": {...}},
     "skipped": [{"path", "reason"}], "source", "seed", "shard_size", "val_fraction", "min_size", "image_member"}

Shard names are relative to the set's root (`versions/<version>/train/shard-00000.tar`), so a version's
own copy (`versions/<version>/manifest.json`) and the current pointer (`manifest.json`) name the same
files. `base` is where the manifest was read from (the root), never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from dataclasses import asdict, dataclass, field

from pipeline.core import storage

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
VERSIONS = "versions"
USERS = "_users"  # versions/<v>/_users/<run key>.json: an unfinished run reads this version
STALE_INCOMPLETE_S = 24 * 3600
SPLITS = ("train", "val")
IMAGE_MEMBER = "image"


@dataclass(frozen=True)
class ShardEntry:
    name: str  # relative to the set's root
    count: int = 0  # samples
    bytes: int = 0
    sha256: str = ""  # empty in a manifest another tool wrote: the shard is then read unchecked


@dataclass(frozen=True)
class Split:
    count: int
    per_class: dict[str, int]
    shards: list[ShardEntry]


@dataclass(frozen=True)
class Manifest:
    format: str
    version: str | None  # None: a set written before versions (layout 1), or by another tool
    classes: list[str]
    splits: dict[str, Split]
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}], sorted by path
    skip_counts: dict[str, int] = field(default_factory=dict)  # how many of each kind of skip
    layout: int = 2
    source: str | None = None
    seed: int | None = None
    shard_size: int | None = None
    val_fraction: float | None = None
    min_size: int | None = None  # the decode rules the set was written with (`images.DecodeRules`)
    max_aspect: float | None = None
    max_object_mb: float | None = None
    max_side: int | None = None  # images stored with their longer side at most this (None: as they came)
    image_member: str = IMAGE_MEMBER
    provenance: dict | None = None  # pseudo-labels: the teacher, its predictions' run(s), threshold, budget
    base: str = field(default="", compare=False)  # the set's root URI or path, as read; not in the JSON

    # ---- JSON --------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        d = asdict(self)
        del d["base"]
        return json.dumps(d, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str, base: str = "") -> Manifest:
        d = json.loads(data)
        splits = {
            name: Split(s["count"], dict(s.get("per_class", {})), [ShardEntry(**e) for e in s["shards"]])
            for name, s in d["splits"].items()
        }
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in ("splits", "base")}
        known.setdefault("version", None)
        known["layout"] = d.get("layout", 1)
        return cls(**{**known, "splits": splits, "base": base})

    # ---- where the files are -------------------------------------------------------------------
    @property
    def uri(self) -> str:
        """The manifest of this version (what a run pins), or the set's one manifest before versions."""
        if self.layout >= 2 and self.version:
            return f"{self.base}/{VERSIONS}/{self.version}/{MANIFEST}"
        return f"{self.base}/{MANIFEST}"

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ValueError(f"the manifest has no {name!r} split (has {sorted(self.splits)})")
        return self.splits[name]

    def count(self, name: str) -> int:
        return self.splits[name].count if name in self.splits else 0

    def shard_uris(self, split: str) -> list[str]:
        return [f"{self.base}/{s.name}" for s in self.split(split).shards]

    def digests(self, split: str) -> dict[str, str]:
        """{filesystem path: sha256} of a split's shards, as `read_binary_files` reports paths."""
        return {storage.parse_uri(u).path: s.sha256 for u, s in zip(self.shard_uris(split), self.split(split).shards)}

    def decode_rules(self):
        """The rules its images passed when it was written; a reader refuses nothing those kept (an older or
        foreign set, which recorded none, is read as it is)."""
        from pipeline.data.images import DecodeRules

        return DecodeRules(
            min_side=self.min_size or 1,
            max_aspect=self.max_aspect or 1e9,
            max_object_mb=self.max_object_mb or 1e9,
        )

    @property
    def labeled(self) -> bool:
        """An unlabeled set has no classes; its samples' label is -1."""
        return bool(self.classes)

    def summary(self) -> str:
        n_shards = sum(len(s.shards) for s in self.splits.values())
        size = sum(e.bytes for s in self.splits.values() for e in s.shards)
        train, val = self.count("train"), self.count("val")
        kinds = f"{len(self.classes)} classes" if self.labeled else "unlabeled"
        skips = ", ".join(f"{n} {k}" for k, n in self.skip_counts.items())
        return (
            f"{train + val} images ({train} train, {val} val), {kinds}, {n_shards} shards, "
            f"{len(self.skipped)} skipped{f' ({skips})' if skips else ''}, {size / 1e6:.1f} MB"
        )


def load_manifest(uri: str) -> Manifest:
    """Read a manifest by its URI, or by the prefix that holds it."""
    loc = storage.parse_uri(uri)
    if not loc.uri.endswith(".json"):
        loc = loc.join(MANIFEST)
    try:
        data = storage.read_bytes(loc.uri)
    except storage.StorageError as e:
        if "no such object" in str(e):
            raise storage.StorageError(
                f"no manifest at {loc.uri}: make shards first (`python jobs/make_shards.py --output "
                f"{posixpath.dirname(loc.uri)}`) or pass the manifest's URI"
            ) from None
        raise
    base = posixpath.dirname(loc.uri) if loc.scheme == "s3" else os.path.dirname(loc.path)
    manifest = Manifest.from_json(data)
    own_copy = f"/{VERSIONS}/{manifest.version}"
    if manifest.layout >= 2 and base.endswith(own_copy):
        base = base[: -len(own_copy)]  # a version's own copy: names are relative to the root
    return Manifest.from_json(data, base)


def write_manifest(output: str, manifest: Manifest) -> None:
    """The version's own copy first (the version is complete), then the pointer in one PUT (and current)."""
    out = storage.parse_uri(output)
    body = manifest.to_json()
    storage.write_bytes(out.join(VERSIONS, manifest.version, MANIFEST).uri, body)
    storage.write_bytes(out.join(MANIFEST).uri, body)


def current_version(output: str) -> str | None:
    """The version `<output>/manifest.json` names."""
    return json.loads(storage.read_bytes(storage.parse_uri(output).join(MANIFEST).uri)).get("version")


def prune_versions(
    output: str, keep: int, now: float | None = None, prune_in_use: bool = False
) -> tuple[list[str], dict[str, list[str]]]:
    """Remove all but the newest `keep` complete versions, and incomplete version folders older than a day
    (a crashed run's); never the version manifest.json names, nor (without `prune_in_use`) one that an
    unfinished training run claimed (`claim_version`). Returns (removed ids, {kept id: the runs using it})."""
    out = storage.parse_uri(output)
    current = current_version(out.uri)
    files = storage.list_files(out.join(VERSIONS).uri)
    versions: dict[str, dict] = {}
    base = out.join(VERSIONS).path
    for f in files:
        rel = (
            posixpath.relpath(f.path, base)
            if out.scheme == "s3"
            else os.path.relpath(f.path, base).replace(os.sep, "/")
        )
        v = rel.split("/", 1)[0]
        info = versions.setdefault(v, {"complete": False, "newest": 0.0, "users": []})
        info["complete"] |= rel == f"{v}/{MANIFEST}"
        if rel.startswith(f"{v}/{USERS}/") and rel.endswith(".json"):
            info["users"].append(storage.to_uri(out, f.path))
        if f.mtime is not None:
            info["newest"] = max(info["newest"], f.mtime.timestamp())
    now = now or time.time()
    complete = sorted(v for v, i in versions.items() if i["complete"])
    old = [v for v in complete[:-keep] if v != current]
    in_use = {v: [_run_of(u) for u in versions[v]["users"]] for v in old if versions[v]["users"]}
    doomed = [v for v in old if prune_in_use or v not in in_use]
    doomed += [
        v for v, i in versions.items() if not i["complete"] and v != current and now - i["newest"] > STALE_INCOMPLETE_S
    ]
    for v in doomed:
        if v in in_use:
            log.warning("pruning version %s although runs still use it (--prune-in-use): %s", v, in_use[v])
        storage.delete(out.join(f"{VERSIONS}/{v}").uri, recursive=True)
    return sorted(doomed), {v: runs for v, runs in in_use.items() if v not in doomed}


def _run_of(claim_uri: str) -> str:
    try:
        return json.loads(storage.read_bytes(claim_uri)).get("run", claim_uri)
    except (storage.StorageError, ValueError, AttributeError):
        return claim_uri


def _claim(manifest: Manifest, run: str) -> storage.Location | None:
    if manifest.layout < 2 or not manifest.version:
        return None  # a set without versions, or another tool's: nothing is ever pruned from it
    key = hashlib.sha256(run.encode()).hexdigest()[:32]
    return storage.parse_uri(manifest.base).join(VERSIONS, manifest.version, USERS, f"{key}.json")


def claim_version(manifest: Manifest, run: str) -> bool:
    """Record that the training run at `run` reads this version until it finishes, so `--keep-versions`
    keeps it. Best effort: a run that may only read the shard set warns and trains on (unprotected)."""
    loc = _claim(manifest, run)
    if loc is None:
        return False
    try:
        storage.write_bytes(loc.uri, json.dumps({"run": run, "since": time.time()}).encode())
        return True
    except storage.StorageError as e:
        log.warning("could not mark shard version %s as in use (%s): --keep-versions may prune it", manifest.version, e)
        return False


def release_version(manifest: Manifest, run: str) -> None:
    """The run finished: its version may be pruned again."""
    loc = _claim(manifest, run)
    if loc is not None:
        try:
            storage.delete(loc.uri)
        except storage.StorageError as e:
            log.warning("could not release shard version %s (%s): it is kept until removed", manifest.version, e)
