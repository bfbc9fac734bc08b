"""Batch inference with Ray Data: images in object storage -> predictions as committed Parquet runs.

    probe the store's conditional writes -> lease on --output (one writer; `lease`)
      -> finish, roll back or drop what crashed and superseded runs left (`publish.recover`)
    list inputs (minus those already predicted, with --since-last-run: the model's ledger, in Arrow)
      -> concurrent GETs + decode + eval crop + patchify, one task per ~batch   (CPU tasks)
      -> Predictor in an actor pool (weights read once by the driver, shipped through the object store;
         GPU + bf16 when asked)
      -> write_parquet to {output}/_staging/run={id}/ -> commit (`publish`)

The layout under --output, what each reader sees, and why a crash anywhere is safe: `publish`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import storage
from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_ERROR_RATE, EXIT_PARTIAL
from pipeline.core.lease import LeaseLost, output_lease
from pipeline.core.signals import in_job, unwind_on_sigterm
from pipeline.data.manifest import load_manifest
from pipeline.inference import inputs as feed
from pipeline.inference import ledger, outputs, publish, rows, run_report
from pipeline.inference.infer_config import ALIASES, InferConfig  # noqa: F401 - the job's schema, re-exported
from pipeline.inference.inputs import Inputs, fetch_and_preprocess, list_inputs, preprocess, shard_rows
from pipeline.inference.predictor import Predictor
from pipeline.inference.preflight import LoadedModel, preflight
from pipeline.inference.run_report import (
    TIMELINE,
    StageTimes,
    operator_seconds,
    print_summary,  # noqa: F401 - the job prints it
    startup_seconds,
    summarize_staged,
)

log = logging.getLogger(__name__)
DECODE_RETRIES = 2  # attempts after the first of a decode task whose worker died, before its inputs are isolated
MAX_SUSPECTS = 256  # inputs of crashed blocks decoded alone at most; more is not one poison input


class ErrorRateExceeded(RuntimeError):
    """More inputs failed than --max-error-rate allows; nothing was published."""

    exit_code = EXIT_ERROR_RATE


class PartialOutput(RuntimeError):
    """A commit or a recovery stopped midway: the output may hold part of a run that no `_SUCCESS` names;
    the next run finishes it or rolls it back."""

    exit_code = EXIT_PARTIAL


class RunIdTaken(ValueError):
    exit_code = EXIT_BAD_INPUT


@dataclass
class Staged:
    """A run's staged files, not yet published, and what Ray Data measured while writing them."""

    files: list[str]
    operator_s: dict[str, float] = field(default_factory=dict)  # task-seconds per operator
    startup_s: dict[str, float] = field(default_factory=dict)  # first replica ready / first batch


# ---- the job -----------------------------------------------------------------------------------
def predict_to_staging(
    cfg: InferConfig,
    pre: LoadedModel,
    inputs: Inputs,
    run_id: str,
    started: dt.datetime,
    staging: storage.Location | None = None,
    suffix: str = outputs.STAGED_SUFFIX,
    poison: dict[str, str] | None = None,
) -> Staged:
    """Run the Ray Data pipeline into `staging` (default: `{output}/_staging/run={run_id}/`), files named
    `part-*{suffix}`. Nothing is published."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.datasource import FilenameProvider

    from pipeline.data.streams import configure_ray_data, sample_stream
    from pipeline.data.transforms import ImageTransform

    class StagedNames(FilenameProvider):  # not `*.parquet`: no glob reader picks up a staged file
        def get_filename_for_task(self, write_uuid, task_index):
            # `{i}`: Ray's Parquet sink numbers the files of one task (and keeps a templated name as it is)
            return f"part-{task_index:06d}-{write_uuid}-{{i}}{suffix}"

    configure_ray_data()
    # Ray Data reserves part of the CPU budget per operator; with a model actor pool holding slots that
    # left one read task running at a time (measured +25-33% rows/s without the reservation).
    from ray.data import DataContext

    DataContext.get_current().op_resource_reservation_enabled = False
    eval_transform = ImageTransform.for_model(pre.model_cfg, False, rules=cfg.rules)  # the export's crop, ...
    if inputs.kind == "shards":
        manifest = load_manifest(cfg.input)
        splits = [s for s in manifest.splits if cfg.split in (None, s) and manifest.splits[s].shards]  # none: empty
        ds = None
        for s in splits:
            part = sample_stream(manifest, s).map_batches(shard_rows, batch_format="numpy", batch_size=None)
            ds = part if ds is None else ds.union(part)
        if cfg.limit:
            ds = ds.limit(cfg.limit)
        ds = ds.map_batches(
            preprocess,
            fn_kwargs={"transform": eval_transform},
            batch_size=cfg.batch_size,
            batch_format="numpy",
            num_cpus=cfg.decode_cpus,
        )
    else:
        # Images are small objects: one task per ~batch of them GETs them concurrently (a GET is mostly
        # waiting) and decodes them in the same task, so no encoded bytes pass through the object store.
        n_blocks = max(1, min(len(inputs) // cfg.batch_size, 2000))
        per = -(-len(inputs) // n_blocks)
        ds = ray.data.from_arrow([inputs.table.slice(i, per) for i in range(0, len(inputs), per)])
        marks = (staging or outputs.Layout.of(cfg.output).staging(run_id)).join(feed.DECODING).uri
        ds = ds.map_batches(
            fetch_and_preprocess,
            fn_kwargs={"transform": eval_transform, "reads": cfg.reads, "marks": marks, "poison": poison or {}},
            batch_size=None,
            batch_format="numpy",
            num_cpus=cfg.decode_cpus,
            max_retries=DECODE_RETRIES,  # Ray Data's default retries a task whose worker died forever
        )
    weights = ray.put(pre.weights)  # read once by the driver: every replica gets these exact bytes
    staging = staging or outputs.Layout.of(cfg.output).staging(run_id)
    timeline = staging.join(TIMELINE).uri
    ds = ds.map_batches(
        Predictor,
        fn_constructor_args=(
            weights,
            pre.config,
            pre.weights_sha256,
            cfg.model,
            cfg.top_k,
            cfg.embeddings,
            run_id,
            started,
            cfg.num_gpus > 0,
            int(cfg.cpus_per_replica),
        ),
        fn_constructor_kwargs={"timeline": timeline},
        compute=ActorPoolStrategy(min_size=cfg.replicas[0], max_size=cfg.replicas[1]),
        num_gpus=cfg.num_gpus,
        num_cpus=cfg.cpus_per_replica,
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )
    fs, path = storage.resolve(staging.uri)
    t0 = time.time()
    ds.write_parquet(path, filesystem=fs, filename_provider=StagedNames())
    files = [storage.to_uri(staging, f.path) for f in storage.list_files(staging.uri)]
    staged = Staged([f for f in files if f.endswith(suffix)], startup_s=startup_seconds(timeline, t0))
    try:
        staged.operator_s = operator_seconds(ds.stats())
    except Exception as e:  # stats are for the summary line only
        log.debug("no Ray Data stats: %s", e)
    return staged


def _list_and_state(cfg: InferConfig, pre: LoadedModel, layout: outputs.Layout, stages: StageTimes):
    """(inputs, the model's ledger or None, the listing's high-water mark, seconds it took). With
    --input-append-only the listing starts after the last run's mark, and the inputs that failed
    transiently below it are added back from the ledger."""
    t = time.time()
    prefix = storage.parse_uri(cfg.input).uri
    start_after = None
    if cfg.since_last_run and cfg.input_append_only:
        start_after = ledger.high_water_marks(layout, pre.weights_sha256).get(prefix)

    def listed(n: int) -> None:
        stages.listed += n

    inputs = list_inputs(cfg, pre.class_names, start_after, listed)
    mark = None
    if inputs.kind != "shards":
        mark = pc.max(inputs.table["image_uri"]).as_py() if len(inputs) else start_after
    if start_after:
        again = [u for u in ledger.transient_failures(layout, pre.weights_sha256) if u.startswith(prefix)]
        if again:  # their label, version and size are not known without a listing: null
            inputs.table = pa.concat_tables([inputs.table, rows.input_table({"image_uri": again})])
    seen = (
        ledger.read_ledger(layout, pre.weights_sha256, only=inputs.table["image_uri"]) if cfg.since_last_run else None
    )
    return inputs, seen, ({prefix: mark} if mark else {}), time.time() - t


def _check_run_id(layout: outputs.Layout, run_id: str) -> None:
    """Refuse an id that any run left a trace of: committed, rolled back (its tombstone's sweep would delete the
    new run's files), or with a commit intent (checked after `recover`, which finishes or rolls back those,
    and gives runs of older versions their record in `_runs/`)."""
    used = [layout.run_record(run_id), layout.tombstone(run_id), layout.intent(run_id)]
    if any(storage.exists(loc.uri) for loc in used):
        raise RunIdTaken(
            f"--run-id {run_id}: a run with this id is already committed (or was rolled back) under "
            f"{layout.output.uri}; "
            "choose a new id (or leave it out: the default is the UTC time and a random suffix)"
        )


def run(cfg: InferConfig) -> dict:
    """The whole job. Raises LeaseHeld / LeaseLost (nothing of this run published), ErrorRateExceeded
    (nothing published), PartialOutput (part of a run may be visible to plain glob readers until the next
    run), StorageError / ValueError (bad input, before anything was written)."""
    stages = StageTimes()
    with stages("preflight"):
        pre = preflight(cfg)
    layout = outputs.Layout.of(cfg.output)
    started = dt.datetime.now(dt.timezone.utc)
    run_id = cfg.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    lease = output_lease(
        cfg.output,
        run_id,
        cfg.lease_ttl_s,
        unsafe_no_lease=cfg.unsafe_no_lease,
        max_run_s=cfg.max_run_s,
        stall_s=cfg.stall_s,
        progress=lambda: progress(stages, layout.staging(run_id).uri),
        floor=lambda: outputs.highest_fence(layout),
    )
    try:
        with lease:
            return _run_held(cfg, pre, layout, lease, run_id, started, stages)
    except KeyboardInterrupt:
        if lease.lost:  # the renewal thread interrupted us: the run stops, the next one takes over
            raise LeaseLost(f"run {run_id} stopped: {lease.lost}") from None
        raise


def _predict_isolating(cfg, pre, inputs, run_id, started, layout) -> Staged:
    """`predict_to_staging`; when it failed and tasks died decoding (their blocks' marks stayed), each of those
    inputs is decoded alone in fresh processes, and the ones that kill them every time are predicted again as
    rows with a permanent error (the ledger keeps them, so no later run meets them again)."""
    poison: dict[str, str] = {}
    marks = layout.staging(run_id).join(feed.DECODING).uri
    while True:
        try:
            return predict_to_staging(cfg, pre, inputs, run_id, started, poison=poison)
        except Exception:
            suspects = [] if inputs.kind == "shards" else [u for u in feed.crashed_inputs(marks) if u not in poison]
            if not suspects or len(suspects) > MAX_SUSPECTS:
                raise
            log.error("tasks died decoding %d inputs: decoding each alone to find the one(s) at fault", len(suspects))
            found = feed.isolate(suspects)
            if not found:
                raise
            for uri, why in found.items():
                log.error("poison input %s: %s", uri, why)
            poison.update(found)
            storage.delete(layout.staging(run_id).uri, recursive=True)


def progress(stages: StageTimes, staging: str) -> tuple:
    """What changes while a run makes progress: stages finished, entries listed, files staged."""
    return len(stages.s), stages.listed, len(storage.list_files(staging))


def _run_held(cfg, pre, layout, lease, run_id, started, stages) -> dict:
    result = run_report.nothing_yet(run_id, pre.weights_sha256)
    with stages("recover"):
        try:
            rec = publish.recover(layout, lease)
        except (LeaseLost, KeyboardInterrupt):
            raise
        except Exception as e:
            raise PartialOutput(
                f"finishing what earlier runs left under {cfg.output} failed: {e}. Readers that honour _SUCCESS "
                "are not affected; the next run tries again"
            ) from e
    result["recovered"], result["rolled_back"] = rec.finished, rec.rolled_back
    if cfg.run_id:  # after recovery: a crashed commit of this id is finished (or rolled back) by now
        _check_run_id(layout, run_id)
    # Listing (and the --since-last-run state) runs in a thread while this one connects to Ray: on a large
    # prefix the listing takes as long as the start-up. The weights go to the object store only when
    # there is something to predict.
    with ThreadPoolExecutor(1) as pool:
        listing = pool.submit(_list_and_state, cfg, pre, layout, stages)
        with stages("connect"):
            from pipeline.core.ray_runtime import connect

            connect(log_to_driver=True)
            unwind_on_sigterm()  # again: Ray's driver replaced the handler
        inputs, seen, listed_through, listed_s = listing.result()
    stages.s["list"] = round(listed_s, 3)  # beside "connect", not after it
    result["skipped_inputs"] = len(inputs.skipped)
    for s in inputs.skipped[:20]:
        log.warning("not an input: %s (%s)", s["path"], s["reason"])
    if cfg.since_last_run:
        before = len(inputs)
        inputs.table = inputs.table.filter(ledger.todo(seen, inputs.table, cfg.retry_errors))
        result["already_done"] = before - len(inputs)
        print(
            f"since last run: {result['already_done']} of {before} inputs need no new prediction with this model",
            flush=True,
        )
    if cfg.limit and inputs.kind != "shards" and len(inputs) > cfg.limit:
        inputs.table = inputs.table.slice(0, cfg.limit)
        # the mark of what is predicted, not of the whole listing: what the limit left out is listed again
        listed_through = {k: pc.max(inputs.table["image_uri"]).as_py() for k in listed_through}
    if not len(inputs):
        lease.check()  # "nothing new" is only an answer if the state it read was ours to read
        return {**result, "elapsed_s": time.time() - stages.t0, "timings_s": stages.s}
    try:
        with stages("predict"):
            staged = _predict_isolating(cfg, pre, inputs, run_id, started, layout)
        summary = summarize_staged(staged.files, pre.class_names)
        n_inputs = summary["rows"] if inputs.kind == "shards" else len(inputs)
        if summary["rows"] != n_inputs:
            raise RuntimeError(f"run {run_id} produced {summary['rows']} rows for {n_inputs} inputs: not publishing it")
        if cfg.max_error_rate is not None and summary["errors"] > cfg.max_error_rate * n_inputs:
            raise ErrorRateExceeded(
                f"{summary['errors']} of {n_inputs} inputs could not be predicted, more than "
                f"--max-error-rate {cfg.max_error_rate}: run {run_id} is not published "
                "(the error rows name each input and its reason in the job log)"
            )
    except BaseException as e:
        if in_job() and isinstance(e, (SystemExit, KeyboardInterrupt)):
            # The job stops: disconnecting ends its Ray tasks (a job-local Ray stops), so fewer of them write
            # after the staging is removed. A write already in flight may still land: the next run sweeps it.
            import ray

            ray.shutdown()
        storage.delete(layout.staging(run_id).uri, recursive=True)  # nothing of this run is committed
        raise
    acc = summary["accuracy"]
    intent = publish.plan_commit(
        layout,
        run_id,
        f"{started:%Y-%m-%d}",
        staged.files,
        accuracy_report=acc,
        ledger=inputs.kind != "shards",
        fence=lease.generation,
        rows=summary["rows"],
        inputs=n_inputs,
        errors=summary["errors"],
        errors_transient=summary["errors_transient"],
        listed_through=listed_through,
        model_uri=cfg.model,
        model_sha256=pre.weights_sha256,
        input=cfg.input,
        not_inputs=inputs.skipped[:1000],  # left out by the naming rule (hidden names), with the reason
        not_inputs_count=len(inputs.skipped),
        started_at=started.isoformat(),
        timings_s=stages.s,
        operator_s=staged.operator_s,
        startup_s=staged.startup_s,
        accuracy=acc and {k: acc[k] for k in ("top1", "top5", "count")},
    )
    with stages("publish"):
        try:
            publish.commit(layout, intent, lease)
        except LeaseLost as e:
            fate = publish.outcome(layout, run_id)
            if fate == "published":  # the new holder finished our commit: every part and _SUCCESS are there
                log.warning("run %s lost its lease while publishing (%s); the new holder published it", run_id, e)
            elif fate == "pending":
                raise PartialOutput(
                    f"run {run_id} lost its lease while publishing ({e}); its commit intent stays, and the run "
                    "that holds the output next finishes it or rolls it back"
                ) from None
            else:
                raise LeaseLost(f"{e}; run {run_id} is {fate}: nothing of it is published") from None
        except (Exception, KeyboardInterrupt, SystemExit) as e:
            if isinstance(e, KeyboardInterrupt) and not lease.lost:
                raise
            why = "stopped by SIGTERM" if isinstance(e, SystemExit) else str(e)
            raise PartialOutput(
                f"publishing run {run_id} stopped midway: {why}. Readers that honour _SUCCESS do not see it; "
                "the next run finishes or rolls it back"
            ) from e
    return {
        **result,
        **intent.success,
        "output": intent.run_dir,
        "accuracy_full": acc,
        "elapsed_s": time.time() - stages.t0,
        "images_per_s": n_inputs / max(stages.s["predict"], 1e-9),
        "timings_s": stages.s,
        "operator_s": staged.operator_s,
        "startup_s": staged.startup_s,
    }
