"""Batch inference with Ray Data: images in object storage -> predictions as published Parquet runs.

    list inputs (minus those already predicted, with --since-last-run)
      -> read_binary_files -> decode + eval crop + patchify      (CPU tasks)
      -> Predictor in an actor pool (model loaded once per replica; GPU + bf16 when asked)
      -> write_parquet to  {output}/_staging/run={run_id}/        (ignored by Hive-style readers)
      -> publish to        {output}/dt={date}/run={run_id}/part-*.parquet, accuracy.json, then _SUCCESS

A run is published when its `_SUCCESS` exists; `read_published` reads only such runs. The state
for `--since-last-run` is the `image_uri` column of the published runs of the same model weights,
so across any sequence of runs and crashes each input gets exactly one published prediction.
One writer per output prefix at a time (a scheduler's concurrency policy: Forbid).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import posixpath
import time
import uuid

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from . import storage
from .config import Section
from .shards import MANIFEST, load_manifest, shard_uris

log = logging.getLogger(__name__)
SUCCESS = "_SUCCESS"
STAGING = "_staging"


class InferConfig(Section):
    model: str | None = Field(None, description="exported model folder URI (model.safetensors + config.json)")
    input: str | None = Field(None, description="images: S3 prefix or folder, a class-folder tree, or a shards manifest")
    output: str | None = Field(None, description="where prediction runs are published (S3 prefix or folder)")
    batch_size: int = Field(64, ge=1, description="images per model call")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (0: CPU)")
    replicas: tuple[int, int] = Field((1, 2), description="model replicas min,max (actor pool autoscaling)")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPU slots per model replica")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs per decode task")
    top_k: int = Field(5, ge=1, description="classes kept per image")
    embeddings: bool = Field(False, description="also write the pooled representation")
    since_last_run: bool = Field(False, description="skip inputs that a published run already predicted with this model")
    limit: int | None = Field(None, ge=1, description="at most this many (new) inputs")
    split: str | None = Field(None, description="shards input: only this split (default: all)")
    run_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", description="run id (default: UTC time + random)")

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
    "limit": "limit",
}


def output_schema(top_k: int, embedding_dim: int | None) -> pa.Schema:
    fields = [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("label_id", pa.int64()),  # the known label, when the input has one
        pa.field("label", pa.string()),
        pa.field("pred_id", pa.int64()),
        pa.field("pred", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("topk_ids", pa.list_(pa.int64())),
        pa.field("topk_scores", pa.list_(pa.float32())),
    ]
    if embedding_dim:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
    fields += [
        pa.field("error", pa.string()),
        pa.field("model_uri", pa.string(), nullable=False),
        pa.field("model_sha256", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("inferred_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    return pa.schema(fields)


# ---- model -------------------------------------------------------------------------------------
def load_model_bytes(uri: str) -> tuple[bytes, bytes]:
    loc = storage.parse_uri(uri)
    try:
        config = storage.read_bytes(loc.join("config.json").uri)
        weights = storage.read_bytes(loc.join("model.safetensors").uri)
    except storage.StorageError as e:
        raise storage.StorageError(f"no exported model at {loc.uri} (expected model.safetensors + config.json): {e}") from None
    return weights, config


class Predictor:
    """One model replica: loads the weights once, then maps patch batches to prediction rows."""

    def __init__(self, model_uri: str, top_k: int, embeddings: bool, run_id: str, inferred_at: dt.datetime, use_gpu: bool):
        import torch

        import vit_model

        weights, config = load_model_bytes(model_uri)
        self.model, meta = vit_model.model_from_bytes(weights, config)
        self.class_names = meta.get("class_names") or [str(i) for i in range(self.model.cfg.num_classes)]
        self.sha = hashlib.sha256(weights).hexdigest()
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.amp = torch.bfloat16 if self.device.type == "cuda" else None
        self.k = min(top_k, self.model.cfg.num_classes)
        self.embeddings, self.model_uri, self.run_id, self.inferred_at = embeddings, model_uri, run_id, inferred_at
        self.schema = output_schema(self.k, self.model.cfg.embed_dim if embeddings else None)

    def __call__(self, batch: dict) -> pa.Table:
        import torch

        n = len(batch["image_uri"])
        valid = np.asarray(batch["valid"], bool)
        cols: dict[str, list] = {"pred_id": [None] * n, "pred": [None] * n, "score": [None] * n,
                                 "topk_ids": [None] * n, "topk_scores": [None] * n}
        if self.embeddings:
            cols["embedding"] = [None] * n
        idx = np.flatnonzero(valid)
        if len(idx):
            x = torch.from_numpy(np.ascontiguousarray(batch["patches"][idx])).to(self.device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                feats = self.model.forward_features(x)
                probs = self.model.forward_head(feats).float().softmax(-1)
            scores, ids = probs.topk(self.k, dim=-1)
            scores, ids, feats = scores.cpu().numpy(), ids.cpu().numpy(), feats.float().cpu().numpy()
            for j, i in enumerate(idx):
                cols["pred_id"][i] = int(ids[j, 0])
                cols["pred"][i] = self.class_names[ids[j, 0]]
                cols["score"][i] = float(scores[j, 0])
                cols["topk_ids"][i] = ids[j].tolist()
                cols["topk_scores"][i] = scores[j].tolist()
                if self.embeddings:
                    cols["embedding"][i] = feats[j].tolist()
        label_id = [int(v) if v >= 0 else None for v in batch["label_id"]]
        label = [self.class_names[v] if v is not None and v < len(self.class_names) else None for v in label_id]
        errors = [e if e else None for e in batch["error"]]
        data = {"image_uri": list(batch["image_uri"]), "label_id": label_id, "label": label, **cols, "error": errors,
                "model_uri": [self.model_uri] * n, "model_sha256": [self.sha] * n, "run_id": [self.run_id] * n,
                "inferred_at": [self.inferred_at] * n}
        return pa.table({f.name: pa.array(data[f.name], f.type) for f in self.schema}, schema=self.schema)


def preprocess(batch: dict, img_size: int, patch_size: int) -> dict:
    """Encoded images -> eval-transformed patches; undecodable inputs keep their row with the reason."""
    from .transforms import ImageDecodeError, ImageTransform

    transform = ImageTransform(img_size, patch_size, train=False)
    n = len(batch["image_uri"])
    patches = np.zeros((n, (img_size // patch_size) ** 2, patch_size * patch_size * 3), np.uint8)
    valid = np.zeros(n, bool)
    errors = [""] * n
    for i, data in enumerate(batch["bytes"]):
        try:
            patches[i] = transform(bytes(data), None)
            valid[i] = True
        except ImageDecodeError as e:
            errors[i] = str(e)
            log.warning("cannot predict %s: %s", batch["image_uri"][i], e)
    return {"image_uri": batch["image_uri"], "label_id": batch["label_id"], "patches": patches, "valid": valid,
            "error": np.asarray(errors, dtype=object)}


# ---- inputs ------------------------------------------------------------------------------------
def list_inputs(cfg: InferConfig, class_names: list[str]) -> tuple[list[tuple[str, int]], str]:
    """[(image_uri, known label id or -1)], and the kind of input ("images", "class-tree", "shards")."""
    loc = storage.parse_uri(cfg.input)
    if loc.uri.endswith(".json") or storage.exists(loc.join(MANIFEST).uri):
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


def published_runs(output: str) -> list[dict]:
    """The `_SUCCESS` manifests of every published run under `output`, oldest first."""
    out = storage.parse_uri(output)
    runs = []
    for f in storage.list_files(out.uri):
        if posixpath.basename(f.path) == SUCCESS and f"/{STAGING}/" not in f.path:
            runs.append(json.loads(storage.read_bytes(storage.to_uri(out, f.path))))
    return sorted(runs, key=lambda r: r["run_id"])


def read_published(output: str, model_sha256: str | None = None) -> pa.Table:
    """Every published prediction (only runs with `_SUCCESS`), optionally of one model's weights."""
    import pyarrow.parquet as pq

    tables = []
    for run in published_runs(output):
        if model_sha256 and run["model_sha256"] != model_sha256:
            continue
        for uri in run["files"]:
            tables.append(pq.read_table(io.BytesIO(storage.read_bytes(uri))))
    if not tables:
        return pa.table({"image_uri": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default")


def _cleanup_unpublished(output: storage.Location) -> None:
    """Staging and half-copied run folders of crashed runs (no `_SUCCESS`) are removed."""
    published = {r["run_id"] for r in published_runs(output.uri)}
    leftovers = set()
    for f in storage.list_files(output.uri):
        for part in f.path.split("/"):
            if part.startswith("run=") and part[4:] not in published:
                leftovers.add(f.path[: f.path.index(part) + len(part)])
    for path in sorted(leftovers):
        log.warning("removing unpublished output of a crashed run: %s", path)
        storage.delete(storage.to_uri(output, path), recursive=True)


# ---- the job -----------------------------------------------------------------------------------
def preflight(cfg: InferConfig) -> dict:
    for name in ("model", "input", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    weights, config = load_model_bytes(cfg.model)
    meta = json.loads(config)
    storage.check_bucket(cfg.input)
    storage.check_bucket(cfg.output)
    out = storage.parse_uri(cfg.output)
    probe = out.join(STAGING, f".write-probe-{uuid.uuid4().hex[:8]}").uri
    try:
        storage.write_bytes(probe, b"")
    except storage.StorageError as e:
        raise storage.StorageError(f"cannot write to --output {out.uri}: {e}") from None
    storage.delete(probe)
    class_names = meta.get("class_names") or [str(i) for i in range(meta["model"]["num_classes"])]
    inputs, kind = list_inputs(cfg, class_names)
    return {"weights_sha256": hashlib.sha256(weights).hexdigest(), "meta": meta, "inputs": inputs, "kind": kind,
            "class_names": class_names}


def predict_to_staging(cfg: InferConfig, info: dict, run_id: str, started: dt.datetime) -> tuple[list[str], int]:
    """Run the Ray Data pipeline; returns (staged Parquet URIs, input count). Nothing is published."""
    import ray
    from ray.data import ActorPoolStrategy

    from .data import configure_ray_data, read_encoded

    configure_ray_data()
    mcfg = info["meta"]["model"]
    inputs = info["inputs"]
    if info["kind"] == "shards":
        manifest = load_manifest(cfg.input)
        splits = [s for s in manifest["splits"] if cfg.split in (None, s)]
        ds = None
        for s in splits:
            part = read_encoded(manifest, s).map_batches(_shard_rows, batch_format="numpy")
            ds = part if ds is None else ds.union(part)
    else:
        fs, _ = storage.resolve(inputs[0][0])
        labels = {storage.parse_uri(u).path: lab for u, lab in inputs}
        scheme = "s3://" if inputs[0][0].startswith("s3://") else ""
        # Images are small objects: a read task per ~64 of them, not one per file (per-block overhead).
        ds = ray.data.read_binary_files([storage.parse_uri(u).path for u, _ in inputs], filesystem=fs, include_paths=True,
                                        override_num_blocks=max(1, min(len(inputs) // 64, 1000)))
        ds = ds.map_batches(_file_rows, fn_kwargs={"labels": labels, "scheme": scheme}, batch_format="numpy")
    if cfg.limit and info["kind"] == "shards":
        ds = ds.limit(cfg.limit)
    ds = ds.map_batches(preprocess, fn_kwargs={"img_size": mcfg["img_size"], "patch_size": mcfg["patch_size"]},
                        batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.decode_cpus)
    ds = ds.map_batches(
        Predictor,
        fn_constructor_args=(cfg.model, cfg.top_k, cfg.embeddings, run_id, started, cfg.num_gpus > 0),
        compute=ActorPoolStrategy(min_size=cfg.replicas[0], max_size=cfg.replicas[1]),
        num_gpus=cfg.num_gpus, num_cpus=cfg.cpus_per_replica, batch_size=cfg.batch_size, batch_format="numpy",
    )
    staging = storage.parse_uri(cfg.output).join(STAGING, f"run={run_id}")
    fs, path = storage.resolve(staging.uri)
    ds.write_parquet(path, filesystem=fs)
    files = [storage.to_uri(staging, f.path) for f in storage.list_files(staging.uri) if f.path.endswith(".parquet")]
    return files, len(inputs)


def _file_rows(batch: dict, labels: dict, scheme: str) -> dict:
    paths = batch["path"]
    return {"image_uri": np.asarray([scheme + p for p in paths], dtype=object), "bytes": batch["bytes"],
            "label_id": np.asarray([labels.get(p, -1) for p in paths], np.int64)}


def _shard_rows(batch: dict) -> dict:
    from .data import _image_column, _labels

    if "label" not in batch:
        batch["label"] = batch["cls"]
    images = _image_column(batch)
    urls = batch.get("__url__", [""] * len(images))
    keys = batch.get("__key__", batch.get("key"))
    return {"image_uri": np.asarray([f"s3://{u}#{k}" if not str(u).startswith("/") else f"{u}#{k}" for u, k in zip(urls, keys)], dtype=object),
            "bytes": np.asarray([b if b is not None else b"" for b in images], dtype=object), "label_id": _labels(batch)}


def publish(cfg: InferConfig, info: dict, run_id: str, started: dt.datetime, staged: list[str], input_count: int,
            timings: dict) -> dict:
    """Move the staged files into `dt=/run=`, write the accuracy summary, then `_SUCCESS` (last)."""
    import pyarrow.parquet as pq

    out = storage.parse_uri(cfg.output)
    final = out.join(f"dt={started:%Y-%m-%d}", f"run={run_id}")
    files, rows, errors = [], 0, 0
    tables = []
    for i, uri in enumerate(sorted(staged)):
        dest = final.join(f"part-{i:05d}.parquet").uri
        storage.copy(uri, dest)
        table = pq.read_table(io.BytesIO(storage.read_bytes(dest)))
        tables.append(table.select(["label_id", "pred_id", "topk_ids", "error"]))
        rows += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        files.append(dest)
    if rows != input_count:
        raise RuntimeError(f"run {run_id} produced {rows} rows for {input_count} inputs: not publishing it")
    accuracy = accuracy_summary(pa.concat_tables(tables) if tables else None, info["class_names"])
    if accuracy:
        storage.write_bytes(final.join("accuracy.json").uri, json.dumps(accuracy, indent=2).encode())
    success = {"run_id": run_id, "rows": rows, "inputs": input_count, "errors": errors, "files": files,
               "model_uri": cfg.model, "model_sha256": info["weights_sha256"], "input": cfg.input,
               "started_at": started.isoformat(), "timings_s": timings, "accuracy": accuracy and {k: accuracy[k] for k in ("top1", "top5", "count")}}
    storage.write_bytes(final.join(SUCCESS).uri, json.dumps(success, indent=2).encode())
    for uri in staged:
        storage.delete(uri)
    return {**success, "output": final.uri, "accuracy_full": accuracy}


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


def run(cfg: InferConfig) -> dict:
    t0 = time.time()
    info = preflight(cfg)
    out = storage.parse_uri(cfg.output)
    if cfg.since_last_run:
        _cleanup_unpublished(out)
        done = set(read_published(out.uri, info["weights_sha256"]).column("image_uri").to_pylist())
        if info["kind"] == "shards":
            raise ValueError("--since-last-run works on image prefixes, not on shards (shards are immutable data sets)")
        before = len(info["inputs"])
        info["inputs"] = [x for x in info["inputs"] if x[0] not in done]
        print(f"since last run: {before - len(info['inputs'])} of {before} inputs already predicted with this model", flush=True)
    if cfg.limit and info["kind"] != "shards":
        info["inputs"] = info["inputs"][: cfg.limit]
    started = dt.datetime.now(dt.timezone.utc)
    run_id = cfg.run_id or f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    if not info["inputs"]:
        return {"run_id": run_id, "rows": 0, "inputs": 0, "errors": 0, "output": None, "elapsed_s": time.time() - t0,
                "images_per_s": 0.0, "accuracy_full": None}
    import ray

    if not ray.is_initialized():
        ray.init()
    t1 = time.time()
    staged, n_inputs = predict_to_staging(cfg, info, run_id, started)
    if info["kind"] == "shards":
        import pyarrow.parquet as pq

        n_inputs = sum(pq.read_metadata(io.BytesIO(storage.read_bytes(u))).num_rows for u in staged)
    t2 = time.time()
    result = publish(cfg, info, run_id, started, staged, n_inputs, {"predict": t2 - t1, "total": t2 - t0})
    result["elapsed_s"] = time.time() - t0
    result["images_per_s"] = n_inputs / max(t2 - t1, 1e-9)
    return result


def print_summary(r: dict) -> None:
    lines = ["=" * 64, f"run          {r['run_id']}",
             f"images       {r['inputs']} ({r['errors']} errors)   {r['images_per_s']:.1f} images/s   {r['elapsed_s']:.1f} s",
             f"predictions  {r['output'] or 'nothing new to predict'}"]
    acc = r.get("accuracy_full")
    if acc:
        lines.append(f"accuracy     top-1 {acc['top1'] * 100:.2f}%  top-5 {acc['top5'] * 100:.2f}%  over {acc['count']} labelled images")
        worst = sorted(acc["per_class"].items(), key=lambda kv: kv[1]["top1"])[:3]
        lines.append("lowest       " + ", ".join(f"{c} {v['top1'] * 100:.0f}%" for c, v in worst))
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)
