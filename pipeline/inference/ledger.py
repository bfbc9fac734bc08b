"""The ledger: per model, the latest result of each input, the state behind `--since-last-run`.

One Parquet object per committed run (`d-<fence>-<run id>.ledger`, its name orders it), merged into one base
sorted by image_uri every COMPACT_AFTER objects; the columns are `rows.LEDGER_SCHEMA`. The objects'
metadata carries each input prefix's high-water mark for `--input-append-only`; beside each base,
`transient-<name>` holds its rows whose last attempt failed transiently.

What a run costs does not grow with the history: the marks come from the objects' footers (ranged reads),
a listing's rows from the base's row groups whose image_uri range can hold them, the transient failures
from the small side object and the deltas; a compaction streams the base one row group at a time.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core import scratch, storage
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
TRANSIENT = "transient-"  # beside base-<name>: its rows whose last attempt failed transiently


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
        compact(layout, sha, base, deltas)


def compact(layout: Layout, sha: str, base, deltas) -> None:
    """Merge the deltas into a new base, streaming the old one a row group at a time (the driver holds one
    row group and the deltas, never the whole ledger), then its transient side object; the old objects go
    once both are written."""
    name = "base-" + deltas[-1][1][2:]
    marks = json.dumps(high_water_marks(layout, sha))
    newer = pa.concat_tables([_as_ledger(_read(u)) for u, _ in deltas])
    newer = latest_per_input(newer).sort_by("image_uri")
    keys = newer["image_uri"].to_pylist()
    schema = LEDGER_SCHEMA.with_metadata({HIGH_WATER: marks})
    transient = []
    tmp = scratch.owned_temp_dir("vitray-ledger-")
    try:
        path = os.path.join(tmp, name)
        with pq.ParquetWriter(path, schema) as writer:
            taken = 0
            groups = _base_groups(base[0]) if base else _legacy_group(layout, sha)
            for i, (hi, read) in enumerate(groups):
                upto = len(keys) if i == len(groups) - 1 else bisect.bisect_right(keys, hi)
                merged = _merge(_as_ledger(read()), newer.slice(taken, upto - taken))
                taken = upto
                writer.write_table(merged.replace_schema_metadata(schema.metadata), row_group_size=BASE_ROW_GROUP)
                transient.append(_transient(merged))
            if not groups or taken < len(keys):
                rest = newer.slice(taken)
                writer.write_table(rest.replace_schema_metadata(schema.metadata), row_group_size=BASE_ROW_GROUP)
                transient.append(_transient(rest))
        storage.write_bytes(
            layout.ledger_dir(sha).join(TRANSIENT + name).uri, parquet_bytes(pa.concat_tables(transient))
        )
        storage.upload_file(path, layout.ledger_dir(sha).join(name).uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for uri, _ in deltas + ([base] if base else []):
        storage.delete(uri)
    if base:
        storage.delete(layout.ledger_dir(sha).join(TRANSIENT + base[1]).uri)


def _legacy_group(layout: Layout, sha: str):
    """An older version's single, unsorted ledger object as one group (merged whole, once)."""
    legacy = layout.output.join(LEDGER, f"{sha}.ledger").uri
    return [(None, lambda: _read(legacy))] if storage.exists(legacy) else []


def _merge(older: pa.Table, newer: pa.Table) -> pa.Table:
    """One row per input, the newer's where both have it, sorted by image_uri."""
    if newer.num_rows == 0:
        return older
    return latest_per_input(pa.concat_tables([older, newer])).sort_by("image_uri")


def _transient(t: pa.Table) -> pa.Table:
    return t.filter(pc.equal(pc.fill_null(t["error_kind"], ""), "transient"))


def _open(uri: str):
    """A random-access file on the object: a footer or a few row groups are ranged reads, not the object."""
    loc = storage.parse_uri(uri)
    try:
        return loc.filesystem.open_input_file(loc.path)
    except Exception as e:
        raise storage.explain(e, loc, "read") from None


def _read(uri: str) -> pa.Table:
    with _open(uri) as f:
        return pq.read_table(f)


def _base_groups(uri: str):
    """[(greatest image_uri in the row group, a reader of it)] of a sorted base, from its footer."""
    f = pq.ParquetFile(_open(uri))
    col = f.schema_arrow.get_field_index("image_uri")
    out = []
    for g in range(f.metadata.num_row_groups):
        stats = f.metadata.row_group(g).column(col).statistics
        hi = stats.max if stats is not None and stats.has_min_max else None
        out.append((hi, lambda g=g: f.read_row_group(g)))
    if any(hi is None for hi, _ in out):  # no statistics (another writer): one group, read whole
        return [(None, lambda: f.read())]
    return out


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
    objects' footers (--input-append-only lists only what comes after)."""
    base, deltas = _ledger_objects(layout, sha)
    marks: dict[str, str] = {}
    for uri, _ in ([base] if base else []) + deltas:
        with _open(uri) as f:
            meta = pq.read_schema(f).metadata or {}
        for prefix, key in json.loads(meta.get(HIGH_WATER.encode(), b"{}")).items():
            marks[prefix] = max(marks.get(prefix, ""), key)
    return marks


def transient_failures(layout: Layout, sha: str) -> list[str]:
    """Inputs whose last attempt failed transiently: an append-only listing no longer returns them. Read
    from the base's side object and the deltas after it (a base without one, an older version's, whole)."""
    base, deltas = _ledger_objects(layout, sha)
    if base is None and not deltas:
        t = read_ledger(layout, sha)
        return _transient(t)["image_uri"].to_pylist()
    tables = []
    if base:
        side = layout.ledger_dir(sha).join(TRANSIENT + base[1]).uri
        tables.append(_as_ledger(_read(side) if storage.exists(side) else _transient(_as_ledger(_read(base[0])))))
    tables += [_as_ledger(_read(u)) for u, _ in deltas]
    return _transient(latest_per_input(pa.concat_tables(tables)))["image_uri"].to_pylist()


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
    keys = None if only is None else sorted(set(wanted.to_pylist()) - {None})
    for uri in uris:
        if wanted is None:
            tables.append(_read(uri))
        elif base and uri == base[0]:  # only the row groups whose image_uri range can hold a wanted key
            tables += [t.filter(pc.is_in(t["image_uri"], value_set=wanted)) for t in _groups_holding(uri, keys)]
        else:
            t = _read(uri)
            tables.append(t.filter(pc.is_in(t["image_uri"], value_set=wanted)))
    if not tables:
        return LEDGER_SCHEMA.empty_table()
    return latest_per_input(pa.concat_tables([_as_ledger(t) for t in tables]))


def _groups_holding(uri: str, keys: list[str]):
    """The row groups of a sorted base whose [min, max] image_uri holds one of `keys` (sorted), read."""
    f = pq.ParquetFile(_open(uri))
    col = f.schema_arrow.get_field_index("image_uri")
    for g in range(f.metadata.num_row_groups):
        stats = f.metadata.row_group(g).column(col).statistics
        if stats is not None and stats.has_min_max:
            i = bisect.bisect_left(keys, stats.min)
            if i == len(keys) or keys[i] > stats.max:
                continue
        yield f.read_row_group(g)


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
