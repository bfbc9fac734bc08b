"""What lies under one `--output` prefix, and how a reader sees committed runs only.

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
    _runs/INDEXED                          the index is complete (runs of older versions added once)
    _ledger/<model sha256>/*.ledger        latest result per input, appended one object per run (`ledger`)
    _quarantine/                           intents and tombstones recovery could not read or trust

How a run gets there: `publish`.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core import storage

SUCCESS = "_SUCCESS"
ACCURACY = "_accuracy.json"
STAGING, COMMITS, LEDGER, RUNS, ROLLED_BACK = "_staging", "_commits", "_ledger", "_runs", "_rolled_back"
QUARANTINE = "_quarantine"  # bookkeeping objects recovery could not read or trust, kept for a person
STAGED_SUFFIX = ".parquet.staged"
RUNS_INDEXED = "INDEXED"  # in `_runs/`: every committed run has its record there (older outputs: `index_runs`)


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


def parquet_bytes(table: pa.Table, metadata: dict | None = None, **kw) -> bytes:
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, **kw)
    return buf.getvalue()


def files_under(loc: storage.Location) -> list[tuple[str, str]]:
    """(uri, file name) of every object under `loc`, local lock files left out."""
    out = []
    for f in storage.list_files(loc.uri):
        name = f.path.rsplit("/", 1)[-1]
        if not name.startswith("."):
            out.append((storage.to_uri(loc, f.path), name))
    return out


def highest_fence(layout: Layout) -> int:
    """The greatest lease generation the output's own records carry (ledger object names, intents, run
    records): where the next generation continues when the lease object is gone or unreadable."""
    best = 0
    for _, name in files_under(layout.output.join(LEDGER)):
        head = name.split("-", 2)
        if len(head) == 3 and head[0] in ("d", "base") and head[1].isdigit():
            best = max(best, int(head[1]))
    for uri, name in files_under(layout.output.join(COMMITS)) + files_under(layout.output.join(RUNS)):
        if not name.endswith(".json"):
            continue
        try:
            best = max(best, int(json.loads(storage.read_bytes(uri)).get("fence") or 0))
        except (ValueError, TypeError, AttributeError, storage.StorageError):
            continue  # recovery quarantines what cannot be read
    return best


# ---- readers -----------------------------------------------------------------------------------
def legacy_runs(output: str) -> list[tuple[str, dict]]:
    """(URI, record) of every `dt=*/run=*/_SUCCESS` under `output`: one listing of the whole output."""
    out = storage.parse_uri(output)
    found = []
    for f in storage.list_files(out.uri):
        parts = posixpath.relpath(f.path, out.path).split("/")
        if len(parts) == 3 and parts[0].startswith("dt=") and parts[1].startswith("run=") and parts[2] == SUCCESS:
            uri = storage.to_uri(out, f.path)
            found.append((uri, json.loads(storage.read_bytes(uri))))
    return found


def committed_runs(output: str) -> list[dict]:
    """The `_SUCCESS` records of every committed run under `output`, in commit order (fence, then run id):
    from the `_runs/` index (one listing of small names). Until a run of this version has indexed the
    output (`_runs/INDEXED`), the runs an older version committed are listed from the whole output too."""
    out = storage.parse_uri(output)
    index = files_under(out.join(RUNS))
    records = {r["run_id"]: r for r in (json.loads(storage.read_bytes(u)) for u, n in index if n.endswith(".json"))}
    if not any(n == RUNS_INDEXED for _, n in index):
        for _, record in legacy_runs(out.uri):
            records.setdefault(record["run_id"], record)
    return sorted(records.values(), key=lambda r: (r.get("fence", 0), r.get("started_at", ""), r["run_id"]))


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
