"""An exported model on storage: one folder holding model.safetensors + config.json (never pickle).

The pretraining workers write them (`{run}/model/` and `{run}/best/`, where `RunLayout` says), batch
inference, the figures and `--init-from` read them through this module; the folder is also what timm
opens (`local-dir:`) and what `save_for_hf` writes, so either kind loads here.
"""

from __future__ import annotations

import json

import vit_model
from pipeline.core import storage
from vit_model.interop import CONFIG_NAME, WEIGHTS_NAME


def write(
    dest: str,
    model: vit_model.VisionTransformer,
    *,
    class_names: list[str],
    metrics: dict | None = None,
    train_config: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
    **metadata,
) -> str:
    """Export `model` to the folder `dest`; config.json goes last, so its presence means complete.

    `extra_files` (name -> bytes) go beside the weights (an MAE decoder); `metadata` into config.json."""
    loc = storage.parse_uri(dest)
    weights, config = vit_model.export_bytes(
        model,
        class_names=class_names,
        metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))},
        **({"train_config": train_config} if train_config else {}),
        **metadata,
    )
    for name, data in (extra_files or {}).items():
        storage.write_bytes(loc.join(name).uri, data)
    storage.write_bytes(loc.join(WEIGHTS_NAME).uri, weights)
    storage.write_bytes(loc.join(CONFIG_NAME).uri, config)
    return loc.uri


def read(uri: str) -> tuple[bytes, bytes]:
    """(weights, config) bytes of the model folder `uri`: this project's export, or a timm / Hugging Face
    folder (`save_for_hf`), both model.safetensors + config.json."""
    loc = storage.parse_uri(uri)
    try:
        config = storage.read_bytes(loc.join(CONFIG_NAME).uri)
        weights = storage.read_bytes(loc.join(WEIGHTS_NAME).uri, large=True)
    except storage.StorageError as e:
        pickled = [n for n in ("pytorch_model.bin", "model.pth") if storage.exists(loc.join(n).uri)]
        if pickled:
            raise storage.StorageError(
                f"{loc.uri} holds {pickled[0]} (a pickle, never loaded here) and no {WEIGHTS_NAME}: convert it once "
                "with `safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')`"
            ) from None
        raise storage.StorageError(
            f"no exported model at {loc.uri} (expected {WEIGHTS_NAME} + {CONFIG_NAME}): {e}"
        ) from None
    return weights, config


def model_config(config: bytes) -> vit_model.ViTConfig:
    """The architecture and preprocessing a model folder's config.json describes (either format)."""
    return vit_model.config_from_json(json.loads(config))


def class_names(config: bytes) -> list[str]:
    meta = json.loads(config)
    return vit_model.class_names_from_json(meta, model_config(config).num_classes)


def load_init_weights(model: vit_model.VisionTransformer, uri: str) -> None:
    """`--init-from`: a model folder (this project's export or timm's), one timm-layout .safetensors file,
    or the paper's JAX `.npz` (google-research/vision_transformer, big_vision). Position embeddings are
    resampled to the model's grid; the head (and a pre-logits layer the model lacks) is replaced when
    the class count differs (fine-tuning); any other mismatch names the tensor."""
    from safetensors.torch import load as st_load

    loc = storage.parse_uri(uri)
    if loc.uri.endswith(".npz"):
        state_dict, _ = vit_model.load_npz_bytes(storage.read_bytes(loc.uri, large=True))
    else:
        weights_uri = loc.uri if loc.uri.endswith(".safetensors") else loc.join(WEIGHTS_NAME).uri
        state_dict = st_load(storage.read_bytes(weights_uri, large=True))
    vit_model.load_weights(model, state_dict, drop_head=True)
