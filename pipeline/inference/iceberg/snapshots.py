"""What the table holds, read from its snapshots, and the commit of one run as one validated snapshot.

Each run's snapshot summary carries:
    vitray.run-id           the run (a reused id is refused before anything is written)
    vitray.model-sha256     the weights it predicted with; vitray.model-uri where they were read
    vitray.input            the --input it listed; vitray.listed the number of inputs it predicted
    vitray.listed-through   {model sha256: {input prefix: greatest key listed}}, every model's marks carried
                            forward from the parent snapshot (--input-append-only lists after them)
What is new is computed from the table itself at the snapshot S a run planned on: a projection of
image_uri, input_version, error and error_kind of the model's rows, pushed down to the data files. The
commit lands on S, or, when other runs committed meanwhile, is checked against the rows each snapshot
since S added: an input version of ours that one of them already predicted for good stops the commit
(`Conflict`, exit 75, nothing committed; the next run predicts only what is still new).
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.exits import EXIT_TEMPFAIL
from pipeline.inference.ledger import latest_per_input
from pipeline.inference.rows import LEDGER_SCHEMA

log = logging.getLogger(__name__)
RUN_ID, MODEL_SHA, MODEL_URI = "vitray.run-id", "vitray.model-sha256", "vitray.model-uri"
INPUT, LISTED, MARKS = "vitray.input", "vitray.listed", "vitray.listed-through"
COMMIT_ATTEMPTS = 8


class Conflict(RuntimeError):
    """Another run committed some of this run's input versions after it planned: nothing was committed."""

    exit_code = EXIT_TEMPFAIL


def summary(snapshot) -> dict[str, str]:
    return dict(snapshot.summary.additional_properties) if snapshot and snapshot.summary else {}


def ancestry(table, stop_at: int | None = None) -> list:
    """The main branch's snapshots, newest first, down to (not including) `stop_at`."""
    out, snap = [], table.current_snapshot()
    while snap is not None and snap.snapshot_id != stop_at:
        out.append(snap)
        snap = table.snapshot_by_id(snap.parent_snapshot_id) if snap.parent_snapshot_id is not None else None
    return out


def run_committed(table, run_id: str) -> int | None:
    """The snapshot id that committed `run_id`, from the summaries (every snapshot kept) or, for a run whose
    snapshot was expired, from its rows (`run_id` is a column; file statistics prune the scan)."""
    from pyiceberg.expressions import EqualTo

    for snap in table.snapshots():
        if summary(snap).get(RUN_ID) == run_id:
            return snap.snapshot_id
    current = table.current_snapshot()
    if current is None:
        return None
    rows = table.scan(row_filter=EqualTo("run_id", run_id), selected_fields=("run_id",), limit=1).to_arrow()
    return current.snapshot_id if rows.num_rows else None


def marks(snapshot) -> dict[str, dict[str, str]]:
    try:
        return json.loads(summary(snapshot).get(MARKS) or "{}")
    except ValueError:
        log.warning("snapshot %s has an unreadable %s: listing from the start", snapshot.snapshot_id, MARKS)
        return {}


def seen(table, snapshot_id: int | None, model_sha256: str, only: list[str] | None = None) -> pa.Table:
    """The latest row per input of this model at `snapshot_id`, as the ledger has it (`rows.LEDGER_SCHEMA`):
    only those columns are read, and only files that can hold the model's rows. `only`: just these inputs; the
    scan gets their key range (two literals: files whose image_uri bounds miss it are skipped; an IN filter of
    every key was bound once per file, 2.9 s for 1,000 keys over 100 files), Arrow then keeps exactly them."""
    from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThanOrEqual

    if snapshot_id is None or (only is not None and not only):
        return LEDGER_SCHEMA.empty_table()
    cols = [*LEDGER_SCHEMA.names, "inferred_at"]
    where = EqualTo("model_sha256", model_sha256)
    if only is not None:
        where = And(where, And(GreaterThanOrEqual("image_uri", min(only)), LessThanOrEqual("image_uri", max(only))))
    t = table.scan(row_filter=where, selected_fields=tuple(cols), snapshot_id=snapshot_id).to_arrow()
    if only is not None:
        t = t.filter(pc.is_in(t["image_uri"], value_set=pa.array(only, t.schema.field("image_uri").type)))
    if t.num_rows == 0:
        return LEDGER_SCHEMA.empty_table()
    t = t.sort_by([("inferred_at", "ascending")])
    return latest_per_input(pa.table({f.name: t[f.name].cast(f.type) for f in LEDGER_SCHEMA}, schema=LEDGER_SCHEMA))


def transient_failures(table, snapshot_id: int | None, model_sha256: str, prefix: str) -> list[str]:
    """Inputs under `prefix` that have a transient error row of this model (whether a later row settled them
    is for `seen` + `ledger.todo` to say): an append-only listing no longer returns them."""
    from pyiceberg.expressions import And, EqualTo

    if snapshot_id is None:
        return []
    where = And(EqualTo("model_sha256", model_sha256), EqualTo("error_kind", "transient"))
    t = table.scan(row_filter=where, selected_fields=("image_uri",), snapshot_id=snapshot_id).to_arrow()
    return sorted({u for u in t["image_uri"].to_pylist() if u.startswith(prefix)})


def _added_files(table, snapshot) -> list[str]:
    from pyiceberg.manifest import ManifestEntryStatus

    out = []
    for manifest in snapshot.manifests(table.io):
        if not manifest.has_added_files():
            continue
        for entry in manifest.fetch_manifest_entry(table.io):  # merged manifests hold older runs' entries too
            if entry.status == ManifestEntryStatus.ADDED and entry.snapshot_id == snapshot.snapshot_id:
                out.append(entry.data_file.file_path)
    return out


def committed_meanwhile(table, since: int | None, ours: pa.Table, model_sha256: str) -> int:
    """How many of `ours` (image_uri, input_version) the snapshots after `since` already hold for good (a
    prediction or a permanent error) with this model: read from the data files those snapshots added."""
    keys = {(u, v) for u, v in zip(ours["image_uri"].to_pylist(), ours["input_version"].to_pylist())}
    hits = 0
    for snap in ancestry(table, stop_at=since):
        if summary(snap).get(MODEL_SHA) not in (None, model_sha256):
            continue
        for path in _added_files(table, snap):
            with table.io.new_input(path).open() as f:
                t = pq.read_table(f, columns=["image_uri", "input_version", "error_kind", "model_sha256"])
            final = pc.and_(
                pc.equal(t["model_sha256"], model_sha256),
                pc.not_equal(pc.fill_null(t["error_kind"], "none"), "transient"),
            )
            t = t.filter(final)
            hits += sum((u, v) in keys for u, v in zip(t["image_uri"].to_pylist(), t["input_version"].to_pylist()))
    return hits


def commit(
    catalog,
    name: str,
    table,
    files: list[str],
    properties: dict[str, str],
    table_properties: dict[str, str],
    ours: pa.Table | None,
    model_sha256: str,
) -> int:
    """Append `files` as one snapshot with `properties` in its summary, on the snapshot `table` was loaded at
    or validated against every one since (`ours`: the run's input versions, None: no check, a run without
    --since-last-run predicts again on purpose). Returns the snapshot id. A commit whose outcome is unknown
    (the catalog went away mid-call) is looked up by its run id: never a second snapshot."""
    from pyiceberg.exceptions import CommitFailedException

    run_id = properties[RUN_ID]
    base = table.current_snapshot().snapshot_id if table.current_snapshot() else None
    for _ in range(COMMIT_ATTEMPTS):
        parent = table.current_snapshot()
        carried = marks(parent)
        for sha, per in json.loads(properties.get(MARKS) or "{}").items():
            mine = carried.setdefault(sha, {})
            for prefix, key in per.items():
                mine[prefix] = max(mine.get(prefix, ""), key)
        props = {**properties, MARKS: json.dumps(carried, sort_keys=True)}
        try:
            txn = table.transaction()
            txn.set_properties(**table_properties)
            txn.add_files(files, snapshot_properties=props, check_duplicate_files=False)
            txn.commit_transaction()
        except CommitFailedException as e:
            log.info("commit of run %s: the table moved (%s); validating against what landed", run_id, e)
        except Exception:
            table = catalog.load_table(name)
            if (landed := run_committed(table, run_id)) is not None:
                return landed  # it landed; the answer was lost
            raise
        else:
            table = catalog.load_table(name)
            landed = run_committed(table, run_id)
            if landed is None:
                raise RuntimeError(f"run {run_id}: the catalog took the commit but the table does not show it")
            return landed
        table = catalog.load_table(name)
        if (landed := run_committed(table, run_id)) is not None:
            return landed
        if ours is not None and (n := committed_meanwhile(table, base, ours, model_sha256)):
            raise Conflict(
                f"run {run_id}: {n} of its inputs were committed by another run after it planned; nothing of it "
                "is committed (its data files are orphans that maintenance removes); the next run predicts only "
                "what is still new"
            )
        base = table.current_snapshot().snapshot_id if table.current_snapshot() else None
    raise Conflict(f"run {run_id}: the table kept moving for {COMMIT_ATTEMPTS} attempts; nothing committed")
