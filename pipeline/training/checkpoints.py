"""Training checkpoints as safetensors + JSON (never pickle): model, optimizer, EMA, RNG, position.

A checkpoint folder:
  model.safetensors, config.json     the ViT, loadable by `vit_model.load_pretrained` (MAE's: the encoder)
  <the objective's files>            beside it (`Objective.parts`: MAE's mae_decoder.safetensors)
  optimizer.safetensors              AdamW moments ("state.<param index>.<name>") and RNG tensors
  ema.safetensors                    EMA weights, if enabled
  trainer_state.json                 step, epoch, step_in_epoch, best val top-1, optimizer hyper-
                                     parameters per group, numpy/python RNG states, metrics so far
  checksums.json                     sha256 of every file above, written last

A resume verifies the checksums before it touches the model, and falls back to the previous
checkpoint when the newest is damaged or incomplete (an upload cut short), saying which and why. Rank 0
chooses, every other rank loads exactly its choice; a store that fails is retried, never a fall-back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import vit_model
from pipeline.core import scratch, storage

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
RESUME_PREFIX = "vitray-resume-"  # + owner pid: a download killed mid-way is removed by the next resume
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from: damaged, or none usable at all."""


class IncompleteCheckpoint(CheckpointError):
    """An upload that never finished (a file or the checksums missing): a checkpoint that never existed."""


def save_checkpoint(
    folder: str | Path,
    parts,
    optimizer: torch.optim.Optimizer,
    state: dict,
    ema: dict[str, torch.Tensor] | None = None,
    class_names: list[str] | None = None,
) -> Path:
    """`parts` (`objectives.Parts`): the ViT and the files the objective keeps beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = parts.class_names if parts.class_names is not None else class_names or []
    vit_model.save_pretrained(parts.vit, folder, class_names=names)
    for name, data in parts.files.items():
        (folder / name).write_bytes(data)
    opt_sd = optimizer.state_dict()
    tensors = {}
    for idx, st in opt_sd["state"].items():
        for name, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(folder / "ema.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_sd["param_groups"]]
    full = {
        **state,
        "param_groups": groups,
        "rng_numpy": np.random.get_state()[1].tolist(),
        "rng_numpy_pos": int(np.random.get_state()[2]),
        "rng_python": list(random.getstate()[1]),
    }
    (folder / STATE_NAME).write_text(json.dumps(full, indent=1, default=_jsonable))
    sums = {f.name: _sha256(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1))
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(folder: str | Path) -> None:
    """Raise CheckpointError naming the first file that is missing or differs from its recorded sha256."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"no {CHECKSUMS}: incomplete (an upload cut short)") from None
    except ValueError as e:
        raise CheckpointError(f"{CHECKSUMS} is unreadable ({e})") from None
    for name in (STATE_NAME, "model.safetensors", "optimizer.safetensors"):
        if name not in sums:
            raise CheckpointError(f"{CHECKSUMS} does not list {name}")
    for name, digest in sums.items():
        if not (folder / name).is_file():
            raise IncompleteCheckpoint(f"{name} is missing: incomplete (an upload cut short)")
        if _sha256(folder / name) != digest:
            raise CheckpointError(f"{name} does not match its sha256 (damaged)")


def _fetch(uri: str, local: str, retries: int, sleep: Callable[[float], None]) -> None:
    """Download and verify one checkpoint folder; a transient storage failure is retried with backoff
    (1, 2, 4, ... s), anything else raised at once."""
    for attempt in range(retries + 1):
        shutil.rmtree(local, ignore_errors=True)
        Path(local).mkdir(parents=True)
        try:
            storage.download_folder(uri, local)
            verify_checkpoint(local)
            return
        except storage.StorageError as e:
            if not e.transient or attempt == retries:
                raise
            log.warning("reading checkpoint %s failed (%s); retrying in %d s", uri, e, 2**attempt)
            sleep(2**attempt)


def choose_checkpoint(
    candidates: list[str], *, allow_fresh_start: bool, retries: int = 4, sleep: Callable[[float], None] = time.sleep
) -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """The newest usable checkpoint among `candidates` (URIs, newest first): (URI, a local folder holding it,
    verified, which the caller removes; [(skipped URI, why)]). Damaged or incomplete checkpoints are
    skipped; a store that keeps failing (after `retries`) raises StorageError: an outage is never a
    reason to start over. When every checkpoint is damaged: (None, None, skipped) with
    `allow_fresh_start`, else CheckpointError naming each one and its problem."""
    skipped, damaged = [], False
    for uri in candidates:
        local = scratch.owned_temp_dir(RESUME_PREFIX)
        try:
            _fetch(uri, local, retries, sleep)
            return uri, local, skipped
        except storage.StorageError as e:
            shutil.rmtree(local, ignore_errors=True)
            if e.transient:
                raise storage.StorageError(
                    f"cannot read checkpoint {uri} after {retries + 1} attempts: {e}. Not starting over on a storage "
                    "failure: the run fails and Ray Train retries it (train.max_failures)",
                    transient=True,
                ) from None
            if "no such object" not in str(e):
                raise  # refused credentials, a missing bucket: nothing a retry or a fallback fixes
            log.warning("skipping checkpoint %s: %s", uri, e)
            skipped.append((uri, f"incomplete: {e}"))  # deleted while we read it (Ray's num_to_keep)
        except CheckpointError as e:
            shutil.rmtree(local, ignore_errors=True)
            log.warning("skipping checkpoint %s: %s", uri, e)
            skipped.append((uri, str(e)))
            damaged |= not isinstance(e, IncompleteCheckpoint)
    if damaged and not allow_fresh_start:
        raise CheckpointError(
            "no usable checkpoint to resume from: "
            + "; ".join(f"{u}: {why}" for u, why in skipped)
            + ". Delete or repair them, or set train.fresh_start_if_checkpoints_bad: true to start this run over"
        )
    return None, None, skipped


def resume(
    candidates: list[str],
    load_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    ema: dict | None,
    *,
    allow_fresh_start: bool,
    rank: int = 0,
    broadcast: Callable[[object], object] = lambda x: x,
    retries: int = 4,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict | None, str | None, list[tuple[str, str]]]:
    """Restore every rank from the same checkpoint: rank 0 chooses and verifies it (`choose_checkpoint`),
    `broadcast` (rank 0's value to all ranks) tells the others which; each of them downloads that one,
    verifies it (a mismatch fails loudly, never a fall-back to another) and loads it: the weights through
    `load_model(folder)` (the objective's `load`), the optimizer, EMA and RNG here.

    Returns (trainer state or None for a fresh start, the URI used, [(skipped URI, why)])."""
    scratch.remove_dead_owners(RESUME_PREFIX)  # downloads of processes killed while loading (a full copy each)
    local = None
    try:
        if rank == 0:
            uri, local, skipped = choose_checkpoint(
                candidates, allow_fresh_start=allow_fresh_start, retries=retries, sleep=sleep
            )
            choice = broadcast({"uri": uri, "skipped": skipped})
        else:
            choice = broadcast(None)
            uri, skipped = choice["uri"], [tuple(x) for x in choice["skipped"]]
            if uri:
                local = scratch.owned_temp_dir(RESUME_PREFIX)
                try:
                    _fetch(uri, local, retries, sleep)
                except CheckpointError as e:
                    why = f"rank {rank}: checkpoint {uri} (rank 0 verified it) is not here: {e}"
                    raise CheckpointError(why) from None
        if uri is None:
            return None, None, skipped
        return load_checkpoint(local, load_model, optimizer, ema), uri, skipped
    finally:
        if local:
            shutil.rmtree(local, ignore_errors=True)


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def load_checkpoint(
    folder: str | Path,
    load_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Restore model (`load_model(folder)`), optimizer, EMA and RNG in place; returns the trainer state."""
    folder = Path(folder)
    load_model(folder)
    state = json.loads((folder / STATE_NAME).read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    ref = optimizer.state_dict()
    groups = [
        {**g_saved, "params": g_ref["params"]} for g_saved, g_ref in zip(state["param_groups"], ref["param_groups"])
    ]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    np.random.set_state(("MT19937", np.array(state["rng_numpy"], dtype=np.uint32), state["rng_numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["rng_python"]), None))
    if ema is not None and (folder / "ema.safetensors").exists():
        for k, v in load_file(str(folder / "ema.safetensors")).items():
            ema[k].copy_(v)
    return state
