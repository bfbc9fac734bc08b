"""Publishing prediction runs under `--output` so that every reader sees committed runs only.

Layout, relative to `--output` (names that start with `_` are skipped by pyarrow, pandas, Spark and
Hive; staged files do not end in `.parquet`, so duckdb's `**/*.parquet` does not match them either):

    _lease.json                            one writer at a time; its generation is the fencing token
    _staging/run=<id>/*.parquet.staged     what the Ray Data job writes
    _commits/run=<id>.json                 the commit intent: written once everything is staged
    _rolled_back/run=<id>.json             a run whose commit could not be finished (its parts removed)
    dt=<date>/run=<id>/part-NNNNN.parquet  the published run
    dt=<date>/run=<id>/_accuracy.json      when the inputs had labels
    dt=<date>/run=<id>/_SUCCESS            the commit marker, written after the last part
    _runs/run=<id>.json                    the same record: the index of committed runs
    _ledger/<model sha256>/*.ledger        latest result per input, appended one object per run (Parquet)

Commit: fence -> intent -> fence -> parts (copied concurrently) -> fence -> _accuracy.json -> _SUCCESS
-> index -> ledger -> staged files and intent removed. A crash before the intent leaves staging only,
which the next run deletes; a crash after it is rolled forward by the next run (same parts, same names).
An intent whose staged files are gone (a superseded holder's late intent, or staging deleted by hand)
is rolled back instead: its published parts are removed and its inputs are left for the next run, so
no output is ever wedged and every input ends with exactly one committed result. Clean-up only touches
`_staging/`, `_commits/`, `_rolled_back/` and the run folders intents name, all under `--output`.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import storage

log = logging.getLogger(__name__)
SUCCESS = "_SUCCESS"
ACCURACY = "_accuracy.json"
STAGING, COMMITS, LEDGER, RUNS, ROLLED_BACK = "_staging", "_commits", "_ledger", "_runs", "_rolled_back"
STAGED_SUFFIX = ".parquet.staged"
LEDGER_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("error", pa.string()),
        ("error_kind", pa.string()),  # "transient" (retried) or "permanent" (final for this input_version)
        ("input_version", pa.string()),  # size:mtime of the object predicted
        ("run_id", pa.string()),
    ]
)
COMPACT_AFTER = 32  # ledger objects appended before they are merged into one
HIGH_WATER = "vitray.listed_through"  # ledger object metadata: {input prefix: greatest key listed}
BASE_ROW_GROUP = 16384  # rows per row group of a merged ledger: the unit a filtered read skips
COPY_THREADS = 32  # concurrent part copies in a roll-forward (a copy is one request, mostly waiting)
TOMBSTONE_DAYS = 30  # how long the folders of rolled-back runs are swept for a late write


class Incomplete(storage.StorageError):  # an intent with parts neither staged nor published: roll it back
    pass


@dataclass(frozen=True)
class Layout:
    """Where each piece of a run lives under one output prefix."""

    output: storage.Location

    @classmethod
    def of(cls, output: str) -> Layout:
        return cls(storage.parse_uri(output))

    def staging(self, run_id: str) -> storage.Location:
        return self.output.join(STAGING, f"run={run_id}")

    def intent(self, run_id: str) -> storage.Location:
        return self.output.join(COMMITS, f"run={run_id}.json")

    def tombstone(self, run_id: str) -> storage.Location:
        return self.output.join(ROLLED_BACK, f"run={run_id}.json")

    def run_dir(self, date: str, run_id: str) -> storage.Location:
        return self.output.join(f"dt={date}", f"run={run_id}")

    def run_record(self, run_id: str) -> storage.Location:
        return self.output.join(RUNS, f"run={run_id}.json")

    def ledger_dir(self, model_sha256: str) -> storage.Location:
        return self.output.join(LEDGER, model_sha256)

    def ledger_delta(self, model_sha256: str, fence: int, run_id: str) -> storage.Location:
        # Parquet, named so no `*.parquet` glob matches; the name orders it (fence, then run id)
        return self.ledger_dir(model_sha256).join(f"d-{fence:012d}-{run_id}.ledger")


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def read_present(uri: str, columns: list[str]) -> pa.Table:
    """Those of `columns` that the file has (older runs lack some), nothing else (not the embeddings)."""
    f = pq.ParquetFile(io.BytesIO(storage.read_bytes(uri)))
    return f.read(columns=[c for c in columns if c in f.schema_arrow.names])


def _parquet_bytes(table: pa.Table, metadata: dict | None = None, **kw) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def _files(loc: storage.Location) -> list[tuple[str, str]]:
    """(uri, file name) of every object under `loc`, local lock files left out."""
    out = []
    for f in storage.list_files(loc.uri):
        name = f.path.rsplit("/", 1)[-1]
        if not name.startswith("."):
            out.append((storage.to_uri(loc, f.path), name))
    return out


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
    again (a holder superseded while its intent was in flight takes the intent back), then roll forward."""
    lease.fence()
    uri = layout.intent(intent.run_id).uri
    storage.write_bytes(uri, intent.to_json())
    try:
        lease.fence()
    except Exception:
        try:  # the new holder may already have deleted our staging: without us the intent can only wedge
            storage.delete(uri)
        except storage.StorageError as e:
            log.warning("could not take back the intent %s (the next run rolls it back): %s", uri, e)
        raise
    roll_forward(layout, intent, lease)


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
    if intent.ledger:
        append_ledger(layout, intent)
    storage.delete(layout.staging(intent.run_id).uri, recursive=True)
    storage.remove_local_tmp(run_dir.uri)
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


@dataclass
class Recovered:  # runs rolled forward, runs rolled back, staged / stray / temporary files deleted
    finished: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    removed: int = 0


def recover(layout: Layout, lease) -> Recovered:
    """Under the lease: finish (or roll back) the commits of crashed or superseded runs, delete what they
    staged, and sweep the folders of rolled-back runs for a late write of a stale holder."""
    out = Recovered()
    for uri, _ in _files(layout.output.join(COMMITS)):
        try:
            intent = Intent.from_json(storage.read_bytes(uri))
        except (ValueError, TypeError) as e:  # a torn or foreign file: nothing it names can be trusted
            log.warning("removing an unreadable commit intent %s: %s", uri, e)
            storage.delete(uri)
            continue
        log.warning("finishing the commit of run %s (fence %d), interrupted", intent.run_id, intent.fence)
        try:
            roll_forward(layout, intent, lease)
            out.finished.append(intent.run_id)
        except Incomplete as e:
            roll_back(layout, intent, lease, str(e))
            out.rolled_back.append(intent.run_id)
    now = time.time()
    for uri, _ in _files(layout.output.join(ROLLED_BACK)):
        lease.check()
        stone = json.loads(storage.read_bytes(uri))
        for stray, _ in _files(storage.parse_uri(stone["run_dir"])):
            log.warning("removing %s: written late by rolled-back run %s", stray, stone["run_id"])
            storage.delete(stray)
            out.removed += 1
        if now - stone.get("at", now) > TOMBSTONE_DAYS * 86400:
            storage.delete(uri)
    for uri, _ in _files(layout.output.join(STAGING)):
        lease.check()
        log.warning("removing what a crashed run staged: %s", uri)
        storage.delete(uri)
        out.removed += 1
    if layout.output.scheme == "file":
        storage.delete(layout.output.join(STAGING).uri, recursive=True)  # empty local folders
        out.removed += storage.remove_local_tmp(layout.output.uri)
    return out


# ---- the ledger: state for --since-last-run ----------------------------------------------------
def _ledger_rows(table: pa.Table, run_id: str) -> pa.Table:
    """A run's result rows as ledger rows of that run."""
    rows = _as_ledger(table)
    return rows.set_column(
        rows.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * rows.num_rows, pa.string())
    )


def append_ledger(layout: Layout, intent: Intent) -> None:
    """One Parquet object per run (its name orders it); every COMPACT_AFTER of them are merged into a base.
    Idempotent: a roll-forward writes the same object again."""
    sha = intent.success["model_sha256"]
    cols = ["image_uri", "error", "error_kind", "input_version"]
    tables = [_ledger_rows(read_present(uri, cols), intent.run_id) for _, uri in intent.parts]
    rows = pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()
    mark = {HIGH_WATER: json.dumps(intent.success.get("listed_through") or {})}
    storage.write_bytes(layout.ledger_delta(sha, intent.fence, intent.run_id).uri, _parquet_bytes(rows, mark))
    base, deltas = _ledger_objects(layout, sha)
    if len(deltas) > COMPACT_AFTER:
        merged = read_ledger(layout, sha).sort_by("image_uri")  # sorted: a reader of a few inputs skips row groups
        name = "base-" + deltas[-1][1][2:]
        marks = json.dumps(high_water_marks(layout, sha))
        data = _parquet_bytes(merged, {HIGH_WATER: marks}, row_group_size=BASE_ROW_GROUP)
        storage.write_bytes(layout.ledger_dir(sha).join(name).uri, data)
        for uri, _ in deltas + ([base] if base else []):
            storage.delete(uri)


def _ledger_objects(layout: Layout, sha: str) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
    """(newest base, the deltas after it in order) of a model's ledger."""
    files = [(u, n) for u, n in _files(layout.ledger_dir(sha)) if n.endswith(".ledger")]
    bases = sorted((x for x in files if x[1].startswith("base-")), key=lambda x: x[1])
    base = bases[-1] if bases else None
    after = base[1][len("base-") :] if base else ""
    deltas = sorted((x for x in files if x[1].startswith("d-") and x[1][2:] > after), key=lambda x: x[1])
    return base, deltas


def high_water_marks(layout: Layout, sha: str) -> dict[str, str]:
    """{input prefix: the greatest key a committed run of this model listed under it}, from the ledger
    objects' metadata (--input-append-only lists only what comes after)."""
    base, deltas = _ledger_objects(layout, sha)
    marks: dict[str, str] = {}
    for uri, _ in ([base] if base else []) + deltas:
        meta = pq.read_schema(io.BytesIO(storage.read_bytes(uri, large=True))).metadata or {}
        for prefix, key in json.loads(meta.get(HIGH_WATER.encode(), b"{}")).items():
            marks[prefix] = max(marks.get(prefix, ""), key)
    return marks


def transient_failures(layout: Layout, sha: str) -> list[str]:
    """Inputs whose last attempt failed transiently: an append-only listing no longer returns them."""
    t = read_ledger(layout, sha)
    return t.filter(pc.equal(pc.fill_null(t["error_kind"], ""), "transient"))["image_uri"].to_pylist()


def latest_per_input(table: pa.Table) -> pa.Table:
    """The last row of each image_uri (rows in time order), in Arrow."""
    if table.num_rows == 0:
        return table
    idx = table.append_column("_i", pa.array(np.arange(table.num_rows)))
    last = idx.group_by("image_uri").aggregate([("_i", "max")])["_i_max"]
    return table.take(np.sort(last.to_numpy()))


def read_ledger(layout: Layout, model_sha256: str, only: pa.Array | None = None) -> pa.Table:
    """The model's ledger, the latest row per input: one base (sorted by image_uri) and at most COMPACT_AFTER
    small objects, read as Arrow. `only`: just these inputs' rows (row groups of the base that cannot hold
    them are skipped, so the driver's memory follows the listing, not the history). Outputs of older
    versions: their single ledger object is the base, or the committed runs rebuild it."""
    base, deltas = _ledger_objects(layout, model_sha256)
    uris = [base[0]] if base else []
    tables = []
    if not base:
        legacy = layout.output.join(LEDGER, f"{model_sha256}.ledger").uri
        if storage.exists(legacy):
            uris.append(legacy)
        elif not deltas:
            runs = [r for r in committed_runs(layout.output.uri) if r.get("model_sha256") == model_sha256]
            if runs:
                log.warning("building the ledger of model %s from %d committed runs", model_sha256[:12], len(runs))
            for r in runs:
                tables += [_ledger_rows(read_parquet(u, ["image_uri", "error"]), r["run_id"]) for u in r["files"]]
    uris += [u for u, _ in deltas]
    wanted = None if only is None else pa.array(only, pa.string())
    for uri in uris:
        data = io.BytesIO(storage.read_bytes(uri, large=True))
        if wanted is None:
            tables.append(pq.read_table(data))
        else:
            tables.append(pq.read_table(data, filters=pc.field("image_uri").isin(wanted)))
    if wanted is not None:
        tables = [t.filter(pc.is_in(t["image_uri"], value_set=wanted)) for t in tables]
    if not tables:
        return LEDGER_SCHEMA.empty_table()
    return latest_per_input(pa.concat_tables([_as_ledger(t) for t in tables]))


def _as_ledger(t: pa.Table) -> pa.Table:
    """A ledger object of any version in today's schema (older ones lack error_kind and input_version)."""
    cols = {
        f.name: t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
        for f in LEDGER_SCHEMA
    }
    return pa.table(cols, schema=LEDGER_SCHEMA)


def todo(ledger: pa.Table, listed: pa.Table, retry_errors: bool = True) -> pa.Array:
    """A mask over `listed` (image_uri, input_version): the inputs this model still has to predict. Done:
    predicted, or failed for good (a permanent error; any error without `retry_errors`), and the object
    is the version the ledger has (a ledger row without a version matches any)."""
    if ledger.num_rows == 0:
        return pa.array(np.ones(listed.num_rows, bool))
    known = ledger.select(["image_uri", "error", "error_kind", "input_version"]).rename_columns(
        ["image_uri", "error", "error_kind", "seen_version"]
    )
    known = known.append_column("_found", pa.array(np.ones(known.num_rows, bool)))
    joined = (
        listed.select(["image_uri", "input_version"])
        .append_column("_i", pa.array(np.arange(listed.num_rows)))
        .join(known, "image_uri", join_type="left outer")
        .sort_by("_i")
    )
    final = pc.is_null(joined["error"])
    if retry_errors:
        final = pc.or_kleene(final, pc.equal(pc.fill_null(joined["error_kind"], "transient"), "permanent"))
    else:
        final = pa.array(np.ones(joined.num_rows, bool))
    same = pc.or_kleene(pc.is_null(joined["seen_version"]), pc.equal(joined["seen_version"], joined["input_version"]))
    done = pc.and_(pc.fill_null(joined["_found"], False), pc.and_(final, pc.fill_null(same, False)))
    return pc.invert(done)


# ---- readers -----------------------------------------------------------------------------------
def committed_runs(output: str) -> list[dict]:
    """The `_SUCCESS` records of every committed run under `output`, in commit order (fence, then run id):
    from the `_runs/` index (one listing of small names); outputs of older versions are listed whole."""
    out = storage.parse_uri(output)
    records = [json.loads(storage.read_bytes(u)) for u, n in _files(out.join(RUNS)) if n.endswith(".json")]
    if not records:
        for f in storage.list_files(out.uri):
            parts = posixpath.relpath(f.path, out.path).split("/")
            if len(parts) == 3 and parts[0].startswith("dt=") and parts[1].startswith("run=") and parts[2] == SUCCESS:
                records.append(json.loads(storage.read_bytes(storage.to_uri(out, f.path))))
    return sorted(records, key=lambda r: (r.get("fence", 0), r.get("started_at", ""), r["run_id"]))


def read_published(output: str, model_sha256: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every committed prediction (runs with `_SUCCESS` only), optionally of one model's weights."""
    tables = [
        read_parquet(uri, columns)
        for run in committed_runs(output)
        if not model_sha256 or run["model_sha256"] == model_sha256
        for uri in run["files"]
    ]
    if not tables:
        return pa.table({"image_uri": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default")
