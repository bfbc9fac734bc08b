"""The ledger: per model, the latest result of each input, the state behind `--since-last-run`.

One Parquet object per committed run (`d-<fence>-<run id>.ledger`, its name orders it), merged into one base
sorted by image_uri every COMPACT_AFTER objects; the columns are `rows.LEDGER_SCHEMA`. The objects'
metadata carries each input prefix's high-water mark for `--input-append-only`.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import storage
from pipeline.inference.outputs import (
    LEDGER,
    Layout,
    committed_runs,
    files_under,
    parquet_bytes,
    read_parquet,
    read_present,
)
from pipeline.inference.rows import LEDGER_SCHEMA

log = logging.getLogger(__name__)
COMPACT_AFTER = 32  # ledger objects appended before they are merged into one
HIGH_WATER = "vitray.listed_through"  # ledger object metadata: {input prefix: greatest key listed}
BASE_ROW_GROUP = 16384  # rows per row group of a merged ledger: the unit a filtered read skips


def _ledger_rows(table: pa.Table, run_id: str) -> pa.Table:
    """A run's result rows as ledger rows of that run."""
    rows = _as_ledger(table)
    return rows.set_column(
        rows.schema.get_field_index("run_id"), "run_id", pa.array([run_id] * rows.num_rows, pa.string())
    )


def append_ledger(layout: Layout, intent) -> None:
    """One Parquet object per run (its name orders it); every COMPACT_AFTER of them are merged into a base.
    Idempotent: a roll-forward writes the same object again."""
    sha = intent.success["model_sha256"]
    cols = [n for n in LEDGER_SCHEMA.names if n != "run_id"]
    tables = [_ledger_rows(read_present(uri, cols), intent.run_id) for _, uri in intent.parts]
    rows = pa.concat_tables(tables) if tables else LEDGER_SCHEMA.empty_table()
    mark = {HIGH_WATER: json.dumps(intent.success.get("listed_through") or {})}
    storage.write_bytes(layout.ledger_delta(sha, intent.fence, intent.run_id).uri, parquet_bytes(rows, mark))
    base, deltas = _ledger_objects(layout, sha)
    if len(deltas) > COMPACT_AFTER:
        merged = read_ledger(layout, sha).sort_by("image_uri")  # sorted: a reader of a few inputs skips row groups
        name = "base-" + deltas[-1][1][2:]
        marks = json.dumps(high_water_marks(layout, sha))
        data = parquet_bytes(merged, {HIGH_WATER: marks}, row_group_size=BASE_ROW_GROUP)
        storage.write_bytes(layout.ledger_dir(sha).join(name).uri, data)
        for uri, _ in deltas + ([base] if base else []):
            storage.delete(uri)


def _ledger_objects(layout: Layout, sha: str) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
    """(newest base, the deltas after it in order) of a model's ledger."""
    files = [(u, n) for u, n in files_under(layout.ledger_dir(sha)) if n.endswith(".ledger")]
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
