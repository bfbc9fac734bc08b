"""Publishing prediction runs under `--output` so that every reader sees committed runs only.

Layout, relative to `--output` (names that start with `_` are skipped by pyarrow, pandas, Spark and
Hive; staged files do not end in `.parquet`, so duckdb's `**/*.parquet` does not match them either):

    _lease.json                            one writer at a time (`lease`)
    _staging/run=<id>/*.parquet.staged     what the Ray Data job writes
    _commits/run=<id>.json                 the commit intent: written once everything is staged
    dt=<date>/run=<id>/part-NNNNN.parquet  the published run
    dt=<date>/run=<id>/_accuracy.json      when the inputs had labels
    dt=<date>/run=<id>/_SUCCESS            the commit marker, written after the last part
    _ledger/<model sha256>.ledger          latest result per input (image_uri, error, run_id), in Parquet

Commit: intent -> parts -> _accuracy.json -> _SUCCESS -> ledger -> staged files and intent removed.
A crash before the intent leaves staging only, which the next run deletes; a crash after it is rolled
forward by the next run (same parts, same names), so every input ends with exactly one committed
result either way. Clean-up only ever touches `_staging/`, `_commits/` and the parts an intent names,
all relative to `--output`: nothing above or beside it.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import conditional, storage

log = logging.getLogger(__name__)
SUCCESS = "_SUCCESS"
ACCURACY = "_accuracy.json"
STAGING, COMMITS, LEDGER = "_staging", "_commits", "_ledger"
STAGED_SUFFIX = ".parquet.staged"
LEDGER_SCHEMA = pa.schema([("image_uri", pa.string()), ("error", pa.string()), ("run_id", pa.string())])


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

    def run_dir(self, date: str, run_id: str) -> storage.Location:
        return self.output.join(f"dt={date}", f"run={run_id}")

    def ledger(self, model_sha256: str) -> storage.Location:
        return self.output.join(LEDGER, f"{model_sha256}.ledger")  # Parquet, named so no `*.parquet` glob matches


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=columns)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Intent:
        return cls(**{k: v for k, v in json.loads(data).items() if k in cls.__dataclass_fields__})


def plan_commit(
    layout: Layout, run_id: str, date: str, staged: list[str], *, accuracy_report: dict | None, ledger: bool, **success
) -> Intent:
    """The intent of one run: which staged file becomes which part, the `_accuracy.json` report, whether
    the model's ledger learns the run's inputs, and the `_SUCCESS` record (`success` plus the part list)."""
    run_dir = layout.run_dir(date, run_id)
    parts = [[u, run_dir.join(f"part-{i:05d}.parquet").uri] for i, u in enumerate(sorted(staged))]
    files = [dest for _, dest in parts]
    return Intent(run_id, run_dir.uri, parts, accuracy_report, ledger, {"run_id": run_id, **success, "files": files})


def commit(layout: Layout, intent: Intent, lease) -> None:
    """Publish a staged run: write the intent (the point of no return), then roll it forward."""
    lease.check()
    storage.write_bytes(layout.intent(intent.run_id).uri, intent.to_json())
    roll_forward(layout, intent, lease)


def roll_forward(layout: Layout, intent: Intent, lease) -> None:
    """Every step is idempotent: a crash anywhere here is finished by the next run's `recover`."""
    for staged, dest in intent.parts:
        lease.check()
        if storage.exists(staged):
            storage.copy(staged, dest)
        elif not storage.exists(dest):
            raise storage.StorageError(
                f"run {intent.run_id}: neither the staged file {staged} nor its published "
                f"copy {dest} exists; the output was changed by hand"
            )
    run_dir = storage.parse_uri(intent.run_dir)
    if intent.accuracy:
        storage.write_bytes(run_dir.join(ACCURACY).uri, json.dumps(intent.accuracy, indent=2).encode())
    lease.check()
    storage.write_bytes(run_dir.join(SUCCESS).uri, json.dumps(intent.success, indent=2).encode())
    if intent.ledger:
        update_ledger(
            layout,
            intent.success["model_sha256"],
            [read_parquet(uri, ["image_uri", "error"]) for _, uri in intent.parts],
            intent.run_id,
        )
    storage.delete(layout.staging(intent.run_id).uri, recursive=True)
    storage.delete(layout.intent(intent.run_id).uri)


def recover(layout: Layout, lease) -> list[str]:
    """Under the lease: finish the commits of crashed runs, delete what crashed runs staged. Returns
    the ids of the runs rolled forward."""
    finished = []
    for f in storage.list_files(layout.output.join(COMMITS).uri):
        intent = Intent.from_json(storage.read_bytes(storage.to_uri(layout.output, f.path)))
        log.warning("finishing the commit of run %s, interrupted by a crash", intent.run_id)
        roll_forward(layout, intent, lease)
        finished.append(intent.run_id)
    for f in storage.list_files(layout.output.join(STAGING).uri):
        lease.check()
        log.warning("removing what a crashed run staged: %s", f.path)
        storage.delete(storage.to_uri(layout.output, f.path))
    if layout.output.scheme == "file":
        storage.delete(layout.output.join(STAGING).uri, recursive=True)  # empty local folders
    return finished


# ---- state for --since-last-run ----------------------------------------------------------------
def update_ledger(layout: Layout, model_sha256: str, results: list[pa.Table], run_id: str) -> None:
    """Merge a run's (image_uri, error) rows into the model's ledger; a newer result replaces an older one.
    A compare-and-swap write, so a concurrent writer can never make an update disappear."""
    uri = layout.ledger(model_sha256).uri
    new = (
        pa.concat_tables([t.select(["image_uri", "error"]) for t in results])
        if results
        else LEDGER_SCHEMA.empty_table()
    )
    new = new.append_column("run_id", pa.array([run_id] * new.num_rows, pa.string())).cast(LEDGER_SCHEMA)
    for _ in range(5):
        current = conditional.read_with_tag(uri)
        if current is None:
            old, cond = LEDGER_SCHEMA.empty_table(), {"if_absent": True}
        else:
            old, cond = pq.read_table(io.BytesIO(current[0])), {"if_match": current[1]}
        kept = old.filter(pc.invert(pc.is_in(old["image_uri"], value_set=new["image_uri"])))
        try:
            conditional.write_conditional(uri, _parquet_bytes(pa.concat_tables([kept, new])), **cond)
            return
        except conditional.PreconditionFailed:
            continue
    raise storage.StorageError(f"could not update {uri}: it kept changing under this run")


def read_ledger(layout: Layout, model_sha256: str) -> pa.Table:
    """The model's ledger (image_uri, error, run_id); rebuilt once from the committed runs when an
    output predates ledgers. One object per model: its read does not grow with the number of runs."""
    uri = layout.ledger(model_sha256).uri
    current = conditional.read_with_tag(uri)
    if current is not None:
        return pq.read_table(io.BytesIO(current[0]))
    runs = [r for r in committed_runs(layout.output.uri) if r["model_sha256"] == model_sha256]
    if not runs:
        return LEDGER_SCHEMA.empty_table()
    log.warning("building the ledger of model %s from %d committed runs (once)", model_sha256[:12], len(runs))
    for r in runs:
        update_ledger(layout, model_sha256, [read_parquet(u, ["image_uri", "error"]) for u in r["files"]], r["run_id"])
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def done_inputs(layout: Layout, model_sha256: str, retry_errors: bool = True) -> set[str]:
    """Inputs that need no new prediction from this model: those predicted (and, unless
    `retry_errors` is off, not those whose last attempt was an error)."""
    ledger = read_ledger(layout, model_sha256)
    if retry_errors:
        ledger = ledger.filter(pc.is_null(ledger["error"]))
    return set(ledger["image_uri"].to_pylist())


# ---- readers -----------------------------------------------------------------------------------
def committed_runs(output: str) -> list[dict]:
    """The `_SUCCESS` records of every committed run under `output`, oldest first."""
    out = storage.parse_uri(output)
    runs = []
    for f in storage.list_files(out.uri):
        rel = posixpath.relpath(f.path, out.path)
        parts = rel.split("/")
        if len(parts) == 3 and parts[0].startswith("dt=") and parts[1].startswith("run=") and parts[2] == SUCCESS:
            runs.append(json.loads(storage.read_bytes(storage.to_uri(out, f.path))))
    return sorted(runs, key=lambda r: r["run_id"])


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
