"""One optimizer step and what it carries: the run's state, the report window, EMA, the lr schedule.

    optimizer_step():  for each of `accum_steps` micro-batches: next batch (timed as data wait) ->
                       the objective's loss per sample under autocast (`objectives/`: augmentation,
                       masks) -> masked mean -> backward;  then clip, AdamW, EMA

Shapes: a micro-batch is (patches (B, N, P*P*C) uint8, labels (B,) int64, valid (B,) bool) on the device.
Times come from `Progress.clock` (seconds), which tests replace with a clock they advance themselves.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeline.core import storage
from pipeline.core.runs import RunLayout
from pipeline.data import order
from pipeline.training.objectives import Objective
from pipeline.training.sessions import Session
from pipeline.training.train_config import PretrainConfig


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
class TrainState:
    """Where the run is; saved in every checkpoint's trainer_state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    best_val_top1: float = -1.0
    images_seen: int = 0
    dropped_samples: int = 0  # undecodable samples left out of the loss
    skipped_batches: int = 0  # micro-batches without one valid sample
    todo: list | None = None  # mid-epoch: the epoch's positions still to read (order.advance)
    order: dict | None = None  # the settings `todo` is a position in (ORDER_SETTINGS); a resume must match them
    history: list[dict] = field(default_factory=list)  # one entry per epoch

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainState:
        return cls(**{k: saved[k] for k in cls.__dataclass_fields__ if k in saved})


@dataclass
class ReportWindow:
    """What happened since the last progress report. Sums stay on the device until the report."""

    loss: torch.Tensor
    invalid: torch.Tensor
    skipped: torch.Tensor
    steps: int = 0
    images: int = 0
    data_wait_s: float = 0.0
    t0: float = 0.0  # by the run's clock

    @classmethod
    def start(cls, device: torch.device, now: float) -> ReportWindow:
        zeros = (torch.zeros((), device=device, dtype=dt) for dt in (torch.float32, torch.int64, torch.int64))
        return cls(*zeros, t0=now)


@dataclass
class Progress:
    """How this attempt is going, by the run's clock: what reports and the epoch line say (not saved)."""

    # Every duration of the loop (report schedule, images/s, data wait, epoch time) is read from this clock;
    # tests inject one they advance themselves, so no outcome depends on the machine's speed.
    clock: Callable[[], float] = time.monotonic
    t_start: float = 0.0
    start_step: int = 0  # where this attempt began: 0, or the step of the checkpoint it resumed from
    reports: int = 0  # progress reports sent (checkpoints and epoch ends not counted)
    epoch_t0: float = 0.0  # when this epoch asked for its first batch
    first_batch_s: float = 0.0  # how long that first batch took (the stream's start-up)


@dataclass
class Run:
    """What the step and epoch functions work with, built once by `loop.build_run`."""

    cfg: PretrainConfig
    session: Session
    objective: Objective
    model: torch.nn.Module  # what runs forward/backward (DDP, compiled)
    core: torch.nn.Module  # the plain module: checkpoints and exports (`objective.parts`)
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    amp_dtype: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    class_names: list[str]
    peak_flops: float | None
    progress: Progress = field(default_factory=Progress)

    @property
    def per_rank(self) -> int:
        """Samples each rank reads per optimizer step (all its micro-batches)."""
        return self.cfg.train.batch_size // self.session.world_size


def report_is_due(run: Run, window: ReportWindow) -> bool:
    """`train.report_every_s` has passed since the window began, by rank 0's clock; every rank gets rank 0's
    answer (one tiny broadcast), so all call `report` together as Ray Train requires."""
    due = run.progress.clock() - window.t0 >= run.cfg.train.report_every_s
    if run.session.world_size > 1 and dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(due)], device=run.session.device)
        dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed the global generators (CPU and every GPU) for this rank's step: dropout and drop-path masks
    differ between ranks (identical masks would shrink their regularising effect as workers are added)
    and are drawn again exactly after a resume at this step, on any number of workers, with no generator
    state to save."""
    torch.manual_seed(hash((seed, rank, step, -1)) & (2**63 - 1))


def optimizer_step(run: Run, state: TrainState, batches: Iterator, window: ReportWindow) -> float:
    """`accum_steps` micro-batches (forward, masked loss, backward), clip, AdamW, EMA. Returns the lr.

    Undecodable samples are masked out of the loss (static shapes; a micro-batch without one valid
    sample contributes zero gradient and is counted, never averaged into NaN). Every worker still
    runs its backward, so DDP's gradient all-reduce stays in step.
    """
    cfg, t = run.cfg, run.cfg.train
    seed_step(t.seed, run.session.rank, state.step)
    lr = lr_at(state.step, run.total_steps, run.warmup, cfg.optim.lr, cfg.optim.min_lr)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # layer-wise decay (fine-tuning) scales each group's share
    device = run.session.device
    for micro in range(t.accum_steps):
        waited = run.progress.clock()
        try:
            patches, labels, valid = next(batches)
        except StopIteration:
            raise RuntimeError(
                f"worker {run.session.rank} ran out of data in epoch {state.epoch}: its shard is shorter "
                f"than {run.steps_per_epoch} steps x {t.per_worker_batch} rows"
            ) from None
        got = run.progress.clock()
        window.data_wait_s += got - waited
        if micro == 0 and run.progress.first_batch_s == 0.0:  # the epoch's first batch: the stream's start-up
            run.progress.first_batch_s = max(got - waited, 1e-9)
        if t.emulate_step_s:  # benchmarks: the step's compute is a sleep (a GPU step), everything else is real
            window.images += len(labels)
            continue
        last = micro == t.accum_steps - 1
        with (
            run.model.no_sync() if not last and hasattr(run.model, "no_sync") else nullcontext(),
            torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None),
        ):
            per_sample = run.objective.losses(run, state.step, micro, patches, labels, valid)
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


# ---- the data position -----------------------------------------------------------------------
ORDER_SETTINGS = ("data.manifest", "data.train_split", "data.shuffle_seed", "data.window_shards")


def order_settings(cfg) -> dict:
    """What the epoch's order is a function of, besides the batch size (checked by its count): a position in
    `todo` means the same samples only under the same values."""
    return {k: getattr(cfg.data, k.split(".", 1)[1]) for k in ORDER_SETTINGS}


def full_epoch(run: Run) -> list[list[int]]:
    return [[0, run.steps_per_epoch * run.cfg.train.batch_size]]


def epoch_todo(run: Run, state: TrainState) -> list[list[int]]:
    """The epoch's positions still to read: all of them at its start, else what the checkpoint recorded (a
    checkpoint without a record, from before exact order: its steps' share of the start of every part)."""
    if state.step_in_epoch == 0:
        return full_epoch(run)
    if state.order is not None:
        now = order_settings(run.cfg)
        changed = [f"{k} {state.order.get(k)!r} -> {now[k]!r}" for k in ORDER_SETTINGS if state.order.get(k) != now[k]]
        if changed:
            raise ValueError(
                f"the checkpoint stopped {state.step_in_epoch} steps into epoch {state.epoch} under other order "
                f"settings ({', '.join(changed)}): resumed so, some samples would be trained twice this epoch and "
                "others never. Resume with the settings the run started with, or start a new --name"
            )
    if state.todo is None:
        return order.advance(full_epoch(run), run.session.world_size, state.step_in_epoch * run.per_rank)
    want = (run.steps_per_epoch - state.step_in_epoch) * run.cfg.train.batch_size
    if order.total(state.todo) != want:
        raise ValueError(
            f"the checkpoint's epoch {state.epoch} has {order.total(state.todo)} samples left, which are not the "
            f"{run.steps_per_epoch - state.step_in_epoch} steps of train.batch_size {run.cfg.train.batch_size} this "
            "run would take: resume with the batch size (and data) the run started with, or start a new --name"
        )
    return state.todo


def record_keys(run: Run, state: TrainState, keys: list | None, first: int) -> int:
    """train.record_keys: this rank's keys of steps first+1..state.step, then the next interval's start."""
    if keys is None or state.step == first:
        return first
    n = (state.step - first) * run.per_rank
    uri = RunLayout.of(run.cfg.train.output, run.cfg.train.name).consumed(
        state.epoch, first + 1, state.step, run.session.rank
    )
    storage.write_bytes(uri.uri, json.dumps(keys[:n]).encode())
    del keys[:n]
    return state.step
