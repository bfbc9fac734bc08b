"""Publishing prediction runs under `--output` so that every reader sees committed runs only.

What lies where under `--output`: `outputs`; the per-model ledger the commit appends to: `ledger`.

Commit: fence -> intent -> fence -> parts (copied concurrently) -> fence -> _accuracy.json -> _SUCCESS
-> index -> ledger -> staged files and intent removed. A crash before the intent leaves staging only,
which the next run deletes; a crash after it is rolled forward by the next run (same parts, same names).
An intent whose staged files are gone (a superseded holder's late intent, or staging deleted by hand)
is rolled back instead: its published parts are removed and its inputs are left for the next run, so
no output is ever wedged and every input ends with exactly one committed result. Clean-up only touches
`_staging/`, `_commits/`, `_rolled_back/` and the run folders intents name, all under `--output`.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from pipeline.core import scratch, storage
from pipeline.inference.ledger import append_ledger
from pipeline.inference.outputs import (
    ACCURACY,
    COMMITS,
    QUARANTINE,
    ROLLED_BACK,
    RUNS,
    RUNS_INDEXED,
    STAGING,
    SUCCESS,
    Layout,
    files_under,
    legacy_runs,
)

log = logging.getLogger(__name__)
COPY_THREADS = 32  # concurrent part copies in a roll-forward (a copy is one request, mostly waiting)
TOMBSTONE_DAYS = 30  # how long the folders of rolled-back runs are swept for a late write


class Incomplete(storage.StorageError):  # an intent with parts neither staged nor published: roll it back
    pass


# ---- commit and recovery -----------------------------------------------------------------------
@dataclass(frozen=True)
class Intent:
    """What one run's commit will do, written to `_commits/run=<id>.json` before any of it is done."""

    run_id: str
    run_dir: str  # URI of dt=<date>/run=<id>/
    parts: list[list[str]]  # [staged URI, published part URI], in part order
    accuracy: dict | None  # the `_accuracy.json` report, or None without labels
    ledger: bool  # whether the model's ledger learns the run's inputs (image prefixes, not shards)
    success: dict  # the `_SUCCESS` record: run facts plus the part list
    fence: int = 0  # the lease generation it was written under

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Intent:
        return cls(**{k: v for k, v in json.loads(data).items() if k in cls.__dataclass_fields__})


def plan_commit(
    layout: Layout,
    run_id: str,
    date: str,
    staged: list[str],
    *,
    accuracy_report: dict | None,
    ledger: bool,
    fence: int = 0,
    **success,
) -> Intent:
    """The intent of one run: which staged file becomes which part, the `_accuracy.json` report, whether
    the model's ledger learns the run's inputs, and the `_SUCCESS` record (`success` plus the part list)."""
    run_dir = layout.run_dir(date, run_id)
    parts = [[u, run_dir.join(f"part-{i:05d}.parquet").uri] for i, u in enumerate(sorted(staged))]
    files = [dest for _, dest in parts]
    record = {"run_id": run_id, **success, "fence": fence, "files": files}
    return Intent(run_id, run_dir.uri, parts, accuracy_report, ledger, record, fence)


def commit(layout: Layout, intent: Intent, lease) -> None:
    """Publish a staged run: confirm the lease, write the intent (the point of no return), confirm the lease
    again, then roll forward. A holder superseded while its intent was in flight leaves the intent alone:
    the new holder may be finishing it, and whoever holds the lease next finishes it or rolls it back (its
    staging gone), so no part it copies is ever left without an intent, a `_SUCCESS` or a tombstone."""
    lease.fence()
    storage.write_bytes(layout.intent(intent.run_id).uri, intent.to_json())
    lease.fence()
    roll_forward(layout, intent, lease)


def outcome(layout: Layout, run_id: str) -> str:
    """What became of a run whose holder lost the lease while publishing: "published" (the new holder
    finished it), "pending" (its intent waits for the next holder), "rolled back", or "not written"."""
    if storage.exists(layout.run_record(run_id).uri):
        return "published"
    if storage.exists(layout.intent(run_id).uri):
        return "pending"
    return "rolled back" if storage.exists(layout.tombstone(run_id).uri) else "not written"


def _copy_parts(intent: Intent, lease) -> list[str]:
    """Copy every staged file to its part name, COPY_THREADS at a time; returns the parts that are
    neither staged nor published."""

    def one(pair):
        staged, dest = pair
        lease.check()
        if storage.copy(staged, dest, missing_ok=True) or storage.exists(dest):
            return None
        return dest

    with ThreadPoolExecutor(max(1, min(COPY_THREADS, len(intent.parts)))) as pool:
        return [d for d in pool.map(one, intent.parts) if d]


def roll_forward(layout: Layout, intent: Intent, lease) -> None:
    """Every step is idempotent: a crash anywhere here is finished by the next run's `recover`. Raises
    Incomplete when a part can no longer be made (the intent must be rolled back)."""
    missing = _copy_parts(intent, lease)
    if missing:
        raise Incomplete(
            f"run {intent.run_id}: {len(missing)} of {len(intent.parts)} parts are neither staged nor "
            f"published (first: {missing[0]})"
        )
    lease.fence()
    run_dir = storage.parse_uri(intent.run_dir)
    if intent.accuracy:
        storage.write_bytes(run_dir.join(ACCURACY).uri, json.dumps(intent.accuracy, indent=2).encode())
    record = json.dumps(intent.success, indent=2).encode()
    storage.write_bytes(run_dir.join(SUCCESS).uri, record)
    storage.write_bytes(layout.run_record(intent.run_id).uri, record)
    if not storage.exists(layout.output.join(RUNS, RUNS_INDEXED).uri):  # the first commit of this version
        _mark_indexed(layout)
    if intent.ledger:
        append_ledger(layout, intent)
    storage.delete(layout.staging(intent.run_id).uri, recursive=True)
    scratch.remove_local_tmp(run_dir.uri)
    storage.delete(layout.intent(intent.run_id).uri)


def roll_back(layout: Layout, intent: Intent, lease, why: str) -> None:
    """Undo a commit that cannot be finished: its run folder, index record and ledger object go, its inputs
    stay unpredicted (the next run takes them). The tombstone comes first, so a crash here is resumed."""
    lease.check()
    log.warning("rolling back run %s: %s; its inputs are left for the next run", intent.run_id, why)
    storage.write_bytes(
        layout.tombstone(intent.run_id).uri,
        json.dumps({"run_id": intent.run_id, "run_dir": intent.run_dir, "at": time.time(), "why": why}).encode(),
    )
    storage.delete(intent.run_dir, recursive=True)
    storage.delete(layout.run_record(intent.run_id).uri)
    sha = intent.success.get("model_sha256")
    if intent.ledger and sha:
        storage.delete(layout.ledger_delta(sha, intent.fence, intent.run_id).uri)
    storage.delete(layout.staging(intent.run_id).uri, recursive=True)
    storage.delete(layout.intent(intent.run_id).uri)


def _under(layout: Layout, uri: str, *parts: str) -> bool:
    """Whether `uri` lies strictly inside `--output`/`parts` (same store, no `..`): what recovery may touch."""
    try:
        loc = storage.parse_uri(uri)
    except Exception:  # noqa: BLE001 - not a URI at all
        return False
    base = layout.output.join(*parts) if parts else layout.output
    if (loc.scheme, loc.bucket) != (base.scheme, base.bucket) or ".." in loc.path.split("/"):
        return False
    return loc.path.startswith(base.path.rstrip("/") + "/")


def untrusted(layout: Layout, intent: Intent) -> str | None:
    """Why an intent may not be acted on (a path outside this output's own folders), or None. Intents and
    tombstones are files anyone with write access to the prefix can put there: recovery deletes and copies
    what they name, so it refuses anything outside `--output`."""
    if not isinstance(intent.run_dir, str) or not _under(layout, intent.run_dir) or "/dt=" not in intent.run_dir:
        return f"run_dir {intent.run_dir!r} is not a run folder under {layout.output.uri}"
    try:
        for staged, dest in intent.parts:
            if not _under(layout, staged, STAGING) or not _under(layout, dest) or not dest.startswith(intent.run_dir):
                return f"part {staged!r} -> {dest!r} is not this output's staging -> run folder"
    except (TypeError, ValueError):
        return f"parts {intent.parts!r} are not [staged, published] pairs"
    if intent.ledger and not (isinstance(intent.success, dict) and intent.success.get("model_sha256")):
        return "it feeds the ledger but names no model_sha256"
    return None


def quarantine(layout: Layout, uri: str, why: str) -> None:
    """Move a bookkeeping object recovery cannot trust or read to `_quarantine/` (kept for a person to look
    at, skipped by every reader), so one bad object never blocks every later run."""
    log.warning("quarantining %s: %s", uri, why)
    name = uri.rsplit("/", 1)[-1]
    if storage.copy(uri, layout.output.join(QUARANTINE, f"{int(time.time())}-{name}").uri, missing_ok=True):
        storage.delete(uri)


@dataclass
class Recovered:  # runs rolled forward, runs rolled back, staged / stray / temporary files deleted
    finished: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    removed: int = 0


def recover(layout: Layout, lease) -> Recovered:
    """Under the lease: finish (or roll back) the commits of crashed or superseded runs, delete what they
    staged, and sweep the folders of rolled-back runs for a late write of a stale holder."""
    out = Recovered()
    if layout.output.scheme == "file":  # before any listing: a killed local writer's `_tmp/` is no intent
        out.removed += scratch.remove_local_tmp(layout.output.uri, recursive=True)
    index_runs(layout)
    for uri, _ in files_under(layout.output.join(COMMITS)):
        try:
            intent = Intent.from_json(storage.read_bytes(uri))
        except storage.StorageError as e:  # gone between the listing and the read: finished by its writer
            log.info("commit intent %s went away while recovering (%s)", uri, e)
            continue
        except (ValueError, TypeError, KeyError) as e:  # a torn or foreign file: nothing it names can be trusted
            quarantine(layout, uri, f"unreadable commit intent ({e})")
            continue
        if why := untrusted(layout, intent):
            quarantine(layout, uri, why)
            continue
        log.warning("finishing the commit of run %s (fence %d), interrupted", intent.run_id, intent.fence)
        try:
            roll_forward(layout, intent, lease)
            out.finished.append(intent.run_id)
        except Incomplete as e:
            roll_back(layout, intent, lease, str(e))
            out.rolled_back.append(intent.run_id)
    now = time.time()
    for uri, _ in files_under(layout.output.join(ROLLED_BACK)):
        lease.check()
        try:
            stone = json.loads(storage.read_bytes(uri))
            run_dir = stone["run_dir"]
        except storage.StorageError:
            continue
        except (ValueError, TypeError, KeyError) as e:
            quarantine(layout, uri, f"unreadable tombstone ({e})")
            continue
        if not _under(layout, run_dir) or "/dt=" not in run_dir:
            quarantine(layout, uri, f"tombstone names {run_dir!r}, not a run folder under {layout.output.uri}")
            continue
        for stray, _ in files_under(storage.parse_uri(run_dir)):
            log.warning("removing %s: written late by rolled-back run %s", stray, stone["run_id"])
            storage.delete(stray)
            out.removed += 1
        if now - stone.get("at", now) > TOMBSTONE_DAYS * 86400:
            storage.delete(uri)
    for uri, _ in files_under(layout.output.join(STAGING)):
        lease.check()
        log.warning("removing what a crashed run staged: %s", uri)
        storage.delete(uri)
        out.removed += 1
    if layout.output.scheme == "file":
        storage.delete(layout.output.join(STAGING).uri, recursive=True)  # empty local folders
    return out


def index_runs(layout: Layout) -> int:
    """Once per output: give every run that an older version committed (a `_SUCCESS` with no record in
    `_runs/`) its record, then mark the index complete, so `committed_runs` reads `_runs/` alone from then
    on. Returns how many records were added (one full listing, the first time only)."""
    if storage.exists(layout.output.join(RUNS, RUNS_INDEXED).uri):
        return 0
    indexed = {n for _, n in files_under(layout.output.join(RUNS))}
    added = 0
    legacy = legacy_runs(layout.output.uri)
    for uri, record in legacy:
        if f"run={record['run_id']}.json" not in indexed:
            storage.write_bytes(layout.run_record(record["run_id"]).uri, storage.read_bytes(uri))
            added += 1
    if added:
        log.warning("indexed %d runs that an older version committed under %s", added, layout.output.uri)
    if legacy or indexed:  # an output without runs gets its mark with its first commit (`roll_forward`)
        _mark_indexed(layout)
    return added


def _mark_indexed(layout: Layout) -> None:
    storage.write_bytes(layout.output.join(RUNS, RUNS_INDEXED).uri, b"every committed run has its record here\n")
