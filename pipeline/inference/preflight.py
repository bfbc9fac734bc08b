"""What batch inference checks and reads before it writes anything: the arguments, the model (its bytes read
once, by the driver: every replica gets exactly these), the buckets, and the outputs' place beside the input."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.core import exported, storage
from pipeline.inference.infer_config import InferConfig
from pipeline.inference.inputs import is_shards
from vit_model import ViTConfig


@dataclass(frozen=True)
class LoadedModel:
    """What the driver checked and read before writing anything: the model's bytes, read once."""

    weights: bytes  # model.safetensors
    config: str  # config.json
    weights_sha256: str
    model_cfg: ViTConfig  # preprocessing (mean/std, crop, interpolation) included
    class_names: list[str]


def preflight(cfg: InferConfig) -> LoadedModel:
    """Everything that can be checked without writing: arguments, the model (read once here), buckets."""
    for name in ("model", "input", "table" if cfg.table else "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    if cfg.table and cfg.output:
        raise ValueError("--table and --output are two outputs: give one (the prefix of Parquet runs, or the table)")
    weights, config = exported.read(cfg.model)
    json.loads(config)  # a config.json that does not parse is refused here, before any cluster work
    storage.check_bucket(cfg.input)
    if cfg.output:
        storage.check_bucket(cfg.output)
    if cfg.output and inside(cfg.output, cfg.input):
        raise ValueError(
            f"--output {cfg.output} is inside --input {cfg.input}: the published parts would be listed as inputs "
            "by the next run. Put the output beside the input, e.g. s3://bucket/predictions next to s3://bucket/images"
        )
    if cfg.input_append_only and not cfg.since_last_run:
        raise ValueError("--input-append-only needs --since-last-run (it lists what came after the last run)")
    if cfg.since_last_run and is_shards(cfg.input):
        raise ValueError("--since-last-run works on image prefixes, not on shards (shards are immutable data sets)")
    model_cfg = exported.model_config(config)  # this project's export or a timm folder; preprocessing included
    return LoadedModel(weights, config, hashlib.sha256(weights).hexdigest(), model_cfg, exported.class_names(config))


def inside(child: str, parent: str) -> bool:
    c, p = storage.parse_uri(child), storage.parse_uri(parent)
    if c.scheme != p.scheme:
        return False
    cp, pp = c.path.rstrip("/"), p.path.rstrip("/")
    return cp == pp or cp.startswith(pp + "/")
