"""Training checkpoints as safetensors + JSON (never pickle): model, optimizer, EMA, RNG, position.

A checkpoint folder:
  model.safetensors, config.json     the model, loadable by `vit_model.load_pretrained`
  optimizer.safetensors              AdamW moments ("state.<param index>.<name>") and RNG tensors
  ema.safetensors                    EMA weights, if enabled
  trainer_state.json                 step, epoch, step_in_epoch, best val top-1, optimizer hyper-
                                     parameters per group, numpy/python RNG states, metrics so far
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import vit_model

STATE_NAME = "trainer_state.json"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_checkpoint(folder: str | Path, model, optimizer: torch.optim.Optimizer, state: dict,
                    ema: dict[str, torch.Tensor] | None = None, class_names: list[str] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    core = _unwrap(model)
    vit_model.save_pretrained(core, folder, class_names=class_names or [])
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
    full = {**state, "param_groups": groups, "rng_numpy": np.random.get_state()[1].tolist(),
            "rng_numpy_pos": int(np.random.get_state()[2]), "rng_python": list(random.getstate()[1])}
    (folder / STATE_NAME).write_text(json.dumps(full, indent=1, default=_jsonable))
    return folder


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def load_checkpoint(folder: str | Path, model, optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor] | None = None) -> dict:
    """Restore model, optimizer, EMA and RNG in place; returns the trainer state (step, epoch, ...)."""
    folder = Path(folder)
    core = _unwrap(model)
    vit_model.load_weights(core, load_file(str(folder / "model.safetensors")))
    state = json.loads((folder / STATE_NAME).read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    ref = optimizer.state_dict()
    groups = [{**g_saved, "params": g_ref["params"]} for g_saved, g_ref in zip(state["param_groups"], ref["param_groups"])]
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
