"""The per-worker training loop: a plain function that runs under Ray Train or without Ray.

    resume (newest checkpoint whose checksums verify)
    for each epoch:                                            train()
        for each optimizer step:                               optimizer_step()
            micro-batches: forward + backward (accumulated), clip, AdamW, EMA
            a progress report once `report_every_s` has passed (asked every `log_every_steps`)
        evaluate, export the best, checkpoint                  end_of_epoch()

`train_loop_per_worker(config)` is what `TorchTrainer` calls on every worker; `train(cfg, LocalSession(...))`
runs the same loop in-process (world size 1, no Ray) for tests and GPU benchmarks. The differences
live in a small Session: where batches come from, how metrics and checkpoints are reported, and
where earlier checkpoints are found.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import vit_model
from vit_model import VisionTransformer

from . import exported, storage
from .checkpointing import resume, save_checkpoint
from .mixing import Mixer, random_erase_, soft_target_cross_entropy
from .pretrain_config import PretrainConfig

log = logging.getLogger(__name__)

# bf16 dense peaks per device (FLOP/s), for the MFU estimate when train.peak_tflops is not set.
KNOWN_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}
CKPT_PREFIX = "vitray-ckpt-"


def say(line: str) -> None:
    """One line to the worker's stdout. Not `print`: Ray Train patches it into a logger that the job
    log would show a second time."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---- schedule and small pieces --------------------------------------------------------------
def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup from 0 to `peak`, then cosine decay to `floor`, per optimizer step."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


def device_peak_flops(cfg: PretrainConfig, device: torch.device) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in KNOWN_PEAKS.items() if k in name), None)
    return None


def build_model(cfg: PretrainConfig, num_classes: int) -> VisionTransformer:
    torch.manual_seed(cfg.train.seed)
    return vit_model.create_model(cfg.model.name, **cfg.model.overrides(num_classes))


class EMA:
    """Exponential moving average of the model's floating-point weights, one foreach kernel per update."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        live = model.state_dict()  # detached views: the optimizer updates them in place
        self.weights = {k: v.detach().clone() for k, v in live.items()}
        keys = [k for k, v in live.items() if v.dtype.is_floating_point]
        self._live, self._avg = [live[k] for k in keys], [self.weights[k] for k in keys]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._avg, self._live, 1 - self.decay)


@dataclass
class Batches:
    """One epoch of (patches uint8 (B, N, P*P*C), labels int64 (B,), valid bool (B,)) on the device."""

    source: Iterable[dict]
    device: torch.device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        nb = self.device.type == "cuda"
        for b in self.source:
            with warnings.catch_warnings():  # Ray's batches are read-only views; we never write to them
                warnings.simplefilter("ignore", UserWarning)
                patches = torch.as_tensor(b["patches"])
                labels = torch.as_tensor(b["label"])
            valid = torch.as_tensor(b["valid"]) if "valid" in b else torch.ones(len(labels), dtype=torch.bool)
            if nb:  # pinned host memory -> overlapped copy
                patches, labels, valid = (t.pin_memory().to(self.device, non_blocking=True) for t in (patches, labels, valid))
            yield patches, labels, valid


class Primed:
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

    def batches(self, split: str, batch_size: int, epoch: int, train: bool) -> Iterable[dict]:
        raise NotImplementedError

    def checkpoints(self) -> list[str]:
        """URIs of this run's checkpoints, newest first."""
        return []

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Report metrics (and hand over a local checkpoint folder, which the session removes)."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


class RaySession(Session):
    """Inside `TorchTrainer`: dataset shards, `ray.train.report`, checkpoints in the run's storage."""

    def __init__(self, cfg: PretrainConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world_size, self.rank = ctx.get_world_size(), ctx.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.cfg = cfg
        # Ray sets OMP_NUM_THREADS=1 in a worker unless told otherwise; compute with the slots it holds.
        self.cpu_threads = max(1, int(cfg.train.cpus_per_worker))
        os.environ["OMP_NUM_THREADS"] = str(self.cpu_threads)
        self._uploads: list[dict] = []  # filled by the upload thread: {"dir", "start", "end"}
        self._returned: dict[str, float] = {}  # checkpoint dir -> when report() gave control back

    def batches(self, split, batch_size, epoch, train):
        import ray.train

        from pipeline.data import shuffled_batches

        shard = ray.train.get_dataset_shard(split)
        d = self.cfg.data
        batches = shard.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=d.prefetch_batches,
                                     drop_last=train and not d.local_shuffle_buffer)
        if not (train and d.local_shuffle_buffer):
            return batches
        rng = np.random.default_rng(self.cfg.train.seed * 1000 + epoch * 10 + self.rank)
        return shuffled_batches(batches, batch_size, d.local_shuffle_buffer, d.shuffle_initial or batch_size, rng, drop_last=True)

    def checkpoints(self):
        run = exported.run_folder(self.cfg.train.output, self.cfg.train.name)
        names = {posixpath.relpath(f.path, run.path).split("/")[0] for f in storage.list_files(run.uri)}
        return [run.join(n).uri for n in sorted((n for n in names if n.startswith("checkpoint_")), reverse=True)]

    def _upload(self, checkpoint, dir_name: str):
        """Ray's upload step, timed: the same copy into the run's storage that Ray does by default."""
        import pyarrow.fs as pafs
        import ray.train

        st = ray.train.get_context().get_storage()
        dest = posixpath.join(st.experiment_fs_path, dir_name)
        start = time.time()
        pafs.copy_files(checkpoint.path, dest, source_filesystem=checkpoint.filesystem, destination_filesystem=st.storage_filesystem)
        self._uploads.append({"dir": checkpoint.path, "start": start, "end": time.time()})
        return ray.train.Checkpoint(dest, filesystem=st.storage_filesystem)

    def _upload_timings(self) -> dict:
        """For the uploads that ended: how long they took, and how long training ran beside them."""
        out = {}
        for u in [u for u in self._uploads if u["dir"] in self._returned]:
            self._uploads.remove(u)
            out = {"checkpoint_upload_s": u["end"] - u["start"], "checkpoint_overlap_s": u["end"] - self._returned.pop(u["dir"])}
        return out

    def report(self, metrics, checkpoint_dir):
        import ray.train

        metrics = {**metrics, **self._upload_timings()}
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        mode = ray.train.CheckpointUploadMode[self.cfg.train.checkpoint_upload.upper()]
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True,
                         checkpoint_upload_fn=self._upload)
        self._returned[str(checkpoint_dir)] = time.time()

    def prepare(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # device placement + DDP (NCCL on GPU, gloo on CPU)


@dataclass
class LocalSession(Session):
    """No Ray: batches from callables, checkpoints into `checkpoint_root/checkpoint_NNNNNN/` (two kept)."""

    batch_fn: Callable[[str, int, int, bool], Iterable[dict]]
    checkpoint_root: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    reports: list = field(default_factory=list)
    keep: int = 2

    def batches(self, split, batch_size, epoch, train):
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
            shutil.copytree(checkpoint_dir, self.checkpoint_root / f"checkpoint_{metrics['step']:09d}", dirs_exist_ok=True)
            for old in self.checkpoints()[self.keep:]:
                shutil.rmtree(old)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


# ---- state ---------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint's trainer_state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    best_val_top1: float = -1.0
    images_seen: int = 0
    dropped_samples: int = 0  # undecodable samples left out of the loss
    skipped_batches: int = 0  # micro-batches without one valid sample
    history: list[dict] = field(default_factory=list)  # one entry per epoch

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "TrainState":
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})


@dataclass
class Window:
    """What happened since the last progress report. Sums stay on the device until the report."""

    loss: torch.Tensor
    invalid: torch.Tensor
    skipped: torch.Tensor
    steps: int = 0
    images: int = 0
    data_wait_s: float = 0.0
    t0: float = 0.0  # by the run's clock

    @classmethod
    def start(cls, device: torch.device, now: float) -> "Window":
        zeros = (torch.zeros((), device=device, dtype=dt) for dt in (torch.float32, torch.int64, torch.int64))
        return cls(*zeros, t0=now)


@dataclass
class Run:
    """Everything the step and epoch functions need, built once by `train`."""

    cfg: PretrainConfig
    session: Session
    model: torch.nn.Module  # what runs forward/backward (DDP, compiled)
    core: VisionTransformer  # the plain module: checkpoints and exports
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    class_names: list[str]
    flops_per_image: float
    peak_flops: float | None
    start_step: int = 0  # where this attempt began: 0, or the step of the checkpoint it resumed from
    # Every duration of the loop (report schedule, images/s, data wait, epoch time) is read from this clock;
    # tests inject one they advance themselves, so no outcome depends on the machine's speed.
    clock: Callable[[], float] = time.monotonic
    t_start: float = 0.0
    mixer: Mixer | None = None  # Mixup / CutMix (None: off)
    progress_reports: int = 0  # progress reports sent (checkpoints and epoch ends not counted)
    epoch_t0: float = 0.0  # when this epoch asked for its first batch
    first_batch_s: float = 0.0  # how long that first batch took (the stream's start-up)


def report_is_due(run: Run, window: "Window") -> bool:
    """`train.report_every_s` has passed since the window began, by rank 0's clock; every rank gets rank 0's
    answer (one tiny broadcast), so all call `report` together as Ray Train requires."""
    due = run.clock() - window.t0 >= run.cfg.train.report_every_s
    if run.session.world_size > 1 and dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(due)], device=run.session.device)
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def build_run(cfg: PretrainConfig, session: Session, num_classes: int, train_count: int, class_names: list[str]) -> Run:
    t = cfg.train
    device = session.device
    if device.type == "cpu" and session.cpu_threads:  # as many threads as the CPU slots this worker holds
        torch.set_num_threads(session.cpu_threads)
    core = build_model(cfg, num_classes)
    if t.init_from:
        exported.load_init_weights(core, t.init_from)
    model = session.prepare(core)
    if t.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(vit_model.param_groups(core, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, fused=device.type == "cuda")
    steps_per_epoch = train_count // t.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{train_count} training samples do not fill one global batch of {t.batch_size}: lower --batch-size")
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 1 << 62)
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(cfg.optim.warmup_epochs * steps_per_epoch)
    d = cfg.data
    mixer = Mixer(num_classes, d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.mix_switch_prob, cfg.optim.label_smoothing)
    return Run(cfg, session, model, core, optimizer, EMA(core, cfg.optim.ema_decay) if cfg.optim.ema_decay else None,
               autocast_dtype(cfg, device), steps_per_epoch, total_steps, min(warmup, max(total_steps - 1, 0)), class_names,
               vit_model.flops_per_image(core.cfg, training=True), device_peak_flops(cfg, device),
               mixer=mixer if mixer.active else None)


def batch_augment(run: Run, state: TrainState, micro: int, patches: torch.Tensor, labels: torch.Tensor,
                  valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random erasing, then Mixup / CutMix, on the device: (model input, soft targets or None).

    Without either, the uint8 patches go to the model as they are (it normalises them itself). The
    draws come from a generator seeded by (seed, rank, step, micro-batch), so a resumed run repeats them.
    """
    d = run.cfg.data
    if not (d.random_erase > 0 or run.mixer is not None):
        return patches, None
    core = run.core
    gen = torch.Generator().manual_seed(hash((run.cfg.train.seed, run.session.rank, state.step, micro)) & (2**63 - 1))
    images = vit_model.unpatchify(core.normalize(patches), core.cfg.patch_size, core.cfg.in_chans)
    if d.random_erase > 0:
        random_erase_(images, d.random_erase, gen)
    if run.mixer is None:
        return images, None
    mixed = run.mixer(images, labels, valid, gen)
    return mixed.images, mixed.targets


# ---- one optimizer step --------------------------------------------------------------------
def optimizer_step(run: Run, state: TrainState, batches: Iterator, window: Window) -> float:
    """`accum_steps` micro-batches (forward, masked loss, backward), clip, AdamW, EMA. Returns the lr.

    Undecodable samples are masked out of the loss (static shapes; a micro-batch without one valid
    sample contributes zero gradient and is counted, never averaged into NaN). Every worker still
    runs its backward, so DDP's gradient all-reduce stays in step.
    """
    cfg, t = run.cfg, run.cfg.train
    lr = lr_at(state.step, run.total_steps, run.warmup, cfg.optim.lr, cfg.optim.min_lr)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    device = run.session.device
    for micro in range(t.accum_steps):
        waited = run.clock()
        try:
            patches, labels, valid = next(batches)
        except StopIteration:
            raise RuntimeError(f"worker {run.session.rank} ran out of data in epoch {state.epoch}: its shard is shorter "
                               f"than {run.steps_per_epoch} steps x {t.per_worker_batch} rows") from None
        got = run.clock()
        window.data_wait_s += got - waited
        if micro == 0 and run.first_batch_s == 0.0:  # the epoch's first batch: the stream's start-up
            run.first_batch_s = max(got - waited, 1e-9)
        if t.emulate_step_s:  # benchmarks: the step's compute is a sleep (a GPU step), everything else is real
            window.images += len(labels)
            continue
        last = micro == t.accum_steps - 1
        inputs, soft_targets = batch_augment(run, state, micro, patches, labels, valid)
        with (run.model.no_sync() if not last and hasattr(run.model, "no_sync") else nullcontext()), \
                torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            logits = run.model(inputs).float()
        if soft_targets is not None:
            per_sample = soft_target_cross_entropy(logits, soft_targets)
        else:
            per_sample = F.cross_entropy(logits, labels, reduction="none", label_smoothing=cfg.optim.label_smoothing)
        n_valid = valid.sum()
        loss = (per_sample * valid).sum() / n_valid.clamp(min=1) / t.accum_steps
        loss.backward()
        window.loss += loss.detach()
        window.invalid += len(labels) - n_valid
        window.skipped += n_valid == 0
        window.images += len(labels)
    if t.emulate_step_s:
        time.sleep(t.emulate_step_s)
        state.step += 1
        state.step_in_epoch += 1
        window.steps += 1
        return lr
    if cfg.optim.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    state.step += 1
    state.step_in_epoch += 1
    window.steps += 1
    return lr


def progress(run: Run, state: TrainState, window: Window, lr: float) -> dict:
    """The metrics of one progress window (printed by rank 0); folds the window's counts into the state."""
    elapsed = max(run.clock() - window.t0, 1e-9)
    per_worker = window.images / elapsed
    ips = per_worker * run.session.world_size
    invalid, skipped = int(window.invalid), int(window.skipped)  # the one device sync per window
    state.dropped_samples += invalid
    state.skipped_batches += skipped
    m = {"loss": float(window.loss) / max(window.steps, 1), "lr": lr, "images_per_s": ips, "images_per_s_worker": per_worker,
         "data_wait": window.data_wait_s / elapsed, "step": state.step, "epoch": state.epoch,
         "dropped_samples": state.dropped_samples, "skipped_batches": state.skipped_batches, "start_step": run.start_step,
         "torch_threads": torch.get_num_threads()}
    if run.peak_flops:
        m["mfu"] = per_worker * run.flops_per_image / run.peak_flops
    if run.session.rank == 0:
        eta = (run.total_steps - state.step) * run.cfg.train.batch_size / max(ips, 1e-9)
        mfu = f"{m['mfu'] * 100:.1f}%" if "mfu" in m else "n/a"
        say(f"step {state.step}/{run.total_steps} epoch {state.epoch + 1}/{run.cfg.train.epochs} loss {m['loss']:.4f} "
            f"lr {lr:.2e} img/s {ips:.1f} ({per_worker:.1f}/worker) data-wait {m['data_wait'] * 100:.0f}% mfu {mfu} "
            f"eta {eta / 60:.1f} min" + (f" dropped {invalid}" if invalid else ""))
    return m


# ---- checkpoints, evaluation, the end of an epoch --------------------------------------------
def checkpoint(run: Run, state: TrainState, metrics: dict) -> None:
    """Rank 0 writes a local checkpoint (timed) and hands it to the session, which uploads and removes it."""
    folder = None
    if run.session.rank == 0:
        t0 = run.clock()
        folder = Path(tempfile.mkdtemp(prefix=f"{CKPT_PREFIX}{os.getpid()}-"))
        save_checkpoint(folder, run.core, run.optimizer, asdict(state), run.ema.weights if run.ema else None, run.class_names)
        metrics = {**metrics, "checkpoint_save_s": run.clock() - t0}
    run.session.report(metrics, folder)


@torch.no_grad()
def evaluate(model, batches: Batches, amp_dtype, world_size: int) -> dict:
    """Top-1, top-5 and loss over this worker's part, summed across workers (exact, not averaged)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=batches.device)  # loss, top1, top5, count
    for patches, labels, valid in batches:
        with torch.autocast(batches.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(patches).float()
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        v = valid.double()
        sums += torch.stack([(F.cross_entropy(logits, labels, reduction="none").double() * v).sum(),
                             (hit[:, 0].double() * v).sum(), (hit.any(-1).double() * v).sum(), v.sum()])
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    model.train()
    return {"val_loss": loss / max(n, 1), "val_top1": top1 / max(n, 1), "val_top5": top5 / max(n, 1), "val_count": int(n)}


def export(run: Run, kind: str, metrics: dict) -> None:
    """Rank 0: `{run}/{kind}/` (best or model) with the EMA weights when EMA is on."""
    if run.session.rank != 0 or not run.cfg.train.output:
        return
    model = _with_weights(run.core, run.ema.weights) if run.ema else run.core
    exported.write(exported.run_folder(run.cfg.train.output, run.cfg.train.name).join(kind).uri, model,
                   class_names=run.class_names, metrics=metrics, train_config=run.cfg.model_dump(mode="json"))


def end_of_epoch(run: Run, state: TrainState, metrics: dict) -> None:
    """Evaluate every worker's part (EMA weights when on), export the best, checkpoint."""
    if state.step_in_epoch >= run.steps_per_epoch:
        state.epoch += 1
        state.step_in_epoch = 0
    metrics = {**metrics, "step": state.step, "epoch": state.epoch, "dropped_samples": state.dropped_samples,
               "skipped_batches": state.skipped_batches, "epoch_s": run.clock() - run.epoch_t0, "epoch_end_at": time.time(),
               "first_batch_s": run.first_batch_s}
    cfg = run.cfg
    if cfg.data.val_split:
        model = _with_weights(run.core, run.ema.weights) if run.ema else run.model
        val = Batches(run.session.batches(cfg.data.val_split, cfg.train.micro_batch, state.epoch, False), run.session.device)
        metrics.update(evaluate(model, val, run.amp_dtype, run.session.world_size))
    state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if run.session.rank == 0:
        say(_epoch_line(metrics))
    if metrics.get("val_top1", -1) > state.best_val_top1:
        export(run, "best", metrics)
    state.best_val_top1 = max(state.best_val_top1, metrics.get("val_top1", -1.0))
    state.images_seen = state.step * cfg.train.batch_size
    checkpoint(run, state, metrics)


def _with_weights(core: VisionTransformer, weights: dict) -> VisionTransformer:
    import copy

    m = copy.deepcopy(core)
    m.load_state_dict(weights)
    return m


def _epoch_line(m: dict) -> str:
    parts = [f"epoch {m['epoch']} done: step {m['step']}"]
    if "val_top1" in m:
        parts.append(f"val top-1 {m['val_top1'] * 100:.2f}% top-5 {m['val_top5'] * 100:.2f}% loss {m['val_loss']:.4f} "
                     f"({m['val_count']} images)")
    if m.get("dropped_samples"):
        parts.append(f"{m['dropped_samples']} undecodable samples left out so far")
    return ", ".join(parts)


def remove_stale_checkpoint_dirs() -> None:
    """Local checkpoint folders of worker processes that died before their upload (not ours: alive)."""
    for d in Path(tempfile.gettempdir()).glob(f"{CKPT_PREFIX}*"):
        try:
            pid = int(d.name[len(CKPT_PREFIX):].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


# ---- the loop ------------------------------------------------------------------------------
def train(cfg: PretrainConfig, session: Session, *, num_classes: int, train_count: int,
          class_names: list[str] | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    """Train `cfg.train.epochs` epochs (or `max_steps`), resuming from the newest usable checkpoint.

    `clock` (seconds, monotonic) times everything the loop measures; `epoch_end_at` stays wall time."""
    remove_stale_checkpoint_dirs()
    run = build_run(cfg, session, num_classes, train_count, class_names or [])
    run.clock, run.t_start = clock, clock()
    saved, used, skipped = resume(session.checkpoints(), run.core, run.optimizer, run.ema.weights if run.ema else None,
                                  allow_fresh_start=cfg.train.fresh_start_if_checkpoints_bad)
    state = TrainState.from_checkpoint(saved) if saved else TrainState()
    run.start_step = state.step
    if session.rank == 0:
        for uri, why in skipped:
            say(f"skipped checkpoint {uri}: {why}")
        if used:
            say(f"resumed from {used} at step {state.step} (epoch {state.epoch}, {state.step_in_epoch} steps in)")
    run.model.train()

    def epoch_batches(epoch: int):
        return Batches(session.batches(cfg.data.train_split, cfg.train.micro_batch, epoch, True), session.device)

    primed = None
    try:
        while state.step < run.total_steps and state.epoch < cfg.train.epochs:
            steps = min(run.steps_per_epoch - state.step_in_epoch, run.total_steps - state.step)
            run.epoch_t0, run.first_batch_s = run.clock(), 0.0
            batches = iter(primed or epoch_batches(state.epoch))
            primed = None
            window, last = Window.start(session.device, run.clock()), {}
            for _ in range(steps):
                lr = optimizer_step(run, state, batches, window)
                epoch_ends = state.step_in_epoch == run.steps_per_epoch
                ckpt_due = bool(cfg.train.checkpoint_every_steps) and state.step % cfg.train.checkpoint_every_steps == 0 \
                    and state.step < run.total_steps and not epoch_ends  # the last step is checkpointed by end_of_epoch
                # Progress is reported by time, not by step: Ray Train takes one report per controller poll, and a
                # faster report blocks every worker in `ray.train.report`. The step count only says how often to ask.
                report_due = state.step % cfg.train.log_every_steps == 0 and report_is_due(run, window)
                if report_due or epoch_ends or ckpt_due:
                    last = progress(run, state, window, lr)
                    window = Window.start(session.device, run.clock())
                if epoch_ends:
                    break
                if ckpt_due:
                    checkpoint(run, state, {**last, "step": state.step, "epoch": state.epoch})
                elif report_due:
                    session.report({**last, "step": state.step, "epoch": state.epoch}, None)
                    run.progress_reports += 1
            if window.steps:  # a max_steps stop inside a window
                last = progress(run, state, window, lr)
            # This epoch's stream ends here, before the next one starts: a Ray Data iterator left to the garbage
            # collector would end its split's execution later, whichever epoch that is by then.
            batches.close()
            next_epoch = state.epoch + (state.step_in_epoch >= run.steps_per_epoch)
            if cfg.data.prefetch_next_epoch and state.step < run.total_steps and next_epoch < cfg.train.epochs:
                primed = Primed(lambda e=next_epoch: epoch_batches(e))  # starts while this epoch evaluates
            end_of_epoch(run, state, last)
    except BaseException:
        if session.rank == 0:  # not uploaded and never will be: leave nothing in the temp folder
            for d in Path(tempfile.gettempdir()).glob(f"{CKPT_PREFIX}{os.getpid()}-*"):
                shutil.rmtree(d, ignore_errors=True)
        raise
    export(run, "model", state.history[-1] if state.history else {})
    return {"state": asdict(state), "elapsed_s": run.clock() - run.t_start, "progress_reports": run.progress_reports}


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on each worker. `config` carries the validated job config as JSON."""
    cfg = PretrainConfig.model_validate_json(config["cfg"])
    train(cfg, RaySession(cfg), num_classes=config["num_classes"], train_count=config["train_count"],
          class_names=config["class_names"])
