"""End to end through the local stack, as a user runs it: the quickstart's path and `ray job submit`."""

import json
import subprocess
import sys
import uuid

import pytest

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_quickstart_reduced(stack):
    """shards -> `ray job submit` pretrain -> batch inference -> Parquet read back, accuracy from it."""
    bucket = f"qs-{uuid.uuid4().hex[:8]}"
    r = subprocess.run([sys.executable, "cluster/local/quickstart.py", "--bucket", bucket, "--epochs", "3",
                        "--name", "e2e", "--config", "configs/digits_demo.yaml"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted successfully" in r.stdout + r.stderr
    summary = json.loads((ROOT / ".state" / "quickstart.json").read_text())
    assert summary["rows"] == 179  # every held-out digit has a prediction row
    assert summary["parquet_top1"] == pytest.approx(summary["val_top1"], abs=1.5 / 179)
    assert summary["parquet_top1"] > 0.2  # 3 epochs learn something; 10% is chance
    assert "val top-1 (Parquet)" in r.stdout and "make down" in r.stdout


@pytest.mark.e2e
def test_ray_job_submit_smoke_config(stack, digits_shards, bucket):
    env_vars = {**__import__("os").environ, **stack}
    r = subprocess.run([str(ROOT / ".venv/bin/ray") if (ROOT / ".venv/bin/ray").exists() else "ray", "job", "submit",
                        "--address", stack["VITRAY_DASHBOARD"], "--working-dir", ".",
                        "--runtime-env-json", json.dumps({"excludes": [".venv", ".state", ".git"]}), "--",
                        "python", "jobs/pretrain.py", "--config", "configs/smoke.yaml", "--data", digits_shards,
                        "--output", f"{bucket}/runs", "--name", "submitted"],
                       cwd=ROOT, env=env_vars, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "succeeded" in out and "best val top-1" in out
    from pipeline import storage

    assert storage.exists(f"{bucket}/runs/submitted/model/model.safetensors")
