"""The per-worker training loop: a plain function that runs under Ray Train or without Ray.

`train_loop_per_worker(config)` is what `TorchTrainer` calls on every worker. The same loop runs
in-process through `run_local(...)` (world size 1, no Ray) for tests and GPU benchmarks. The
differences live in a small Session: where batches come from, how metrics and checkpoints are
reported, and where a previous checkpoint is found.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

import vit_model
from vit_model import VisionTransformer

from .checkpointing import load_checkpoint, save_checkpoint
from .pretrain_config import PretrainConfig

log = logging.getLogger(__name__)

# bf16 dense peaks per device (FLOP/s), for the MFU estimate when train.peak_tflops is not set.
KNOWN_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


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


def load_init_weights(model: VisionTransformer, uri: str) -> None:
    """`--init-from`: a model folder/URI of this project (config.json + model.safetensors), or one
    timm-format .safetensors file. The head is replaced when the class count differs (fine-tuning);
    any other mismatch is an error that names the tensor."""
    from safetensors.torch import load as st_load

    from . import storage

    loc = storage.parse_uri(uri)
    weights_uri = loc.uri if loc.uri.endswith(".safetensors") else loc.join(vit_model.checkpoint.WEIGHTS_NAME).uri
    sd = st_load(storage.read_bytes(weights_uri))
    vit_model.load_weights(model, sd, drop_head=True)


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


# ---- sessions ------------------------------------------------------------------------------
class Session:
    world_size = 1
    rank = 0
    device = torch.device("cpu")

    def batches(self, split: str, batch_size: int, epoch: int, train: bool) -> Iterable[dict]:
        raise NotImplementedError

    def latest_checkpoint(self) -> Path | None:
        return None

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


class RaySession(Session):
    """Inside `TorchTrainer`: dataset shards, `ray.train.report`, Ray Train's checkpoint storage."""

    def __init__(self, cfg: PretrainConfig):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world_size, self.rank = ctx.get_world_size(), ctx.get_world_rank()
        self.device = ray.train.torch.get_device()
        self.cfg = cfg
        self._ckpt = ray.train.get_checkpoint()
        self._tmp = None

    def batches(self, split, batch_size, epoch, train):
        import ray.train

        shard = ray.train.get_dataset_shard(split)
        d = self.cfg.data
        return shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=d.prefetch_batches, drop_last=train,
            local_shuffle_buffer_size=d.local_shuffle_buffer if train and d.local_shuffle_buffer else None,
            local_shuffle_seed=(self.cfg.train.seed * 1000 + epoch * 10 + self.rank) if train else None,
        )

    def latest_checkpoint(self):
        if self._ckpt is None:
            return None
        self._tmp = tempfile.mkdtemp(prefix="vitray-resume-")
        return Path(self._ckpt.to_directory(self._tmp))

    def report(self, metrics, checkpoint_dir):
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def prepare(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # device placement + DDP (NCCL on GPU, gloo on CPU)


@dataclass
class LocalSession(Session):
    """No Ray: batches from callables, checkpoints into a local folder (latest wins)."""

    batch_fn: Callable[[str, int, int, bool], Iterable[dict]]
    checkpoint_root: Path | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    reports: list = field(default_factory=list)

    def batches(self, split, batch_size, epoch, train):
        return self.batch_fn(split, batch_size, epoch, train)

    def latest_checkpoint(self):
        if self.checkpoint_root and (self.checkpoint_root / "latest").exists():
            return self.checkpoint_root / "latest"
        return None

    def report(self, metrics, checkpoint_dir):
        self.reports.append(metrics)
        if checkpoint_dir and self.checkpoint_root:
            import shutil

            dst = self.checkpoint_root / "latest"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dst)


# ---- evaluation ----------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, batches: Batches, amp_dtype, world_size: int) -> dict:
    """Top-1, top-5 and loss over this worker's part, summed across workers (exact, not averaged)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=batches.device)  # loss, top1, top5, count
    for patches, labels, valid in batches:
        patches, labels = patches[valid], labels[valid]
        if len(labels) == 0:
            continue
        with torch.autocast(batches.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(patches).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = top == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), hit[:, 0].sum().double(),
                             hit.any(-1).sum().double(), torch.tensor(float(len(labels)), device=sums.device, dtype=torch.float64)])
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    model.train()
    return {"val_loss": loss / max(n, 1), "val_top1": top1 / max(n, 1), "val_top5": top5 / max(n, 1), "val_count": int(n)}


# ---- the loop ------------------------------------------------------------------------------
def train(cfg: PretrainConfig, session: Session, *, num_classes: int, train_count: int,
          class_names: list[str] | None = None, export_fn: Callable[[VisionTransformer, str, dict], None] | None = None) -> dict:
    """Train `cfg.train.epochs` epochs (or `max_steps`), resuming from the session's checkpoint."""
    t = cfg.train
    device = session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    model = build_model(cfg, num_classes)
    if t.init_from:
        load_init_weights(model, t.init_from)
    core = model
    model = session.prepare(model)
    if t.compile:
        model = torch.compile(model)
    amp_dtype = autocast_dtype(cfg, device)
    groups = vit_model.param_groups(core, cfg.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=device.type == "cuda")
    ema = {k: v.detach().clone() for k, v in core.state_dict().items()} if cfg.optim.ema_decay else None

    steps_per_epoch = train_count // t.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{train_count} training samples do not fill one global batch of {t.batch_size}: lower --batch-size")
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 1 << 62)
    warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(cfg.optim.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))

    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_val_top1": -1.0, "history": [], "images_seen": 0}
    resume = session.latest_checkpoint()
    if resume is not None:
        state.update(load_checkpoint(resume, core, optimizer, ema))
        if session.rank == 0:
            print(f"resumed from step {state['step']} (epoch {state['epoch']}, {state['step_in_epoch']} steps in)", flush=True)

    peak = device_peak_flops(cfg, device)
    flops_per_img = vit_model.flops_per_image(core.cfg, training=True)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    model.train()
    t_start = time.time()
    dropped_total = 0
    last_metrics: dict = {}

    def make_checkpoint(metrics: dict):
        ckpt_dir = None
        if session.rank == 0:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="vitray-ckpt-"))
            save_checkpoint(ckpt_dir, core, optimizer, {k: v for k, v in state.items()}, ema, class_names)
        session.report(metrics, ckpt_dir)

    while state["step"] < total_steps and state["epoch"] < t.epochs:
        epoch = state["epoch"]
        steps_this_epoch = min(steps_per_epoch - state["step_in_epoch"], total_steps - state["step"])
        it = iter(Batches(session.batches(cfg.data.train_split, t.micro_batch, epoch, True), device))
        window = {"loss": 0.0, "n": 0, "images": 0, "wait": 0.0, "t0": time.time(), "dropped": 0}
        for _ in range(steps_this_epoch):
            lr = lr_at(state["step"], total_steps, warmup, cfg.optim.lr, cfg.optim.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            for micro in range(t.accum_steps):
                tw = time.time()
                try:
                    patches, labels, valid = next(it)
                except StopIteration:
                    raise RuntimeError(
                        f"worker {session.rank} ran out of data in epoch {epoch}: its shard is shorter than "
                        f"{steps_per_epoch} steps x {t.per_worker_batch} rows"
                    ) from None
                window["wait"] += time.time() - tw
                n_bad = int((~valid).sum())
                if n_bad:
                    window["dropped"] += n_bad
                    patches, labels = patches[valid], labels[valid]
                sync = micro == t.accum_steps - 1 or not hasattr(model, "no_sync")
                ctx = model.no_sync() if not sync else nullcontext()
                with ctx, torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(model(patches).float(), labels) / t.accum_steps
                loss.backward()
                window["loss"] += loss.item()
                window["images"] += len(labels)
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    for k, v in core.state_dict().items():
                        if v.dtype.is_floating_point:
                            ema[k].lerp_(v, 1 - cfg.optim.ema_decay)
            state["step"] += 1
            state["step_in_epoch"] += 1
            window["n"] += 1
            log_now = state["step"] % t.log_every_steps == 0 or state["step_in_epoch"] == steps_per_epoch
            if log_now:
                last_metrics = _progress(state, window, t, session, flops_per_img, peak, total_steps, t_start, lr)
                dropped_total += window["dropped"]
                window = {"loss": 0.0, "n": 0, "images": 0, "wait": 0.0, "t0": time.time(), "dropped": 0}
            if t.checkpoint_every_steps and state["step"] % t.checkpoint_every_steps == 0 and state["step_in_epoch"] < steps_per_epoch:
                make_checkpoint({**last_metrics, "step": state["step"], "epoch": epoch})
            elif log_now and state["step_in_epoch"] < steps_per_epoch:
                session.report({**last_metrics, "step": state["step"], "epoch": epoch}, None)
        # ---- epoch end: evaluate on every worker, reduce, checkpoint, export the best
        dropped_total += window["dropped"]
        if state["step_in_epoch"] >= steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
        metrics = {**last_metrics, "step": state["step"], "epoch": state["epoch"], "dropped_samples": dropped_total}
        if cfg.data.val_split:
            eval_model = model
            if ema is not None:
                eval_model = _with_weights(core, ema)
            metrics.update(evaluate(eval_model, Batches(session.batches(cfg.data.val_split, t.micro_batch, epoch, False), device),
                                    amp_dtype, session.world_size))
        state["history"].append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if session.rank == 0:
            print(_epoch_line(metrics), flush=True)
            is_best = metrics.get("val_top1", -1) > state["best_val_top1"]
            if is_best and export_fn is not None:
                export_fn(_export_model(core, ema), "best", metrics)
        state["best_val_top1"] = max(state["best_val_top1"], metrics.get("val_top1", -1.0))
        state["images_seen"] = state["step"] * t.batch_size
        make_checkpoint(metrics)
        last_metrics = {}
    if session.rank == 0 and export_fn is not None:
        export_fn(_export_model(core, ema), "model", state["history"][-1] if state["history"] else {})
    return {"state": state, "elapsed_s": time.time() - t_start}


def _export_model(core: VisionTransformer, ema):
    return _with_weights(core, ema) if ema is not None else core


def _with_weights(core: VisionTransformer, weights: dict) -> VisionTransformer:
    import copy

    m = copy.deepcopy(core)
    m.load_state_dict(weights)
    return m


def _progress(state, window, t, session, flops_per_img, peak, total_steps, t_start, lr) -> dict:
    dt = max(time.time() - window["t0"], 1e-9)
    ips_worker = window["images"] / dt
    ips = ips_worker * session.world_size
    remaining = (total_steps - state["step"]) * t.batch_size / max(ips, 1e-9)
    m = {"loss": window["loss"] / max(window["n"], 1), "lr": lr, "images_per_s": ips, "images_per_s_worker": ips_worker,
         "data_wait": window["wait"] / dt, "step": state["step"], "epoch": state["epoch"],
         "mfu": ips_worker * flops_per_img / peak if peak else None}
    if session.rank == 0:
        mfu = f"{m['mfu'] * 100:.1f}%" if m["mfu"] is not None else "n/a"
        print(f"step {state['step']}/{total_steps} epoch {state['epoch'] + 1}/{t.epochs} loss {m['loss']:.4f} lr {lr:.2e} "
              f"img/s {ips:.1f} ({ips_worker:.1f}/worker) data-wait {m['data_wait'] * 100:.0f}% mfu {mfu} "
              f"eta {remaining / 60:.1f} min", flush=True)
    return {k: v for k, v in m.items() if v is not None}


def _epoch_line(m: dict) -> str:
    parts = [f"epoch {m['epoch']} done: step {m['step']}"]
    if "val_top1" in m:
        parts.append(f"val top-1 {m['val_top1'] * 100:.2f}% top-5 {m['val_top5'] * 100:.2f}% loss {m['val_loss']:.4f} "
                     f"({m['val_count']} images)")
    if m.get("dropped_samples"):
        parts.append(f"{m['dropped_samples']} undecodable samples dropped")
    return ", ".join(parts)


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on each worker. `config` carries the validated job config as JSON."""
    cfg = PretrainConfig.model_validate_json(config["cfg"])
    session = RaySession(cfg)
    export_fn = None
    if session.rank == 0:  # only rank 0 writes the exported models
        from .pretrain import export_to_output

        export_fn = lambda model, kind, metrics: export_to_output(cfg, model, kind, metrics, config["class_names"])  # noqa: E731
    train(cfg, session, num_classes=config["num_classes"], train_count=config["train_count"],
          class_names=config["class_names"], export_fn=export_fn)
