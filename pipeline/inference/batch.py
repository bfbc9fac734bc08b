"""Batch inference with Ray Data: images in object storage -> predictions as committed Parquet runs.

    lease on --output (one writer; `lease`) -> finish or drop what crashed runs left
    list inputs (minus those already predicted, with --since-last-run: the model's ledger)
      -> concurrent GETs + decode + eval crop + patchify, one task per ~batch   (CPU tasks)
      -> Predictor in an actor pool (weights read once by the driver, shipped through the object store;
         GPU + bf16 when asked)
      -> write_parquet to {output}/_staging/run={id}/ -> commit (`publish`)

The layout under --output, what each reader sees, and why a crash anywhere is safe: `publish`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.core import exported, storage
from pipeline.core.exits import EXIT_ERROR_RATE
from pipeline.data.manifest import load_manifest
from pipeline.inference import publish
from pipeline.inference.infer_config import ALIASES, InferConfig  # noqa: F401 - the job's schema, re-exported
from pipeline.inference.inputs import Inputs, fetch_and_preprocess, is_shards, list_inputs, shard_rows
from pipeline.inference.lease import Lease
from pipeline.inference.predictor import Predictor, preprocess
from pipeline.inference.run_report import (
    TIMELINE,
    Stages,
    operator_seconds,
    print_summary,  # noqa: F401 - the job prints it
    startup_seconds,
    summarize_staged,
)
from vit_model import ViTConfig

log = logging.getLogger(__name__)


class ErrorRateExceeded(RuntimeError):
    """More inputs failed than --max-error-rate allows; nothing was published."""

    exit_code = EXIT_ERROR_RATE


# ---- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preflight:
    """What the driver checked and read before writing anything: the model's bytes, read once."""

    weights: bytes  # model.safetensors
    config: str  # config.json
    weights_sha256: str
    model_cfg: ViTConfig  # preprocessing (mean/std, crop, interpolation) included
    class_names: list[str]


@dataclass
class Staged:
    """A run's staged files, not yet published, and what Ray Data measured while writing them."""

    files: list[str]
    operator_s: dict[str, float] = field(default_factory=dict)  # task-seconds per operator
    startup_s: dict[str, float] = field(default_factory=dict)  # first replica ready / first batch


# ---- the job -----------------------------------------------------------------------------------
def preflight(cfg: InferConfig) -> Preflight:
    """Everything that can be checked without writing: arguments, the model (read once here), buckets."""
    for name in ("model", "input", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    weights, config = exported.read(cfg.model)
    json.loads(config)  # a config.json that does not parse is refused here, before any cluster work
    storage.check_bucket(cfg.input)
    storage.check_bucket(cfg.output)
    if cfg.since_last_run and is_shards(cfg.input):
        raise ValueError("--since-last-run works on image prefixes, not on shards (shards are immutable data sets)")
    model_cfg = exported.model_config(config)  # this project's export or a timm folder; preprocessing included
    return Preflight(weights, config, hashlib.sha256(weights).hexdigest(), model_cfg, exported.class_names(config))


def predict_to_staging(cfg: InferConfig, pre: Preflight, inputs: Inputs, run_id: str, started: dt.datetime) -> Staged:
    """Run the Ray Data pipeline into `_staging/run={run_id}/`. Nothing is published."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.datasource import FilenameProvider

    from pipeline.data.streams import configure_ray_data, read_encoded
    from pipeline.data.transforms import ImageTransform

    class StagedNames(FilenameProvider):  # not `*.parquet`: no glob reader picks up a staged file
        def get_filename_for_task(self, write_uuid, task_index):
            # `{i}`: Ray's Parquet sink numbers the files of one task (and keeps a templated name as it is)
            return f"part-{task_index:06d}-{write_uuid}-{{i}}{publish.STAGED_SUFFIX}"

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
            part = read_encoded(manifest, s).map_batches(shard_rows, batch_format="numpy", batch_size=None)
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
        n_blocks = max(1, min(len(inputs.items) // cfg.batch_size, 2000))
        items = [{"image_uri": u, "label_id": lab, "size": -1 if n is None else n} for u, lab, n in inputs.items]
        ds = ray.data.from_items(items, override_num_blocks=n_blocks)
        ds = ds.map_batches(
            fetch_and_preprocess,
            fn_kwargs={"transform": eval_transform, "reads": cfg.reads},
            batch_size=None,
            batch_format="numpy",
            num_cpus=cfg.decode_cpus,
        )
    weights = ray.put(pre.weights)  # read once by the driver: every replica gets these exact bytes
    staging = publish.Layout.of(cfg.output).staging(run_id)
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
    staged = Staged([f for f in files if f.endswith(publish.STAGED_SUFFIX)], startup_s=startup_seconds(timeline, t0))
    try:
        staged.operator_s = operator_seconds(ds.stats())
    except Exception as e:  # stats are for the summary line only
        log.debug("no Ray Data stats: %s", e)
    return staged


def _list_and_state(cfg: InferConfig, pre: Preflight, layout: publish.Layout):
    """(inputs, inputs already done or None, seconds it took)."""
    t = time.time()
    inputs = list_inputs(cfg, pre.class_names)
    done = publish.done_inputs(layout, pre.weights_sha256, cfg.retry_errors) if cfg.since_last_run else None
    return inputs, done, time.time() - t


def run(cfg: InferConfig) -> dict:
    """The whole job. Raises LeaseHeld (nothing touched), ErrorRateExceeded (nothing published),
    StorageError / ValueError (bad input, before any prediction)."""
    stages = Stages()
    with stages("preflight"):
        pre = preflight(cfg)
    layout = publish.Layout.of(cfg.output)
    started = dt.datetime.now(dt.timezone.utc)
    run_id = cfg.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    result = {
        "run_id": run_id,
        "rows": 0,
        "inputs": 0,
        "errors": 0,
        "output": None,
        "images_per_s": 0.0,
        "accuracy_full": None,
        "model_sha256": pre.weights_sha256,
        "already_done": 0,
        "skipped_inputs": 0,
    }
    with Lease(cfg.output, run_id, cfg.lease_ttl_s) as lease:
        with stages("recover"):
            result["recovered"] = publish.recover(layout, lease)
        # Listing (and the --since-last-run state) runs in a thread while this one connects to Ray: on a large
        # prefix the listing takes as long as the start-up. The weights go to the object store only when
        # there is something to predict.
        with ThreadPoolExecutor(1) as pool:
            listing = pool.submit(_list_and_state, cfg, pre, layout)
            with stages("connect"):
                from pipeline.core.ray_runtime import connect

                connect(log_to_driver=True)
            inputs, done, listed_s = listing.result()
        stages.s["list"] = round(listed_s, 3)  # beside "connect", not after it
        result["skipped_inputs"] = len(inputs.skipped)
        for s in inputs.skipped[:20]:
            log.warning("not an input: %s (%s)", s["path"], s["reason"])
        if cfg.since_last_run:
            before = len(inputs.items)
            inputs.items = [x for x in inputs.items if x[0] not in done]
            result["already_done"] = before - len(inputs.items)
            print(
                f"since last run: {result['already_done']} of {before} inputs already predicted with this model",
                flush=True,
            )
        if cfg.limit and inputs.kind != "shards":
            inputs.items = inputs.items[: cfg.limit]
        if not inputs.items:
            return {**result, "elapsed_s": time.time() - stages.t0, "timings_s": stages.s}
        try:
            with stages("predict"):
                staged = predict_to_staging(cfg, pre, inputs, run_id, started)
            summary = summarize_staged(staged.files, pre.class_names)
            n_inputs = summary["rows"] if inputs.kind == "shards" else len(inputs.items)
            if summary["rows"] != n_inputs:
                raise RuntimeError(
                    f"run {run_id} produced {summary['rows']} rows for {n_inputs} inputs: not publishing it"
                )
            if cfg.max_error_rate is not None and summary["errors"] > cfg.max_error_rate * n_inputs:
                raise ErrorRateExceeded(
                    f"{summary['errors']} of {n_inputs} inputs could not be predicted, more than "
                    f"--max-error-rate {cfg.max_error_rate}: run {run_id} is not published "
                    "(the error rows name each input and its reason in the job log)"
                )
        except BaseException:
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
            rows=summary["rows"],
            inputs=n_inputs,
            errors=summary["errors"],
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
            publish.commit(layout, intent, lease)
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
