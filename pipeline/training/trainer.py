"""The pretraining driver: validate, build the Ray Data streams and the TorchTrainer, run, summarise.

What it writes under `{train.output}/{train.name}/` (config.yaml, data.json, checkpoints, model/, best/,
metrics/, tensorboard/) is `pipeline.core.runs.RunLayout`'s to say; this module only asks it. What the
objective needs (labels, the model it trains, the splits its monitor reads) it asks `objectives/`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import vit_model
from pipeline.core import exported, ray_runtime, storage
from pipeline.core.config import to_yaml
from pipeline.core.exits import EXIT_BAD_INPUT
from pipeline.core.runs import RunLayout
from pipeline.data.manifest import Manifest, claim_version, load_manifest, release_version
from pipeline.training.objectives import objective_for
from pipeline.training.train_config import PretrainConfig


class JobError(RuntimeError):
    """A problem found before any cluster work: the message says what to change."""

    exit_code = EXIT_BAD_INPUT


def run_layout(cfg: PretrainConfig) -> RunLayout:
    return RunLayout.of(cfg.train.output, cfg.train.name)


@dataclass(frozen=True)
class RunPlan:
    """What the driver checked before any cluster work: the shard version to train on, the model, and the
    sets the objective's monitor reads."""

    manifest: Manifest  # the version this run trains on (pinned in data.json on resume)
    num_classes: int
    train_count: int  # samples in the train split
    model_cfg: vit_model.ViTConfig  # the plain ViT the objective trains
    eval_sets: dict  # {name: (Manifest, split)}: val, and e.g. MAE's k-NN bank and queries


def preflight(cfg: PretrainConfig) -> RunPlan:
    """Every check that needs no cluster: output reachable, manifest readable and non-empty, weights fit."""
    if not cfg.data.manifest:
        raise JobError("no data: pass --data s3://bucket/prefix/manifest.json (or set data.manifest in the config)")
    if not cfg.train.output:
        raise JobError("no output: pass --output s3://bucket/runs or a local folder (train.output)")
    storage.check_bucket(cfg.train.output)
    manifest = pinned_manifest(cfg) or load_manifest(cfg.data.manifest)
    objective = objective_for(cfg)
    if not manifest.labeled and objective.needs_labels:
        raise JobError(
            f"{cfg.data.manifest} is an unlabeled shard set: train.objective {objective.name} needs labels. Make "
            "shards from class folders or with --labels, or pretrain without labels: --objective mae"
        )
    if manifest.count(cfg.data.train_split) == 0:
        why = ", ".join(f"{n} {k}" for k, n in manifest.skip_counts.items())
        raise JobError(
            f"the manifest {cfg.data.manifest} has 0 samples in split {cfg.data.train_split!r}: nothing to train on"
            + (f" (make_shards skipped {len(manifest.skipped)} inputs: {why})" if manifest.skipped else "")
        )
    if cfg.data.val_split and manifest.count(cfg.data.val_split) == 0:
        raise JobError(
            f"the manifest has no samples in the val split {cfg.data.val_split!r}: set data.val_split to null or make "
            "shards with --val-fraction > 0"
        )
    train_count = manifest.count(cfg.data.train_split)
    if train_count // cfg.train.batch_size < 1:
        raise JobError(
            f"{train_count} training samples do not fill one global batch of {cfg.train.batch_size}: lower --batch-size"
        )
    num_classes = objective.num_classes(manifest.classes)
    # The architecture from the config alone catches img/patch mismatches; with --init-from, one CPU
    # copy of the model is built and loaded here, so bad weights fail before any cluster work.
    try:
        mcfg = objective.model_config(num_classes)
    except ValueError as e:
        raise JobError(f"model: {e}") from None
    if cfg.train.init_from:
        try:
            exported.load_init_weights(vit_model.VisionTransformer(mcfg), cfg.train.init_from)
        except (ValueError, storage.StorageError) as e:
            raise JobError(f"--init-from {cfg.train.init_from}: {e}") from None
    try:
        eval_sets = objective.eval_sets(manifest, load_manifest)
    except (ValueError, storage.StorageError) as e:
        raise JobError(str(e)) from None
    return RunPlan(manifest, num_classes, train_count, mcfg, eval_sets)


def pinned_manifest(cfg: PretrainConfig) -> Manifest | None:
    """A resumed run reads the shard version it started on, not whatever `manifest.json` names today
    (make_shards may have written a new version since, with other samples or classes)."""
    pin = run_layout(cfg).data_pin
    if not storage.exists(pin.uri):
        return None
    rec = json.loads(storage.read_bytes(pin.uri))
    try:
        return load_manifest(rec["manifest"])
    except storage.StorageError:
        raise JobError(
            f"this run started on shard version {rec.get('version')} ({rec['manifest']}), which is gone (pruned?): "
            "resume needs the same data; start a new --name to train on the current version"
        ) from None


def pin_data(cfg: PretrainConfig, manifest: Manifest) -> None:
    """Pin the version in the run (data.json) and claim it in the shard set, so `--keep-versions` keeps it
    until the run finishes (`release_version`)."""
    layout = run_layout(cfg)
    claim_version(manifest, layout.uri)
    if storage.exists(layout.data_pin.uri):
        return
    uri = manifest.uri if manifest.layout >= 2 else cfg.data.manifest
    storage.write_bytes(layout.data_pin.uri, json.dumps({"manifest": uri, "version": manifest.version}).encode())


def check_cluster_fits(cfg: PretrainConfig) -> None:
    """Refuse a job that can never be scheduled: training workers plus at least one CPU slot for Ray
    Data (without it the stream starves forever), against what the cluster can grow to."""
    from pipeline.core.ray_runtime import capacity, check_fits

    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker + 1, **({"GPU": float(t.num_workers)} if t.use_gpu else {})}
    problem = check_fits(need, capacity(), {"CPU": t.max_cluster_cpus, "GPU": t.max_cluster_gpus})
    if problem:
        raise JobError(
            f"{problem} ({t.num_workers} training workers x {t.cpus_per_worker:g} CPU, plus 1 for Ray Data to decode "
            "images). Lower train.num_workers or train.cpus_per_worker (e.g. 0.5), or let the cluster grow (more "
            "max workers; locally the stack uses 2 x cores slots)"
        )


class MetricsSink:
    """The run's metrics (`metrics/*.jsonl`) and TensorBoard events under the run folder.

    Lives in a Ray Train callback, which runs in the Train controller (any node): it writes straight to
    the run's storage, one new object per flush (`<first step>-<ns>.jsonl`), never rewriting what is
    there, so a 3-day run uploads each line once. A resumed run reports `start_step` S: rows of steps
    after S, written by the attempt that died before its next checkpoint, are removed first (only the
    newest objects hold them), so every step is in the table once. TensorBoard events are written at each
    flush into a temporary folder that is uploaded and removed at once (one small event file per flush;
    TensorBoard reads them as one run), so nothing stays on the node.
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.layout = run_layout(cfg)
        self.unflushed: list[dict] = []
        self.rewound_to: int | None = None
        self.mlflow = None

    def add(self, metrics: dict, flush: bool) -> None:
        start = metrics.get("start_step")
        if start is not None and start != self.rewound_to:
            self._rewind(int(start))
            self.rewound_to = start
        self.unflushed.append(metrics)
        if self.cfg.train.mlflow_tracking_uri:
            import mlflow

            if self.mlflow is None:
                mlflow.set_tracking_uri(self.cfg.train.mlflow_tracking_uri)
                self.mlflow = mlflow.start_run(run_name=self.cfg.train.name)
            mlflow.log_metrics(metrics, step=int(metrics.get("step", 0)))
        if flush or len(self.unflushed) >= 20:
            self.flush()

    def _rewind(self, start: int) -> None:
        """Drop reports of steps after `start` (the checkpoint this attempt resumed from)."""
        self.unflushed = [m for m in self.unflushed if m.get("step", 0) <= start]
        for uri in reversed(self.layout.metric_objects()):
            rows = [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip()]
            keep = [r for r in rows if r.get("step", 0) <= start]
            if len(keep) == len(rows):
                break  # older objects hold earlier steps only
            if keep:
                storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in keep).encode())
            else:
                storage.delete(uri)

    def flush(self) -> None:
        if not self.unflushed:
            return
        name = f"{int(self.unflushed[0].get('step', 0)):012d}-{time.time_ns():020d}.jsonl"
        data = "".join(json.dumps(m) + "\n" for m in self.unflushed).encode()
        storage.write_bytes(self.layout.metrics_dir.join(name).uri, data)
        self._tensorboard(self.unflushed)
        self.unflushed = []

    def _tensorboard(self, metrics: list[dict]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but the metrics/ objects are what matters
            return
        tmp = tempfile.mkdtemp(prefix="vitray-tb-")
        try:
            writer = SummaryWriter(tmp)
            for m in metrics:
                for k, v in m.items():
                    writer.add_scalar(k, v, int(m.get("step", 0)))
            writer.close()
            for name in os.listdir(tmp):
                storage.upload_file(os.path.join(tmp, name), run_layout(self.cfg).tensorboard.join(name).uri)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _callbacks(cfg: PretrainConfig):
    from ray.train import UserCallback

    class MetricsCallback(UserCallback):
        def __init__(self):
            self.sink = MetricsSink(cfg)

        def after_report(self, run_context, metrics, checkpoint):
            # rank 0's metrics; validation metrics are already reduced across workers
            self.sink.add(
                {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}, flush=checkpoint is not None
            )

    return [MetricsCallback()]


def run(cfg: PretrainConfig) -> dict:
    """Preflight, then train on the Ray cluster at RAY_ADDRESS (or a local one)."""
    pre = preflight(cfg)
    from pipeline.core.ray_runtime import connect

    connect(log_to_driver=True)  # before Ray is imported: a job-local Ray needs its token settings first
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.data.streams import StreamConfig, configure_ray_data
    from pipeline.data.transforms import Augment
    from pipeline.training.loop import train_loop_per_worker

    check_cluster_fits(cfg)
    configure_ray_data(cfg.data.object_store_fraction)
    layout = run_layout(cfg)
    storage.write_bytes(layout.config.uri, to_yaml(cfg).encode())
    pin_data(cfg, pre.manifest)
    d = cfg.data
    # Every worker reads its own part of each split through Ray Data tasks it starts (`streams.ordered_stream`):
    # the training epoch's order, and an equal share of each eval set.
    train_stream = StreamConfig.for_model(pre.model_cfg, True, Augment.of(d), num_cpus=d.decode_cpus)
    eval_stream = StreamConfig.for_model(pre.model_cfg, False, num_cpus=d.decode_cpus)
    storage_path, fs = ray_runtime.train_storage_path(cfg.train.output)
    # Ray Train V2 propagates this from the driver to its controller; a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(cfg.train.controller_poll_s))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump_json(),
            "num_classes": pre.num_classes,
            "train_count": pre.train_count,
            "class_names": [] if pre.num_classes == 0 else pre.manifest.classes,
            "manifest": pre.manifest,  # the version this run started on (pinned in data.json), not re-read
            "train_stream": train_stream,
            "eval_stream": eval_stream,
            "eval_sets": pre.eval_sets,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})},
            placement_strategy="SPREAD" if not cfg.train.use_gpu else "PACK",
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=_callbacks(cfg),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    elapsed = time.time() - t0
    if result.error:
        raise result.error
    release_version(pre.manifest, layout.uri)  # finished: nothing will resume on this version
    m = result.metrics or {}
    summary = {
        "run": layout.uri,
        "best_val_top1": max((m.get("val_top1", -1) for m in layout.read_metrics()), default=None),
        "val_top1": m.get("val_top1"),
        "objective": cfg.train.objective,
        "knn_top1": m.get("knn_top1"),
        "val_loss": m.get("val_loss"),
        "step": m.get("step"),
        "elapsed_s": elapsed,
        "images_per_s": m.get("images_per_s"),
        "model": layout.model.uri,
        "best_model": layout.best.uri
        if objective_for(cfg).exports_best
        else f"none (a {cfg.train.objective} run exports model/ only)",
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    return summary


def print_summary(s: dict) -> None:
    pct = lambda v: f"{v * 100:.2f}%" if isinstance(v, (int, float)) and v >= 0 else "n/a"  # noqa: E731
    ips = f"{s['images_per_s']:.1f}" if s.get("images_per_s") else "n/a"
    print(
        "\n".join(
            [
                "=" * 64,
                f"run          {s['run']}",
                f"best val top-1 {pct(s['best_val_top1'])}   last val top-1 {pct(s['val_top1'])}"
                if s.get("val_top1") is not None
                else f"{s.get('objective')}: last k-NN top-1 {pct(s.get('knn_top1'))}   val loss {s.get('val_loss')}",
                f"steps        {s['step']}   time {s['elapsed_s'] / 60:.1f} min   images/s {ips}",
                f"model        {s['model']}",
                f"best model   {s['best_model']}",
                f"checkpoint   {s['checkpoint']}",
                "=" * 64,
            ]
        ),
        flush=True,
    )
