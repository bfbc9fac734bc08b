"""Batch inference with an Iceberg table as its output (`--table`): one snapshot per run, exactly once.

    open the catalog and the table (created on first use) -> refuse a reused --run-id
    plan at the current snapshot S: list inputs (after the marks in S's summary with --input-append-only),
      minus what the table already holds for this model (--since-last-run)
    predict (the same Ray Data pipeline as the prefix output) into <table location>/data/vitray-run=<id>/
    commit those files as one snapshot on S, or validated against every snapshot since S (`snapshots.commit`)
    every --maintain-every runs: expire snapshots, remove orphan data files (`maintenance`)
No lease is needed for correctness: two runs that plan on the same snapshot cannot both commit an input
version (the second finds it in what the first added, and exits 75 with nothing committed). `--table-lease`
adds the prefix output's lease on the table's location, so overlapping schedules also do not predict the same
inputs twice. A run killed anywhere leaves at most data files no snapshot names: readers never see them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import storage
from pipeline.core.lease import output_lease
from pipeline.core.signals import in_job, unwind_on_sigterm
from pipeline.inference import batch, ledger, rows, run_report
from pipeline.inference.iceberg import catalog as catalogs
from pipeline.inference.iceberg import maintenance, snapshots
from pipeline.inference.infer_config import InferConfig
from pipeline.inference.inputs import list_inputs
from pipeline.inference.preflight import LoadedModel, inside, preflight
from pipeline.inference.run_report import TIMELINE, StageTimes, summarize_staged

log = logging.getLogger(__name__)


def run(cfg: InferConfig) -> dict:
    """The whole job with `--table`. Raises TableRefused / RunIdTaken / ValueError (bad input, nothing written),
    CatalogUnavailable / Conflict (exit 75, nothing committed), ErrorRateExceeded (nothing committed)."""
    stages = StageTimes()
    with stages("preflight"):
        pre = preflight(cfg)
        cat = catalogs.open_catalog(cfg.catalog, cfg.warehouse)
        table = catalogs.open_table(cat, cfg.table, cfg.embeddings)
    location = storage.parse_uri(table.location())
    if inside(location.uri, cfg.input):
        raise ValueError(
            f"--table {cfg.table} lives under --input ({location.uri}): its files would be listed as inputs"
        )
    started = dt.datetime.now(dt.timezone.utc)
    run_id = cfg.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    if snapshots.run_committed(table, run_id) is not None:
        raise batch.RunIdTaken(
            f"--run-id {run_id}: a run with this id is already committed to {cfg.table}; choose a new id "
            "(or leave it out: the default is the UTC time and a random suffix)"
        )
    staging = location.join("data", f"vitray-run={run_id}")
    lease = (
        output_lease(cfg.output or location.uri, run_id, cfg.lease_ttl_s, max_run_s=cfg.max_run_s, stall_s=cfg.stall_s)
        if cfg.table_lease
        else _Unleased()
    )
    with lease:
        return _run_planned(cfg, pre, cat, table, run_id, started, staging, stages)


class _Unleased:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _plan(cfg: InferConfig, pre: LoadedModel, table, base):
    """(inputs, the model's rows at `base` or None, the listing's mark, seconds): what is new, from the table."""
    t = time.time()
    prefix = storage.parse_uri(cfg.input).uri
    sha = pre.weights_sha256
    start_after = (
        snapshots.marks(base).get(sha, {}).get(prefix) if cfg.since_last_run and cfg.input_append_only else None
    )
    inputs = list_inputs(cfg, pre.class_names, start_after)
    mark = None
    if inputs.kind != "shards":
        mark = pc.max(inputs.table["image_uri"]).as_py() if len(inputs) else start_after
    held, snapshot_id = None, base.snapshot_id if base else None
    if start_after:  # below the mark, the listing no longer returns what failed transiently: add it back
        tried = snapshots.transient_failures(table, snapshot_id, sha, prefix)
        latest = snapshots.seen(table, snapshot_id, sha, only=tried) if tried else None
        again = [] if latest is None else latest.filter(pc.equal(latest["error_kind"], rows.TRANSIENT))["image_uri"]
        if len(again):
            inputs.table = pa.concat_tables([inputs.table, rows.input_table({"image_uri": again.to_pylist()})])
    if cfg.since_last_run:
        held = snapshots.seen(table, snapshot_id, sha, only=inputs.table["image_uri"].to_pylist())
    return inputs, held, ({prefix: mark} if mark else {}), time.time() - t


def _run_planned(cfg, pre, cat, table, run_id, started, staging, stages) -> dict:
    result = {**run_report.nothing_yet(run_id, pre.weights_sha256), "table": cfg.table}
    base = table.current_snapshot()
    with ThreadPoolExecutor(1) as pool:
        planning = pool.submit(_plan, cfg, pre, table, base)
        with stages("connect"):
            from pipeline.core.ray_runtime import connect

            connect(log_to_driver=True)
            unwind_on_sigterm()
        inputs, held, listed_through, listed_s = planning.result()
    stages.s["list"] = round(listed_s, 3)
    result["skipped_inputs"] = len(inputs.skipped)
    if held is not None:
        before = len(inputs)
        inputs.table = inputs.table.filter(ledger.todo(held, inputs.table, cfg.retry_errors))
        result["already_done"] = before - len(inputs)
        print(f"since last run: {result['already_done']} of {before} inputs need no new prediction with this model")
    if cfg.limit and inputs.kind != "shards" and len(inputs) > cfg.limit:
        inputs.table = inputs.table.slice(0, cfg.limit)
        # the mark of what is predicted, not of the whole listing: what the limit left out is listed again
        listed_through = {k: pc.max(inputs.table["image_uri"]).as_py() for k in listed_through}
    if not len(inputs):
        return {**result, "elapsed_s": time.time() - stages.t0, "timings_s": stages.s}
    try:
        with stages("predict"):
            staged = batch.predict_to_staging(cfg, pre, inputs, run_id, started, staging=staging, suffix=".parquet")
        summary = summarize_staged(staged.files, pre.class_names)
        n_inputs = summary["rows"] if inputs.kind == "shards" else len(inputs)
        if summary["rows"] != n_inputs:
            raise RuntimeError(f"run {run_id} produced {summary['rows']} rows for {n_inputs} inputs: not committing it")
        if cfg.max_error_rate is not None and summary["errors"] > cfg.max_error_rate * n_inputs:
            raise batch.ErrorRateExceeded(
                f"{summary['errors']} of {n_inputs} inputs could not be predicted, more than --max-error-rate "
                f"{cfg.max_error_rate}: run {run_id} is not committed"
            )
        storage.delete(staging.join(TIMELINE).uri, recursive=True)
        props = {
            snapshots.RUN_ID: run_id,
            snapshots.MODEL_SHA: pre.weights_sha256,
            snapshots.MODEL_URI: cfg.model,
            snapshots.INPUT: cfg.input,
            snapshots.LISTED: str(n_inputs),
            snapshots.MARKS: json.dumps({pre.weights_sha256: listed_through} if listed_through else {}),
            "vitray.errors": str(summary["errors"]),
        }
        ours = inputs.table.select(["image_uri", "input_version"]) if cfg.since_last_run else None
        with stages("commit"):
            snapshot_id = snapshots.commit(
                cat,
                cfg.table,
                table,
                staged.files,
                props,
                {snapshots.MODEL_SHA: pre.weights_sha256, snapshots.MODEL_URI: cfg.model},
                ours,
                pre.weights_sha256,
            )
    except BaseException as e:
        if in_job() and isinstance(e, (SystemExit, KeyboardInterrupt)):
            import ray

            ray.shutdown()
        _discard(cat, cfg.table, run_id, staging)
        raise
    if cfg.maintain_every and _runs_so_far(cat.load_table(cfg.table)) % cfg.maintain_every == 0:
        with stages("maintain"):
            result["maintenance"] = maintenance.maintain(
                cat.load_table(cfg.table), cfg.snapshot_retention_days, cfg.orphan_grace_h
            )
    acc = summary["accuracy"]
    return {
        **result,
        "rows": summary["rows"],
        "inputs": n_inputs,
        "errors": summary["errors"],
        "output": f"table {cfg.table} snapshot {snapshot_id}",
        "snapshot_id": snapshot_id,
        "accuracy_full": acc,
        "elapsed_s": time.time() - stages.t0,
        "images_per_s": n_inputs / max(stages.s["predict"], 1e-9),
        "timings_s": stages.s,
        "operator_s": staged.operator_s,
        "startup_s": staged.startup_s,
    }


def _runs_so_far(table) -> int:
    return sum(snapshots.RUN_ID in snapshots.summary(s) for s in table.snapshots())


def _discard(cat, name: str, run_id: str, staging: storage.Location) -> None:
    """Remove this run's data files unless its snapshot landed (then they are the table's)."""
    try:
        if snapshots.run_committed(cat.load_table(name), run_id) is None:
            storage.delete(staging.uri, recursive=True)
    except Exception as e:  # the catalog is away: the files stay as orphans, which maintenance removes
        log.warning("run %s: could not check the table (%s); its data files are left to maintenance", run_id, e)
