"""Batch inference with Ray Data: images in object storage -> predictions as committed Parquet runs.

    lease on --output (one writer; pipeline/lease.py) -> finish or drop what crashed runs left
    list inputs (minus those already predicted, with --since-last-run: the model's ledger)
      -> concurrent GETs + decode + eval crop + patchify, one task per ~batch   (CPU tasks)
      -> Predictor in an actor pool (weights read once by the driver, shipped through the object store;
         GPU + bf16 when asked)
      -> write_parquet to {output}/_staging/run={id}/ -> commit (pipeline/publish.py)

The layout under --output, what each reader sees, and why a crash anywhere is safe: pipeline/publish.py.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from . import exported, publish, storage
from .config import Section
from .lease import Lease
from .predictor import Predictor, preprocess
from .shards import MANIFEST, load_manifest, shard_uris

log = logging.getLogger(__name__)


class ErrorRateExceeded(RuntimeError):
    """More inputs failed than --max-error-rate allows; nothing was published."""


class InferConfig(Section):
    model: str | None = Field(None, description="exported model folder URI (model.safetensors + config.json)")
    input: str | None = Field(None, description="images: S3 prefix or folder, a class-folder tree, or a shards manifest")
    output: str | None = Field(None, description="where prediction runs are published (S3 prefix or folder)")
    batch_size: int = Field(64, ge=1, description="images per model call")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (0: CPU)")
    replicas: tuple[int, int] = Field((1, 2), description="model replicas min,max (actor pool autoscaling)")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPU slots per model replica")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task")
    reads: int = Field(16, ge=1, description="concurrent GETs within one read+decode task")
    top_k: int = Field(5, ge=1, description="classes kept per image")
    embeddings: bool = Field(False, description="also write the pooled representation")
    since_last_run: bool = Field(False, description="skip inputs that a published run already predicted with this model")
    limit: int | None = Field(None, ge=1, description="at most this many (new) inputs")
    split: str | None = Field(None, description="shards input: only this split (default: all)")
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", description="run id (default: UTC time + random)")
    retry_errors: bool = Field(True, description="with --since-last-run: inputs whose last attempt failed are tried "
                               "again (--no-retry-errors: count them as done, for inputs known to be permanently bad)")
    max_error_rate: float | None = Field(None, ge=0, le=1, description="fail, publishing nothing, when more than this "
                                         "fraction of the inputs could not be predicted (default: off)")
    lease_ttl_s: float = Field(600.0, ge=3, description="the output's lease expires this long after its last renewal "
                               "(a crashed run blocks the next one for at most this long)")

    @field_validator("replicas", mode="before")
    @classmethod
    def _pair(cls, v):
        if isinstance(v, str):
            v = [int(x) for x in v.split(",")]
        if isinstance(v, int):
            v = (v, v)
        if len(v) != 2 or v[0] < 1 or v[1] < v[0]:
            raise ValueError("replicas must be MIN,MAX with 1 <= MIN <= MAX, e.g. 1,4")
        return tuple(v)


ALIASES = {
    "model": "model", "input": "input", "output": "output", "batch-size": "batch_size", "num-gpus": "num_gpus",
    "replicas": "replicas", "top-k": "top_k", "embeddings": "embeddings", "since-last-run": "since_last_run",
    "limit": "limit", "retry-errors": "retry_errors", "max-error-rate": "max_error_rate", "lease-ttl": "lease_ttl_s",
}


# ---- inputs ------------------------------------------------------------------------------------
def _is_shards(uri: str) -> bool:
    loc = storage.parse_uri(uri)
    return loc.uri.endswith(".json") or storage.exists(loc.join(MANIFEST).uri)


def list_inputs(cfg: InferConfig, class_names: list[str]) -> tuple[list[tuple[str, int]], str]:
    """[(image_uri, known label id or -1)], and the kind of input ("images", "class-tree", "shards")."""
    loc = storage.parse_uri(cfg.input)
    if _is_shards(loc.uri):
        manifest = load_manifest(loc.uri)
        return [(u, -1) for split in manifest["splits"] if cfg.split in (None, split) for u in shard_uris(manifest, split)], "shards"
    files = [f for f in storage.list_files(loc.uri) if not posixpath.basename(f.path).startswith((".", "_"))]
    if not files:
        raise storage.StorageError(f"no input files under {loc.uri}: check --input")
    rels = [posixpath.relpath(f.path, loc.path) if loc.scheme == "s3" else os.path.relpath(f.path, loc.path) for f in files]
    index = {c: i for i, c in enumerate(class_names)}
    tree = all(r.count("/") == 1 for r in rels) and all(r.split("/")[0] in index for r in rels)
    out = [(storage.to_uri(loc, f.path), index[r.split("/")[0]] if tree else -1) for f, r in zip(files, rels)]
    return out, "class-tree" if tree else "images"


# ---- the job -----------------------------------------------------------------------------------
def preflight(cfg: InferConfig) -> dict:
    """Everything that can be checked without writing: arguments, the model (read once here), buckets."""
    for name in ("model", "input", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    weights, config = exported.read(cfg.model)
    meta = json.loads(config)
    storage.check_bucket(cfg.input)
    storage.check_bucket(cfg.output)
    if cfg.since_last_run and _is_shards(cfg.input):
        raise ValueError("--since-last-run works on image prefixes, not on shards (shards are immutable data sets)")
    model_cfg = exported.model_config(config)  # this project's export or a timm folder; preprocessing included
    return {"weights": weights, "config": config, "weights_sha256": hashlib.sha256(weights).hexdigest(), "meta": meta,
            "model_cfg": model_cfg, "class_names": exported.class_names(config)}


def predict_to_staging(cfg: InferConfig, info: dict, run_id: str, started: dt.datetime) -> list[str]:
    """Run the Ray Data pipeline into `_staging/run={run_id}/`; returns the staged file URIs. Nothing is published."""
    import ray
    from ray.data import ActorPoolStrategy
    from ray.data.datasource import FilenameProvider

    from .data import StreamConfig, configure_ray_data, read_encoded

    class StagedNames(FilenameProvider):  # not `*.parquet`: no glob reader picks up a staged file
        def get_filename_for_task(self, write_uuid, task_index):
            # `{i}`: Ray's Parquet sink numbers the files of one task (and keeps a templated name as it is)
            return f"part-{task_index:06d}-{write_uuid}-{{i}}{publish.STAGED_SUFFIX}"

    configure_ray_data()
    # Ray Data reserves part of the CPU budget per operator; with a model actor pool holding slots that
    # left one read task running at a time (measured +25-33% rows/s without the reservation).
    from ray.data import DataContext

    DataContext.get_current().op_resource_reservation_enabled = False
    eval_transform = StreamConfig.for_model(info["model_cfg"], False).transform()  # the export's crop, interpolation
    inputs = info["inputs"]
    if info["kind"] == "shards":
        manifest = load_manifest(cfg.input)
        splits = [s for s in manifest["splits"] if cfg.split in (None, s)]
        ds = None
        for s in splits:
            part = read_encoded(manifest, s).map_batches(_shard_rows, batch_format="numpy", batch_size=None)
            ds = part if ds is None else ds.union(part)
        if cfg.limit:
            ds = ds.limit(cfg.limit)
        ds = ds.map_batches(preprocess, fn_kwargs={"transform": eval_transform},
                            batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.decode_cpus)
    else:
        # Images are small objects: one task per ~batch of them GETs them concurrently (a GET is mostly
        # waiting) and decodes them in the same task, so no encoded bytes pass through the object store.
        n_blocks = max(1, min(len(inputs) // cfg.batch_size, 2000))
        ds = ray.data.from_items([{"image_uri": u, "label_id": lab} for u, lab in inputs], override_num_blocks=n_blocks)
        ds = ds.map_batches(fetch_and_preprocess, fn_kwargs={"transform": eval_transform, "reads": cfg.reads},
                            batch_size=None, batch_format="numpy", num_cpus=cfg.decode_cpus)
    weights = ray.put(info["weights"])  # read once by the driver: every replica gets these exact bytes
    staging = publish.Layout.of(cfg.output).staging(run_id)
    timeline = staging.join(TIMELINE).uri
    ds = ds.map_batches(
        Predictor,
        fn_constructor_args=(weights, info["config"], info["weights_sha256"], cfg.model, cfg.top_k, cfg.embeddings,
                             run_id, started, cfg.num_gpus > 0, int(cfg.cpus_per_replica)),
        fn_constructor_kwargs={"timeline": timeline},
        compute=ActorPoolStrategy(min_size=cfg.replicas[0], max_size=cfg.replicas[1]),
        num_gpus=cfg.num_gpus, num_cpus=cfg.cpus_per_replica, batch_size=cfg.batch_size, batch_format="numpy",
    )
    fs, path = storage.resolve(staging.uri)
    t0 = time.time()
    ds.write_parquet(path, filesystem=fs, filename_provider=StagedNames())
    try:
        info["operator_s"] = operator_seconds(ds.stats())
    except Exception as e:  # stats are for the summary line only
        log.debug("no Ray Data stats: %s", e)
    info["startup_s"] = startup_seconds(timeline, t0)
    return [storage.to_uri(staging, f.path) for f in storage.list_files(staging.uri) if f.path.endswith(publish.STAGED_SUFFIX)]


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_STAGE_NAMES = [("fetch_and_preprocess", "read+decode"), ("preprocess", "decode"), ("Predictor", "model"),
                ("Write", "write"), ("FromItems", "list"), ("unpack_shards", "read"), ("_shard_rows", "read"),
                ("Read", "read")]


def operator_seconds(stats: str) -> dict[str, float]:
    """Task-seconds per Ray Data operator (the sum of its tasks' wall time), from `Dataset.stats()`:
    where a run's time went, stage by stage (read + decode, model, write)."""
    out: dict[str, float] = {}
    for m in re.finditer(r"Operator \d+ (?P<name>[^:\n]+):[^\n]*\n\* Remote wall time:[^\n]*?(?P<v>[\d.]+)(?P<u>us|ms|s) total",
                         stats):
        # fused operators (on CPU, Ray Data runs the decode inside the model actor) keep every part's name
        parts = []
        for part in m.group("name").strip().split("->"):
            word = next((v for k, v in _STAGE_NAMES if k in part), part)
            if word not in parts:
                parts.append(word)
        name = "+".join(parts)
        out[name] = round(out.get(name, 0.0) + float(m.group("v")) * _UNITS[m.group("u")], 3)
    return out


TIMELINE = "_timeline"  # in the run's staging folder: one note per model replica


def startup_seconds(timeline: str, t0: float) -> dict[str, float]:
    """From the replicas' notes: seconds from the pipeline's start (`t0`) to the first replica ready
    (model built) and to the first batch predicted, and the longest model load of a replica."""
    notes = []
    for f in storage.list_files(timeline):
        try:
            notes.append(json.loads(storage.read_bytes(storage.to_uri(storage.parse_uri(timeline), f.path))))
        except (storage.StorageError, ValueError):
            continue
    if not notes:
        return {}
    return {"first_batch": round(min(n["first_batch_at"] for n in notes) - t0, 3),
            "replica_ready": round(min(n["ready_at"] for n in notes) - t0, 3),
            "model_load": round(max(n["ready_at"] - n["started_at"] for n in notes), 3)}


def fetch_and_preprocess(batch: dict, transform, reads: int) -> dict:
    """map_batches step: image URIs -> their bytes (`reads` GETs in flight) -> eval-transformed patches.
    A file that cannot be read keeps its row, with the reason, as an undecodable one does."""
    uris = list(batch["image_uri"])

    def get(uri):
        try:
            return storage.read_bytes(uri), ""
        except (storage.StorageError, OSError) as e:
            return b"", f"cannot read ({e})"

    with ThreadPoolExecutor(max(1, min(reads, len(uris)))) as pool:
        got = list(pool.map(get, uris))
    out = preprocess({"image_uri": batch["image_uri"], "label_id": batch["label_id"],
                      "bytes": np.asarray([b for b, _ in got], dtype=object)}, transform)
    for i, (_, err) in enumerate(got):
        if err:
            out["error"][i] = err
    return out


def _shard_rows(batch: dict) -> dict:
    from .data import _image_column, _labels

    if "label" not in batch:
        batch["label"] = batch["cls"]
    images = _image_column(batch)
    urls = batch.get("__url__", [""] * len(images))
    keys = batch.get("__key__", batch.get("key"))
    return {"image_uri": np.asarray([f"s3://{u}#{k}" if not str(u).startswith("/") else f"{u}#{k}" for u, k in zip(urls, keys)], dtype=object),
            "bytes": np.asarray([b if b is not None else b"" for b in images], dtype=object), "label_id": _labels(batch)}


def summarize_staged(staged: list[str], class_names: list[str]) -> dict:
    """Rows, error count and accuracy of a staged run, from its small columns only."""
    tables = [publish.read_parquet(u, ["label_id", "pred_id", "topk_ids", "error"]) for u in staged]
    rows = sum(t.num_rows for t in tables)
    errors = sum(t.num_rows - t.column("error").null_count for t in tables)
    return {"rows": rows, "errors": errors, "accuracy": accuracy_summary(pa.concat_tables(tables) if tables else None, class_names)}


def accuracy_summary(table: pa.Table | None, class_names: list[str]) -> dict | None:
    """Top-1, top-5 and per-class accuracy over the rows with a known label and a prediction."""
    if table is None:
        return None
    d = table.to_pydict()
    rows = [(l, p, k) for l, p, k in zip(d["label_id"], d["pred_id"], d["topk_ids"]) if l is not None and p is not None]
    if not rows:
        return None
    per = {}
    for l, p, _ in rows:
        c = per.setdefault(class_names[l] if l < len(class_names) else str(l), [0, 0])
        c[0] += int(l == p)
        c[1] += 1
    return {"count": len(rows), "top1": sum(l == p for l, p, _ in rows) / len(rows),
            "top5": sum(l in k[:5] for l, _, k in rows) / len(rows),
            "per_class": {c: {"top1": a / n, "count": n} for c, (a, n) in sorted(per.items())}}


class _Stages:
    """Wall seconds per stage of the job, for the summary line."""

    def __init__(self):
        self.t0, self.s = time.time(), {}

    @contextmanager
    def __call__(self, name: str):
        t = time.time()
        yield
        self.s[name] = round(self.s.get(name, 0.0) + time.time() - t, 3)


def _list_and_state(cfg: InferConfig, info: dict, layout: publish.Layout):
    """(inputs, kind, inputs already done or None, seconds it took)."""
    t = time.time()
    inputs, kind = list_inputs(cfg, info["class_names"])
    done = publish.done_inputs(layout, info["weights_sha256"], cfg.retry_errors) if cfg.since_last_run else None
    return inputs, kind, done, time.time() - t


def run(cfg: InferConfig) -> dict:
    """The whole job. Raises LeaseHeld (nothing touched), ErrorRateExceeded (nothing published),
    StorageError / ValueError (bad input, before any prediction)."""
    stages = _Stages()
    with stages("preflight"):
        info = preflight(cfg)
    layout = publish.Layout.of(cfg.output)
    started = dt.datetime.now(dt.timezone.utc)
    run_id = cfg.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    result = {"run_id": run_id, "rows": 0, "inputs": 0, "errors": 0, "output": None, "images_per_s": 0.0,
              "accuracy_full": None, "model_sha256": info["weights_sha256"], "already_done": 0}
    with Lease(cfg.output, run_id, cfg.lease_ttl_s) as lease:
        with stages("recover"):
            result["recovered"] = publish.recover(layout, lease)
        # Listing (and the --since-last-run state) runs in a thread while this one connects to Ray: on a large
        # prefix the listing takes as long as the start-up. The weights go to the object store only when
        # there is something to predict.
        with ThreadPoolExecutor(1) as pool:
            listing = pool.submit(_list_and_state, cfg, info, layout)
            with stages("connect"):
                from .ray_cluster import connect

                connect(log_to_driver=True)
            info["inputs"], info["kind"], done, listed_s = listing.result()
        stages.s["list"] = round(listed_s, 3)  # beside "connect", not after it
        if cfg.since_last_run:
            before = len(info["inputs"])
            info["inputs"] = [x for x in info["inputs"] if x[0] not in done]
            result["already_done"] = before - len(info["inputs"])
            print(f"since last run: {result['already_done']} of {before} inputs already predicted with this model", flush=True)
        if cfg.limit and info["kind"] != "shards":
            info["inputs"] = info["inputs"][: cfg.limit]
        if not info["inputs"]:
            return {**result, "elapsed_s": time.time() - stages.t0, "timings_s": stages.s}
        try:
            with stages("predict"):
                staged = predict_to_staging(cfg, info, run_id, started)
            summary = summarize_staged(staged, info["class_names"])
            n_inputs = summary["rows"] if info["kind"] == "shards" else len(info["inputs"])
            if summary["rows"] != n_inputs:
                raise RuntimeError(f"run {run_id} produced {summary['rows']} rows for {n_inputs} inputs: not publishing it")
            if cfg.max_error_rate is not None and summary["errors"] > cfg.max_error_rate * n_inputs:
                raise ErrorRateExceeded(f"{summary['errors']} of {n_inputs} inputs could not be predicted, more than "
                                        f"--max-error-rate {cfg.max_error_rate}: run {run_id} is not published "
                                        "(the error rows name each input and its reason in the job log)")
        except BaseException:
            storage.delete(layout.staging(run_id).uri, recursive=True)  # nothing of this run is committed
            raise
        acc = summary["accuracy"]
        intent = publish.plan_commit(
            layout, run_id, f"{started:%Y-%m-%d}", staged, accuracy_report=acc, ledger=info["kind"] != "shards",
            rows=summary["rows"], inputs=n_inputs, errors=summary["errors"], model_uri=cfg.model,
            model_sha256=info["weights_sha256"], input=cfg.input, started_at=started.isoformat(), timings_s=stages.s,
            operator_s=info.get("operator_s", {}), startup_s=info.get("startup_s", {}),
            accuracy=acc and {k: acc[k] for k in ("top1", "top5", "count")})
        with stages("publish"):
            publish.commit(layout, intent, lease)
    return {**result, **intent["success"], "output": intent["run_dir"], "accuracy_full": acc,
            "elapsed_s": time.time() - stages.t0, "images_per_s": n_inputs / max(stages.s["predict"], 1e-9), "timings_s": stages.s,
            "operator_s": info.get("operator_s", {}), "startup_s": info.get("startup_s", {})}


def print_summary(r: dict) -> None:
    lines = ["=" * 64, f"run          {r['run_id']}",
             f"images       {r['inputs']} ({r['errors']} errors)   {r['images_per_s']:.1f} images/s   {r['elapsed_s']:.1f} s",
             f"predictions  {r['output'] or 'nothing new to predict'}"]
    if r.get("already_done"):
        lines.append(f"skipped      {r['already_done']} inputs already predicted with this model")
    if r.get("recovered"):
        lines.append(f"recovered    finished the commit of crashed run(s) {', '.join(r['recovered'])}")
    acc = r.get("accuracy_full")
    if acc:
        lines.append(f"accuracy     top-1 {acc['top1'] * 100:.2f}%  top-5 {acc['top5'] * 100:.2f}%  over {acc['count']} labelled images")
        worst = sorted(acc["per_class"].items(), key=lambda kv: kv[1]["top1"])[:3]
        lines.append("lowest       " + ", ".join(f"{c} {v['top1'] * 100:.0f}%" for c, v in worst))
    lines.append("stages       " + "  ".join(f"{k} {v:.1f} s" for k, v in r.get("timings_s", {}).items()))
    first = r.get("startup_s") or {}
    if first or r.get("operator_s"):
        lines.append("in predict   " + "  ".join(
            ([f"first batch {first['first_batch']:.1f} s (replica ready {first['replica_ready']:.1f} s, model load "
              f"{first['model_load']:.1f} s)"] if first else [])
            + [f"{k} {v:.1f} task-s" for k, v in r.get("operator_s", {}).items()]))
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)
