"""Where a training loop's batches come from and where its reports and checkpoints go.

`RaySession`: inside Ray Train's `TorchTrainer` (each worker reads its part of a split through Ray Data,
`ray.train.report`, checkpoints in the run's storage, DDP). `LocalSession`: no Ray, batches from a callable,
checkpoints into a local folder (tests, benchmarks, recipe search). `Batches` puts one epoch's numpy
batches on the device; `PrefetchedEpoch` starts an epoch's stream in a thread while the previous epoch
evaluates.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.core.runs import RunLayout
from pipeline.training.train_config import PretrainConfig


@dataclass
class Batches:
    """One epoch of (patches uint8 (B, N, P*P*C), labels int64 (B,), valid bool (B,)) on the device."""

    source: Iterable[dict]
    device: torch.device
    keys: list | None = None  # when a list: each batch's sample keys are appended (train.record_keys)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        nb = self.device.type == "cuda"
        for b in self.source:
            if self.keys is not None:
                self.keys.extend(str(k) for k in b["key"])
            with warnings.catch_warnings():  # Ray's batches are read-only views; we never write to them
                warnings.simplefilter("ignore", UserWarning)
                patches = torch.as_tensor(b["patches"])
                labels = torch.as_tensor(b["label"])
            valid = torch.as_tensor(b["valid"]) if "valid" in b else torch.ones(len(labels), dtype=torch.bool)
            if nb:  # pinned host memory -> overlapped copy
                patches, labels, valid = (
                    t.pin_memory().to(self.device, non_blocking=True) for t in (patches, labels, valid)
                )
            yield patches, labels, valid


class PrefetchedEpoch:
    """An epoch's batch iterator whose stream is started, and its first batch taken, in a background
    thread: built while the previous epoch evaluates and checkpoints, so that the stream's start-up
    (1.3-1.7 s for a Ray Data execution here) overlaps them instead of stalling the next epoch's first step."""

    def __init__(self, make: Callable[[], Iterable]):
        self._it, self._first, self._error = None, [], None
        self._thread = threading.Thread(target=self._start, args=(make,), daemon=True, name="next-epoch-stream")
        self._thread.start()

    def _start(self, make):
        try:
            self._it = iter(make())
            self._first = [next(self._it)]
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001 - raised where the batches are taken
            self._error = e

    def __iter__(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        if self._it is not None:
            yield from self._it


# ---- sessions ------------------------------------------------------------------------------
class Session:
    world_size = 1
    rank = 0
    device = torch.device("cpu")
    cpu_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    eval_sets: tuple[str, ...] = ()  # the names besides the training split that batches() serves (k-NN sets)
    # batches() reads exactly the `ranges` it is given (RaySession); a LocalSession's callable is the caller's own
    # epoch, so the loop cannot hold it to the order's count
    reads_positions = False

    def batches(self, split: str, batch_size: int, epoch: int, train: bool, ranges=None) -> Iterable[dict]:
        """One epoch of `split` in batches (numpy dicts); `ranges`: this rank's positions of the training epoch's
        order (`order.split`), None for an eval set (this rank's share of it)."""
        raise NotImplementedError

    def checkpoints(self) -> list[str]:
        """URIs of this run's checkpoints, newest first."""
        return []

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Report metrics (and hand over a local checkpoint folder, which the session removes)."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (small JSON-like values: which checkpoint to load)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)  # the worker group's process group (gloo on CPU, NCCL on GPU)
        return box[0]


class RaySession(Session):
    """Inside `TorchTrainer`: each worker reads its part of a split through Ray Data tasks it starts itself
    (`streams.ordered_stream`), reports with `ray.train.report`, checkpoints into the run's storage."""

    def __init__(self, cfg: PretrainConfig, manifest, train_stream, eval_stream, eval_sets: dict):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world_size, self.rank = ctx.get_world_size(), ctx.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.cfg = cfg
        self.manifest = manifest  # the version the run trains on: this worker reads its part of it
        self.train_stream, self.eval_stream = train_stream, eval_stream  # StreamConfigs: decode, augment, patchify
        self.sets = eval_sets  # {name: (Manifest, split)}: what the objective's monitor reads
        self.eval_sets = tuple(eval_sets)
        self.reads_positions = True
        # Ray sets OMP_NUM_THREADS=1 in a worker unless told otherwise; compute with the slots it holds.
        self.cpu_threads = max(1, int(cfg.train.cpus_per_worker))
        os.environ["OMP_NUM_THREADS"] = str(self.cpu_threads)
        self._uploads: list[dict] = []  # filled by the upload thread: {"dir", "start", "end"}
        self._returned: dict[str, float] = {}  # checkpoint dir -> when report() gave control back

    def batches(self, split, batch_size, epoch, train, ranges=None):
        """The training split: `ranges` of this epoch's order, augmented. An eval set: this rank's equal share
        of it, unaugmented, in a fixed order (seed 0, epoch 0), so every epoch judges the same images."""
        from pipeline.data import order
        from pipeline.data.streams import configure_ray_data, ordered_stream

        d = self.cfg.data
        if ranges is None:
            manifest, split = self.sets[split]
            ranges, seed, epoch, stream = (
                order.share(manifest.count(split), self.world_size, self.rank),
                0,
                0,
                self.eval_stream,
            )
        else:
            manifest, seed, stream = self.manifest, d.shuffle_seed, self.train_stream
        if not order.total(ranges):
            return iter(())
        configure_ray_data(progress=False)
        ds = ordered_stream(
            manifest, split, stream, seed=seed, epoch=epoch, ranges=ranges, window_shards=d.window_shards
        )
        return ds.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=d.prefetch_batches, drop_last=False
        )

    def checkpoints(self):
        return RunLayout.of(self.cfg.train.output, self.cfg.train.name).checkpoints()

    def _upload(self, checkpoint, dir_name: str):
        """Ray's upload step, timed: the same copy into the run's storage that Ray does by default."""
        import pyarrow.fs as pafs
        import ray.train

        st = ray.train.get_context().get_storage()
        dest = posixpath.join(st.experiment_fs_path, dir_name)
        start = time.time()
        pafs.copy_files(
            checkpoint.path, dest, source_filesystem=checkpoint.filesystem, destination_filesystem=st.storage_filesystem
        )
        self._uploads.append({"dir": checkpoint.path, "start": start, "end": time.time()})
        return ray.train.Checkpoint(dest, filesystem=st.storage_filesystem)

    def _upload_timings(self) -> dict:
        """For the uploads that ended: how long they took, and how long training ran beside them."""
        out = {}
        for u in [u for u in self._uploads if u["dir"] in self._returned]:
            self._uploads.remove(u)
            out = {
                "checkpoint_upload_s": u["end"] - u["start"],
                "checkpoint_overlap_s": u["end"] - self._returned.pop(u["dir"]),
            }
        return out

    def report(self, metrics, checkpoint_dir):
        import ray.train

        metrics = {**metrics, **self._upload_timings()}
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        mode = ray.train.CheckpointUploadMode[self.cfg.train.checkpoint_upload.upper()]
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_upload_mode=mode,
            delete_local_checkpoint_after_upload=True,
            checkpoint_upload_fn=self._upload,
        )
        self._returned[str(checkpoint_dir)] = time.time()

    def prepare(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # device placement + DDP (NCCL on GPU, gloo on CPU)


@dataclass
class LocalSession(Session):
    """No Ray: batches from callables, checkpoints into `checkpoint_root/checkpoint_<step, 9 digits>/` (the
    newest `keep` kept)."""

    batch_fn: Callable[[str, int, int, bool], Iterable[dict]]
    checkpoint_root: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    reports: list = field(default_factory=list)
    keep: int = 2

    def batches(self, split, batch_size, epoch, train, ranges=None):
        return self.batch_fn(split, batch_size, epoch, train)

    def checkpoints(self):
        if not self.checkpoint_root or not self.checkpoint_root.exists():
            return []
        return [str(p) for p in sorted(self.checkpoint_root.glob("checkpoint_*"), reverse=True)]

    def report(self, metrics, checkpoint_dir):
        self.reports.append(metrics)
        if checkpoint_dir is None:
            return
        if self.checkpoint_root:
            shutil.copytree(
                checkpoint_dir, self.checkpoint_root / f"checkpoint_{metrics['step']:09d}", dirs_exist_ok=True
            )
            for old in self.checkpoints()[self.keep :]:
                shutil.rmtree(old)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
