"""Session fixtures: the real local stack (SeaweedFS S3 + Ray head), a Ray connection, a bucket per test.

Ray sizing, and the fix chosen for the Ray Data + Ray Train starvation on 2 cores: the head node is
started with twice the cores as CPU slots (4 here, `cluster/local/stack.py`), so two training
workers at 1 CPU each still leave 2 slots for Ray Data's read/decode tasks. Ray CPUs are
scheduling slots, not cores; the jobs also refuse a run that would leave Ray Data no CPU.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The local stack's Ray runs in single-machine mode (loopback only); a client must be in it too, and Ray reads
# it when imported, which may happen before the stack fixture sets the stack's variables.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
STACK_SCRIPT = ROOT / "cluster" / "local" / "stack.py"


def pytest_configure(config):
    """Each session's tmp_path folders under a base of its own, removed at its end: pytest's shared
    `pytest-of-<user>` base keeps only the newest sessions, so a second session on the machine (a CI run
    beside a developer's) would delete the first one's folders under its running tests."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        import tempfile

        config.option.basetemp = tempfile.mkdtemp(prefix="vitray-pytest-")
        config._vitray_basetemp = config.option.basetemp


def pytest_unconfigure(config):
    base = getattr(config, "_vitray_basetemp", None)
    if base:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def _stack_module():
    spec = importlib.util.spec_from_file_location("vitray_stack", STACK_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_stack(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STACK_SCRIPT), cmd], capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="session")
def stack():
    """Start the local stack (or reuse one that runs); stop it at the end only if we started it."""
    started = run_stack("status").returncode != 0
    if started:
        up = run_stack("up")
        assert up.returncode == 0, f"local stack failed to start:\n{up.stdout}\n{up.stderr}"
    env = _stack_module().env_vars()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if started:
        run_stack("down")


@pytest.fixture(scope="session")
def ray_cluster(stack):
    import ray

    if not ray.is_initialized():  # make_shards (a Ray Data job) may have connected this process already
        ray.init(address=stack["RAY_ADDRESS"], log_to_driver=False, include_dashboard=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def bucket(stack):
    """A fresh, empty bucket for one test: `s3://<name>`."""
    from pipeline.core import storage

    name = f"t-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=name)
    yield f"s3://{name}"
    try:
        storage.delete(f"s3://{name}", recursive=True)
        storage.s3_client().delete_bucket(Bucket=name)
    except Exception:
        pass


@pytest.fixture
def digits_images(tmp_path):
    """A small class-folder tree of real images: scikit-learn's handwritten digits as PNG files."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "digits"
    for i in range(60):
        label = int(d.target[i])
        img = (d.images[i] * (255 / 16)).astype(np.uint8)
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((32, 32), Image.NEAREST).convert("RGB").save(folder / f"d{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def digits_shards(stack):
    """The embedded digits, sharded once per session into a bucket of their own: the manifest URI."""
    from pipeline.core import storage
    from pipeline.data import shard_writer

    name = f"digits-{uuid.uuid4().hex[:8]}"
    storage.s3_client().create_bucket(Bucket=name)
    m = shard_writer.make_shards(
        "digits", f"s3://{name}/digits", val_fraction=0.1, seed=0, shard_size=256, progress=False, executor="local"
    ).manifest
    assert (m.splits["train"].count, m.splits["val"].count) == (1618, 179)  # as every version before
    return f"s3://{name}/digits/manifest.json"


@pytest.fixture(scope="session")
def trained_digits(ray_cluster, digits_shards):
    """The demo config trained once (about 100 s on 2 cores): (summary, manifest URI, output URI)."""
    import yaml

    from pipeline.training import trainer
    from pipeline.training.train_config import PretrainConfig

    cfg = yaml.safe_load((ROOT / "configs" / "digits_demo.yaml").read_text())
    cfg["data"]["manifest"] = digits_shards
    cfg["train"]["output"] = digits_shards.rsplit("/", 2)[0] + "/runs"
    summary = trainer.run(PretrainConfig.model_validate(cfg))
    return summary, digits_shards, cfg["train"]["output"]


@pytest.fixture
def model_uri(bucket):
    """A tiny exported classifier in the test's bucket (cat, dog, eel), with non-default preprocessing."""
    import torch

    import vit_model
    from pipeline.core import storage

    torch.manual_seed(0)
    # preprocessing other than the defaults (crop, interpolation, mean/std): inference must use the export's
    m = vit_model.create_model(
        "vit_micro_patch4_32",
        num_classes=3,
        crop_pct=0.6,
        interpolation="bilinear",
        mean=vit_model.IMAGENET_MEAN,
        std=vit_model.IMAGENET_STD,
    )
    with torch.no_grad():
        m.head.weight.normal_()
    w, c = vit_model.export_bytes(m, class_names=["cat", "dog", "eel"])
    storage.write_bytes(f"{bucket}/model/model.safetensors", w)
    storage.write_bytes(f"{bucket}/model/config.json", c)
    return f"{bucket}/model"
