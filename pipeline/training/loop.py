"""The per-worker training loop: a plain function that runs under Ray Train or without Ray.

    build_run: the objective's module, DDP, AdamW, EMA, the schedule
    resume (newest checkpoint whose checksums verify)
    for each epoch:                                            train()
        this rank's part of the epoch's order                  epoch_stream()
        for each optimizer step:                               step.optimizer_step()
            micro-batches: the objective's loss, backward (accumulated), clip, AdamW, EMA
            a progress report once `report_every_s` has passed (asked every `log_every_steps`)
            a checkpoint every `checkpoint_every_steps`, with the position still to read
        the objective's monitor, export the best, checkpoint   end_of_epoch()
    export the model

`train_loop_per_worker(config)` is what `TorchTrainer` calls on every worker; `train(cfg, LocalSession(...))`
runs the same loop in-process (world size 1, no Ray) for tests, benchmarks and recipe search. The
differences live in a small Session: where batches come from, how metrics and checkpoints are reported,
and where earlier checkpoints are found. What differs between objectives lives in `objectives/`.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

import vit_model
from pipeline.core import exported, scratch
from pipeline.core.runs import RunLayout
from pipeline.data import order
from pipeline.training.checkpoints import resume, save_checkpoint
from pipeline.training.objectives import objective_for
from pipeline.training.sessions import Batches, PrefetchedEpoch, RaySession, Session
from pipeline.training.step import (
    EMA,
    Progress,
    ReportWindow,
    Run,
    TrainState,
    autocast_dtype,
    epoch_todo,
    full_epoch,
    optimizer_step,
    order_settings,
    record_keys,
    report_is_due,
)
from pipeline.training.train_config import PretrainConfig

log = logging.getLogger(__name__)

CKPT_PREFIX = "vitray-ckpt-"


def worker_print(line: str) -> None:
    """One line to the worker's stdout. Not `print`: Ray Train patches it into a logger that the job
    log would show a second time."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ---- schedule and small pieces --------------------------------------------------------------


def device_peak_flops(cfg: PretrainConfig, device: torch.device) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type == "cuda":
        return vit_model.gpu_peak_flops(torch.cuda.get_device_name(device))
    return None


# ---- state ---------------------------------------------------------------------------------
def make_deterministic() -> None:
    """train.deterministic: torch's deterministic kernels (an error names any op that has none), cuBLAS's
    fixed workspace, cuDNN without autotuning. With the epoch order, per-sample augmentation seeds and
    per-step dropout seeds, a run repeats bitwise on the same workers and threads (set by the session)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def build_run(cfg: PretrainConfig, session: Session, num_classes: int, train_count: int, class_names: list[str]) -> Run:
    t = cfg.train
    device = session.device
    if device.type == "cpu" and session.cpu_threads:  # as many threads as the CPU slots this worker holds
        torch.set_num_threads(session.cpu_threads)
    if t.deterministic:
        make_deterministic()
    objective = objective_for(cfg)
    torch.manual_seed(t.seed)
    core = objective.build(num_classes)
    if t.init_from:  # an MAE run may continue from an encoder: its decoder starts fresh
        exported.load_init_weights(objective.encoder(core), t.init_from)
    model = session.prepare(core)
    if t.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(
        vit_model.param_groups(core, cfg.optim.weight_decay, cfg.optim.layer_decay),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        fused=device.type == "cuda",
    )
    steps_per_epoch = train_count // t.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{train_count} training samples do not fill one global batch of {t.batch_size}: lower --batch-size"
        )
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 1 << 62)
    warmup = (
        cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(cfg.optim.warmup_epochs * steps_per_epoch)
    )
    return Run(
        cfg,
        session,
        objective,
        model,
        core,
        optimizer,
        EMA(core, cfg.optim.ema_decay) if cfg.optim.ema_decay else None,
        autocast_dtype(cfg, device),
        steps_per_epoch,
        total_steps,
        min(warmup, max(total_steps - 1, 0)),
        class_names,
        device_peak_flops(cfg, device),
    )


# ---- one optimizer step --------------------------------------------------------------------


def progress(run: Run, state: TrainState, window: ReportWindow, lr: float) -> dict:
    """The metrics of one progress window (printed by rank 0); folds the window's counts into the state."""
    elapsed = max(run.progress.clock() - window.t0, 1e-9)
    per_worker = window.images / elapsed
    ips = per_worker * run.session.world_size
    invalid, skipped = int(window.invalid), int(window.skipped)  # the one device sync per window
    state.dropped_samples += invalid
    state.skipped_batches += skipped
    m = {
        "loss": float(window.loss) / max(window.steps, 1),
        "lr": lr,
        "images_per_s": ips,
        "images_per_s_worker": per_worker,
        "data_wait": window.data_wait_s / elapsed,
        "step": state.step,
        "epoch": state.epoch,
        "dropped_samples": state.dropped_samples,
        "skipped_batches": state.skipped_batches,
        "start_step": run.progress.start_step,
        "torch_threads": torch.get_num_threads(),
    }
    if run.peak_flops:
        m["mfu"] = per_worker * run.objective.flops_per_image(run.core) / run.peak_flops
    if run.session.rank == 0:
        eta = (run.total_steps - state.step) * run.cfg.train.batch_size / max(ips, 1e-9)
        mfu = f"{m['mfu'] * 100:.1f}%" if "mfu" in m else "n/a"
        worker_print(
            f"step {state.step}/{run.total_steps} epoch {state.epoch + 1}/{run.cfg.train.epochs} loss {m['loss']:.4f} "
            f"lr {lr:.2e} img/s {ips:.1f} ({per_worker:.1f}/worker) data-wait {m['data_wait'] * 100:.0f}% mfu {mfu} "
            f"eta {eta / 60:.1f} min" + (f" dropped {invalid}" if invalid else "")
        )
    return m


# ---- checkpoints, evaluation, the end of an epoch --------------------------------------------
def checkpoint(run: Run, state: TrainState, metrics: dict) -> None:
    """Rank 0 writes a local checkpoint (timed) and hands it to the session, which uploads and removes it."""
    folder = None
    if run.session.rank == 0:
        t0 = run.progress.clock()
        folder = Path(scratch.owned_temp_dir(CKPT_PREFIX))
        ema = run.ema.weights if run.ema else None
        save_checkpoint(folder, run.objective.parts(run.core), run.optimizer, asdict(state), ema, run.class_names)
        metrics = {**metrics, "checkpoint_save_s": run.progress.clock() - t0}
    run.session.report(metrics, folder)


def averaged(run: Run) -> torch.nn.Module:
    """The module to judge and export: a copy holding the EMA weights when EMA is on, else the plain module."""
    if run.ema is None:
        return run.core
    m = copy.deepcopy(run.core)
    m.load_state_dict(run.ema.weights)
    return m


def export(run: Run, kind: str, metrics: dict, model: torch.nn.Module | None = None) -> None:
    """Rank 0: `{run}/{kind}/` (best or model), the objective's parts of `model` (EMA's weights when on)."""
    if run.session.rank != 0 or not run.cfg.train.output:
        return
    parts = run.objective.parts(model if model is not None else averaged(run))
    exported.write(
        RunLayout.of(run.cfg.train.output, run.cfg.train.name).export(kind).uri,
        parts.vit,
        class_names=parts.class_names if parts.class_names is not None else run.class_names,
        metrics=metrics,
        train_config=run.cfg.model_dump(mode="json"),
        extra_files=parts.files,
        **parts.metadata,
    )


def end_of_epoch(run: Run, state: TrainState, metrics: dict) -> None:
    """The objective's monitor over every worker's part (EMA weights when on), export the best, checkpoint."""
    if state.step_in_epoch >= run.steps_per_epoch:
        state.epoch += 1
        state.step_in_epoch = 0
    metrics = {
        **metrics,
        "step": state.step,
        "epoch": state.epoch,
        "dropped_samples": state.dropped_samples,
        "skipped_batches": state.skipped_batches,
        "epoch_s": run.progress.clock() - run.progress.epoch_t0,
        "epoch_end_at": time.time(),
        "first_batch_s": run.progress.first_batch_s,
    }
    cfg, s = run.cfg, run.session
    last = state.epoch >= cfg.train.epochs or state.step >= run.total_steps
    model = averaged(run)

    def eval_batches(name: str) -> Batches:
        return Batches(s.batches(name, cfg.train.micro_batch, state.epoch, False), s.device)

    metrics.update(run.objective.monitor(run, state.epoch, last, eval_batches, model))
    state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if s.rank == 0:
        worker_print(", ".join([f"epoch {metrics['epoch']} done: step {metrics['step']}", *_notes(run, metrics)]))
    if run.objective.exports_best and metrics.get("val_top1", -1) > state.best_val_top1:
        export(run, "best", metrics, model)
    state.best_val_top1 = max(state.best_val_top1, metrics.get("val_top1", -1.0))
    state.images_seen = state.step * cfg.train.batch_size
    checkpoint(run, state, metrics)


def _notes(run: Run, m: dict) -> list[str]:
    notes = run.objective.describe(m)
    if m.get("dropped_samples"):
        notes.append(f"{m['dropped_samples']} undecodable samples left out so far")
    return notes


# ---- the loop ------------------------------------------------------------------------------
def epoch_stream(run: Run, epoch: int, todo: order.Ranges, keys: list | None) -> Batches:
    """This rank's part of `todo` (positions of the epoch's order) as batches on the device."""
    s = run.session
    ranges = order.split(todo, s.world_size)[s.rank]
    return Batches(
        s.batches(run.cfg.data.train_split, run.cfg.train.micro_batch, epoch, True, ranges=ranges), s.device, keys
    )


def still_to_do(run: Run, state: TrainState, todo: order.Ranges, began: int) -> order.Ranges:
    """What is left of `todo` (the epoch's order as of step `began`) once every rank has read its steps since."""
    return order.advance(todo, run.session.world_size, (state.step_in_epoch - began) * run.per_rank)


def checkpoint_due(run: Run, state: TrainState) -> bool:
    every = run.cfg.train.checkpoint_every_steps
    epoch_ends = state.step_in_epoch == run.steps_per_epoch  # end_of_epoch checkpoints that step
    return bool(every) and state.step % every == 0 and state.step < run.total_steps and not epoch_ends


def train(
    cfg: PretrainConfig,
    session: Session,
    *,
    num_classes: int,
    train_count: int,
    class_names: list[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Train `cfg.train.epochs` epochs (or `max_steps`), resuming from the newest usable checkpoint.

    `clock` (seconds, monotonic) times everything the loop measures; `epoch_end_at` stays wall time."""
    scratch.remove_dead_owners(CKPT_PREFIX)  # local checkpoints of workers that died before their upload
    run = build_run(cfg, session, num_classes, train_count, class_names or [])
    run.progress = Progress(clock=clock, t_start=clock())
    saved, used, skipped = resume(
        session.checkpoints() if session.rank == 0 else [],
        lambda folder: run.objective.load(run.core, folder),
        run.optimizer,
        run.ema.weights if run.ema else None,
        allow_fresh_start=cfg.train.fresh_start_if_checkpoints_bad,
        rank=session.rank,
        broadcast=session.broadcast,
    )
    state = TrainState.from_checkpoint(saved) if saved else TrainState()
    run.progress.start_step = state.step
    if session.rank == 0:
        for uri, why in skipped:
            worker_print(f"skipped checkpoint {uri}: {why}")
        if used:
            worker_print(
                f"resumed from {used} at step {state.step} (epoch {state.epoch}, {state.step_in_epoch} steps in)"
            )
    run.model.train()
    keys: list[str] | None = [] if cfg.train.record_keys else None
    next_epoch = None  # the next epoch's stream, started while this one evaluates
    try:
        while state.step < run.total_steps and state.epoch < cfg.train.epochs:
            steps = min(run.steps_per_epoch - state.step_in_epoch, run.total_steps - state.step)
            todo = epoch_todo(run, state)  # what is left of this epoch's order, as of its step `began`
            began = state.step_in_epoch
            run.progress.epoch_t0, run.progress.first_batch_s = run.progress.clock(), 0.0
            batches = iter(next_epoch or epoch_stream(run, state.epoch, todo, keys))
            next_epoch, first_keyed = None, state.step
            window, last = ReportWindow.start(session.device, run.progress.clock()), {}
            for _ in range(steps):
                lr = optimizer_step(run, state, batches, window)
                epoch_ends = state.step_in_epoch == run.steps_per_epoch
                ckpt_due = checkpoint_due(run, state)
                # Progress is reported by time, not by step: Ray Train takes one report per controller poll, and a
                # faster report blocks every worker in `ray.train.report`. The step count only says how often to ask.
                report_due = state.step % cfg.train.log_every_steps == 0 and report_is_due(run, window)
                if report_due or epoch_ends or ckpt_due:
                    last = progress(run, state, window, lr)
                    window = ReportWindow.start(session.device, run.progress.clock())
                if epoch_ends:
                    break
                if ckpt_due:  # where every rank stands: the checkpoint resumes at the next sample
                    state.todo, state.order = still_to_do(run, state, todo, began), order_settings(cfg)
                    first_keyed = record_keys(run, state, keys, first_keyed)
                    checkpoint(run, state, {**last, "step": state.step, "epoch": state.epoch})
                elif report_due:
                    session.report({**last, "step": state.step, "epoch": state.epoch}, None)
                    run.progress.reports += 1
            if window.steps:  # a max_steps stop inside a window
                last = progress(run, state, window, lr)
            epoch_done = state.step_in_epoch >= run.steps_per_epoch
            if epoch_done and session.reads_positions and next(batches, None) is not None:  # equal parts per rank
                raise RuntimeError(
                    f"worker {session.rank} has samples left after the {run.steps_per_epoch} steps of epoch "
                    f"{state.epoch}: its part of the order is longer than its steps"
                )
            # This epoch's stream ends here, before the next one starts: a Ray Data iterator left to the garbage
            # collector would end its split's execution later, whichever epoch that is by then.
            batches.close()
            state.todo = None if epoch_done else still_to_do(run, state, todo, began)
            state.order = None if epoch_done else order_settings(cfg)
            record_keys(run, state, keys, first_keyed)
            upcoming = state.epoch + epoch_done
            if cfg.data.prefetch_next_epoch and state.step < run.total_steps and upcoming < cfg.train.epochs:
                next_epoch = PrefetchedEpoch(lambda e=upcoming: epoch_stream(run, e, full_epoch(run), keys))
            end_of_epoch(run, state, last)
    except BaseException:
        if session.rank == 0:  # not uploaded and never will be: leave nothing in the temp folder
            for d in Path(tempfile.gettempdir()).glob(f"{CKPT_PREFIX}{os.getpid()}-*"):
                shutil.rmtree(d, ignore_errors=True)
        raise
    export(run, "model", state.history[-1] if state.history else {})
    elapsed = run.progress.clock() - run.progress.t_start
    return {"state": asdict(state), "elapsed_s": elapsed, "progress_reports": run.progress.reports}


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on each worker. `config` carries the validated job config as JSON and the streams."""
    cfg = PretrainConfig.model_validate_json(config["cfg"])
    train(
        cfg,
        RaySession(cfg, config["manifest"], config["train_stream"], config["eval_stream"], config["eval_sets"]),
        num_classes=config["num_classes"],
        train_count=config["train_count"],
        class_names=config["class_names"],
    )
