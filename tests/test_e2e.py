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
    r = subprocess.run(
        [
            sys.executable,
            "cluster/local/quickstart.py",
            "--bucket",
            bucket,
            "--epochs",
            "3",
            "--name",
            "e2e",
            "--config",
            "configs/digits_demo.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted successfully" in r.stdout + r.stderr
    summary = json.loads((ROOT / ".state" / "quickstart.json").read_text())
    assert summary["rows"] == 179  # every held-out digit has a prediction row
    assert summary["parquet_top1"] == pytest.approx(summary["val_top1"], abs=1.5 / 179)
    assert summary["parquet_top1"] > 0.2  # 3 epochs learn something; 10% is chance
    assert "make down" in r.stdout
    # The published Parquet read back here, by pyarrow's own S3 reader (not the quickstart's code): one
    # row per held-out digit, each with a label, and the top-1 the summary printed is the one it holds.
    import re

    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=stack["AWS_ACCESS_KEY_ID"],
        secret_key=stack["AWS_SECRET_ACCESS_KEY"],
        endpoint_override=stack["AWS_ENDPOINT_URL"].split("://", 1)[1],
        scheme="http",
        region="us-east-1",
    )
    table = pads.dataset(
        summary["predictions"].removeprefix("s3://"), filesystem=fs, format="parquet", partitioning="hive"
    ).to_table(columns=["image_uri", "label_id", "pred_id"])
    assert table.num_rows == 179 and len(set(table.column("image_uri").to_pylist())) == 179
    labels, preds = table.column("label_id").to_pylist(), table.column("pred_id").to_pylist()
    assert None not in labels and None not in preds
    top1 = sum(a == b for a, b in zip(labels, preds)) / 179
    printed = re.search(r"val top-1 \(Parquet\)\s+([\d.]+)% over (\d+) held-out images", r.stdout)
    assert printed, r.stdout[-2000:]
    assert float(printed.group(1)) == pytest.approx(top1 * 100, abs=0.005) and int(printed.group(2)) == 179
    # the same predictions in the embedded Iceberg table, and the query command the summary prints works
    printed = re.search(
        r"predictions \(Iceberg\)\s+(\S+), (\d+) rows: source \.state/env; (python jobs/table\.py .*)", r.stdout
    )
    assert printed and printed.group(1) == summary["table"] == "preds.e2e", r.stdout[-2000:]
    shown = subprocess.run(
        [sys.executable, *printed.group(3).split()[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0 and "+179" in shown.stdout, shown.stdout + shown.stderr


@pytest.mark.e2e
def test_ray_job_submit_smoke_config(stack, digits_shards, bucket):
    env_vars = {**__import__("os").environ, **stack}
    r = subprocess.run(
        [
            str(ROOT / ".venv/bin/ray") if (ROOT / ".venv/bin/ray").exists() else "ray",
            "job",
            "submit",
            "--address",
            stack["VITRAY_DASHBOARD"],
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps({"excludes": [".venv", ".state", ".git"]}),
            "--",
            "python",
            "jobs/pretrain.py",
            "--config",
            "configs/smoke.yaml",
            "--data",
            digits_shards,
            "--output",
            f"{bucket}/runs",
            "--name",
            "submitted",
        ],
        cwd=ROOT,
        env=env_vars,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "succeeded" in out and "best val top-1" in out
    from pipeline.core import storage

    assert storage.exists(f"{bucket}/runs/submitted/model/model.safetensors")


@pytest.mark.e2e
def test_a_28px_data_set_in_class_folders_goes_through_all_three_jobs_with_the_defaults(stack, bucket, tmp_path):
    """Real handwritten digits at MNIST's 28 px, as class folders in S3: make_shards, pretrain and
    batch_infer, each a subprocess with its defaults (only the smoke config's short schedule)."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.core import storage
    from pipeline.inference import outputs

    digits = load_digits()
    for i, (img, label) in enumerate(zip(digits.images[:400], digits.target[:400])):
        pixels = (img * (255.0 / 16.0)).round().astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(pixels).resize((28, 28), Image.BICUBIC).save(buf, "PNG")  # grayscale, like MNIST's PNGs
        storage.write_bytes(f"{bucket}/mnist28/{label}/{i:05d}.png", buf.getvalue())

    def job(script, *args):
        r = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
        return r.stdout

    out = job("make_shards.py", "--source", f"{bucket}/mnist28", "--output", f"{bucket}/shards", "--local")
    assert "400 images" in out and "0 skipped" in out, out
    job(
        "pretrain.py",
        "--config",
        "configs/smoke.yaml",
        "--data",
        f"{bucket}/shards/manifest.json",
        "--output",
        f"{bucket}/runs",
        "--name",
        "mnist28",
    )
    job(
        "batch_infer.py",
        "--model",
        f"{bucket}/runs/mnist28/model",
        "--input",
        f"{bucket}/mnist28",
        "--output",
        f"{bucket}/preds",
    )
    table = outputs.read_published(f"{bucket}/preds", columns=["image_uri", "label_id", "pred_id", "error"])
    assert table.num_rows == 400 and table.column("error").null_count == 400  # every image predicted
    assert set(table.column("label_id").to_pylist()) == set(range(10))  # the class folders are the labels
