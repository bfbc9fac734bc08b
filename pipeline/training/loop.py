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
from pipeline.core import exported, storage
from pipeline.core.runs import RunLayout
from pipeline.data import order
from pipeline.training import selfsup
from pipeline.training.checkpoints import resume, save_checkpoint
from pipeline.training.mixing import Mixer
from pipeline.training.sessions import Batches, Primed, RaySession, Session
from pipeline.training.step import (
    EMA,
    Run,
    TrainState,
    Window,
    autocast_dtype,
    epoch_todo,
    evaluate,
    full_epoch,
    optimizer_step,
    record_keys,
    report_is_due,
)
from pipeline.training.train_config import PretrainConfig
from vit_model import VisionTransformer
from vit_model.mae import DECODER_NAME, MaskedAutoencoder, create_mae, decoder_bytes, mae_flops_per_image

log = logging.getLogger(__name__)

CKPT_PREFIX = "vitray-ckpt-"


def say(line: str) -> None:
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


def build_model(cfg: PretrainConfig, num_classes: int) -> VisionTransformer | MaskedAutoencoder:
    """The classifier, or for `objective: mae` the autoencoder around a headless encoder of the same ViT."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.objective == "mae":
        return create_mae(vit_model.variant_config(cfg.model.name, **cfg.model.overrides(0)), cfg.mae.autoencoder())
    return vit_model.create_model(cfg.model.name, **cfg.model.overrides(num_classes))


def model_flops(core: VisionTransformer | MaskedAutoencoder) -> float:
    """Training FLOPs per image (MFU): MAE's encoder sees a quarter of the tokens, its decoder all of them."""
    if isinstance(core, MaskedAutoencoder):
        return mae_flops_per_image(core.encoder.cfg, core.cfg, training=True)
    return vit_model.flops_per_image(core.cfg, training=True)


# ---- state ---------------------------------------------------------------------------------
def make_deterministic() -> None:
    """train.deterministic: torch's deterministic kernels (an error names any op that has none), cuBLAS's
    fixed workspace, cuDNN without autotuning. With data.order exact, per-sample augmentation seeds and
    per-step dropout seeds, a run repeats bitwise on the same workers and threads (set by the session)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def build_run(
    cfg: PretrainConfig, session: Session, num_classes: int, train_count: int, class_names: list[str], knn: bool = False
) -> Run:
    t = cfg.train
    device = session.device
    if device.type == "cpu" and session.cpu_threads:  # as many threads as the CPU slots this worker holds
        torch.set_num_threads(session.cpu_threads)
    if t.deterministic:
        make_deterministic()
    core = build_model(cfg, num_classes)
    if t.init_from:  # an MAE run may continue from an encoder: the decoder starts fresh
        exported.load_init_weights(core.encoder if isinstance(core, MaskedAutoencoder) else core, t.init_from)
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
    d = cfg.data
    mixer = Mixer(num_classes, d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.mix_switch_prob, cfg.optim.label_smoothing)
    return Run(
        cfg,
        session,
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
        mixer=mixer if mixer.active and t.objective == "supervised" else None,
        knn=knn,
    )


# ---- one optimizer step --------------------------------------------------------------------


def progress(run: Run, state: TrainState, window: Window, lr: float) -> dict:
    """The metrics of one progress window (printed by rank 0); folds the window's counts into the state."""
    elapsed = max(run.clock() - window.t0, 1e-9)
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
        "start_step": run.start_step,
        "torch_threads": torch.get_num_threads(),
    }
    if run.peak_flops:
        m["mfu"] = per_worker * model_flops(run.core) / run.peak_flops
    if run.session.rank == 0:
        eta = (run.total_steps - state.step) * run.cfg.train.batch_size / max(ips, 1e-9)
        mfu = f"{m['mfu'] * 100:.1f}%" if "mfu" in m else "n/a"
        say(
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
        t0 = run.clock()
        folder = Path(storage.owned_temp_dir(CKPT_PREFIX))
        save_checkpoint(
            folder, run.core, run.optimizer, asdict(state), run.ema.weights if run.ema else None, run.class_names
        )
        metrics = {**metrics, "checkpoint_save_s": run.clock() - t0}
    run.session.report(metrics, folder)


def export(run: Run, kind: str, metrics: dict) -> None:
    """Rank 0: `{run}/{kind}/` (best or model) with the EMA weights when EMA is on."""
    if run.session.rank != 0 or not run.cfg.train.output:
        return
    model = _with_weights(run.core, run.ema.weights) if run.ema else run.core
    uri = RunLayout.of(run.cfg.train.output, run.cfg.train.name).export(kind).uri
    train_config = run.cfg.model_dump(mode="json")
    if isinstance(model, MaskedAutoencoder):  # the encoder as a plain ViT, the decoder in its own file
        pretraining = {"objective": "mae", "mae": model.cfg.to_dict(), "data": run.cfg.data.manifest}
        pretraining["note"] = (
            "MAE encoder (He et al. 2021): no head; fine-tune with --init-from (a new head is added), "
            f"reconstruction decoder in {DECODER_NAME}"
        )
        exported.write(
            uri,
            model.encoder,
            class_names=[],
            metrics=metrics,
            train_config=train_config,
            extra_files={DECODER_NAME: decoder_bytes(model)},
            pretraining=pretraining,
        )
        return
    exported.write(uri, model, class_names=run.class_names, metrics=metrics, train_config=train_config)


def end_of_epoch(run: Run, state: TrainState, metrics: dict) -> None:
    """Evaluate every worker's part (EMA weights when on), export the best, checkpoint."""
    if state.step_in_epoch >= run.steps_per_epoch:
        state.epoch += 1
        state.step_in_epoch = 0
    metrics = {
        **metrics,
        "step": state.step,
        "epoch": state.epoch,
        "dropped_samples": state.dropped_samples,
        "skipped_batches": state.skipped_batches,
        "epoch_s": run.clock() - run.epoch_t0,
        "epoch_end_at": time.time(),
        "first_batch_s": run.first_batch_s,
    }
    cfg = run.cfg
    last = state.epoch >= cfg.train.epochs or state.step >= run.total_steps
    due = last or state.epoch % cfg.train.eval_every_epochs == 0
    if cfg.train.objective == "mae":
        metrics.update(selfsup.evaluate(run, state.epoch, last))
    elif cfg.data.val_split and due:
        model = _with_weights(run.core, run.ema.weights) if run.ema else run.model
        val = Batches(
            run.session.batches(cfg.data.val_split, cfg.train.micro_batch, state.epoch, False), run.session.device
        )
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
        parts.append(
            f"val top-1 {m['val_top1'] * 100:.2f}% top-5 {m['val_top5'] * 100:.2f}% loss {m['val_loss']:.4f} "
            f"({m['val_count']} images)"
        )
    if "val_top1" not in m and "val_loss" in m:  # MAE: the reconstruction loss on masked val patches
        parts.append(f"val reconstruction loss {m['val_loss']:.4f} ({m['val_count']} images)")
    if "knn_top1" in m:
        parts.append(f"k-NN top-1 {m['knn_top1'] * 100:.2f}% ({m['knn_count']} queries, {m['knn_bank']} in the bank)")
    if m.get("dropped_samples"):
        parts.append(f"{m['dropped_samples']} undecodable samples left out so far")
    return ", ".join(parts)


# ---- the loop ------------------------------------------------------------------------------
def train(
    cfg: PretrainConfig,
    session: Session,
    *,
    num_classes: int,
    train_count: int,
    class_names: list[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    knn: bool = False,
) -> dict:
    """Train `cfg.train.epochs` epochs (or `max_steps`), resuming from the newest usable checkpoint.

    `clock` (seconds, monotonic) times everything the loop measures; `epoch_end_at` stays wall time."""
    storage.remove_dead_owners(CKPT_PREFIX)  # local checkpoints of workers that died before their upload
    run = build_run(cfg, session, num_classes, train_count, class_names or [], knn)
    run.clock, run.t_start = clock, clock()
    saved, used, skipped = resume(
        session.checkpoints() if session.rank == 0 else [],
        run.core,
        run.optimizer,
        run.ema.weights if run.ema else None,
        allow_fresh_start=cfg.train.fresh_start_if_checkpoints_bad,
        rank=session.rank,
        broadcast=session.broadcast,
    )
    state = TrainState.from_checkpoint(saved) if saved else TrainState()
    run.start_step = state.step
    if session.rank == 0:
        for uri, why in skipped:
            say(f"skipped checkpoint {uri}: {why}")
        if used:
            say(f"resumed from {used} at step {state.step} (epoch {state.epoch}, {state.step_in_epoch} steps in)")
    run.model.train()
    exact = session.exact_order
    keys: list[str] | None = [] if cfg.train.record_keys and exact else None

    def epoch_batches(epoch: int, todo):
        ranges = order.split(todo, session.world_size)[session.rank] if exact else None
        source = session.batches(cfg.data.train_split, cfg.train.micro_batch, epoch, True, ranges=ranges)
        return Batches(source, session.device, keys)

    def position():  # what is still to do once every rank has read its samples of this attempt's steps
        return order.advance(todo, session.world_size, (state.step_in_epoch - began) * run.per_rank)

    primed = None
    try:
        while state.step < run.total_steps and state.epoch < cfg.train.epochs:
            steps = min(run.steps_per_epoch - state.step_in_epoch, run.total_steps - state.step)
            todo = epoch_todo(run, state)
            began = state.step_in_epoch  # this attempt's first step of the epoch: `todo` is as of it
            run.epoch_t0, run.first_batch_s = run.clock(), 0.0
            batches = iter(primed or epoch_batches(state.epoch, todo))
            primed, first_keyed = None, state.step
            window, last = Window.start(session.device, run.clock()), {}
            for _ in range(steps):
                lr = optimizer_step(run, state, batches, window)
                epoch_ends = state.step_in_epoch == run.steps_per_epoch
                ckpt_due = (
                    bool(cfg.train.checkpoint_every_steps)
                    and state.step % cfg.train.checkpoint_every_steps == 0
                    and state.step < run.total_steps
                    and not epoch_ends
                )  # the last step is checkpointed by end_of_epoch
                # Progress is reported by time, not by step: Ray Train takes one report per controller poll, and a
                # faster report blocks every worker in `ray.train.report`. The step count only says how often to ask.
                report_due = state.step % cfg.train.log_every_steps == 0 and report_is_due(run, window)
                if report_due or epoch_ends or ckpt_due:
                    last = progress(run, state, window, lr)
                    window = Window.start(session.device, run.clock())
                if epoch_ends:
                    break
                if ckpt_due:
                    if exact:  # where every rank stands: the checkpoint resumes at the next sample
                        state.todo = position()
                    first_keyed = record_keys(run, state, keys, first_keyed)
                    checkpoint(run, state, {**last, "step": state.step, "epoch": state.epoch})
                elif report_due:
                    session.report({**last, "step": state.step, "epoch": state.epoch}, None)
                    run.progress_reports += 1
            if window.steps:  # a max_steps stop inside a window
                last = progress(run, state, window, lr)
            if exact and state.step_in_epoch >= run.steps_per_epoch:
                leftover = next(batches, None)
                if leftover is not None:  # every rank reads the same number of samples: none may be left
                    raise RuntimeError(
                        f"worker {session.rank} has samples left after the {run.steps_per_epoch} steps of epoch "
                        f"{state.epoch}: its part of the order is longer than its steps"
                    )
            # This epoch's stream ends here, before the next one starts: a Ray Data iterator left to the garbage
            # collector would end its split's execution later, whichever epoch that is by then.
            batches.close()
            if exact:
                state.todo = None if state.step_in_epoch >= run.steps_per_epoch else position()
            record_keys(run, state, keys, first_keyed)
            next_epoch = state.epoch + (state.step_in_epoch >= run.steps_per_epoch)
            if cfg.data.prefetch_next_epoch and state.step < run.total_steps and next_epoch < cfg.train.epochs:
                # the next epoch's stream starts while this one evaluates and checkpoints
                primed = Primed(lambda e=next_epoch: epoch_batches(e, full_epoch(run)))
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
    train(
        cfg,
        RaySession(cfg, config.get("manifest"), config.get("train_stream")),
        num_classes=config["num_classes"],
        train_count=config["train_count"],
        class_names=config["class_names"],
        knn=config.get("knn", False),
    )
