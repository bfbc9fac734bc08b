"""The quickstart: the whole system on this machine, end to end (`make demo`).

local stack up (SeaweedFS S3 + Ray head)
-> shards of scikit-learn's digits into s3://vitray/digits
-> `ray job submit` jobs/pretrain.py with configs/digits_demo.yaml
-> jobs/batch_infer.py on the held-out images -> Parquet, read back with pyarrow
-> jobs/visualize.py figures
-> a summary. Safe to re-run: the same run name resumes (a finished run only re-exports).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.runs import RunLayout

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PY = sys.executable
RAY = str(Path(PY).parent / "ray")


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def sh(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(args, env=env, cwd=ROOT, **kw)
    if r.returncode:
        sys.exit(f"quickstart: `{' '.join(args[:4])} ...` failed with code {r.returncode}")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bucket", default="vitray", help="bucket in the local S3 server")
    ap.add_argument("--config", default="configs/digits_demo.yaml")
    ap.add_argument("--name", default="digits-demo", help="run name (re-use resumes)")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()

    step("local stack: SeaweedFS S3 + Ray head on 127.0.0.1")
    sh([PY, "cluster/local/stack.py", "up"], os.environ.copy())
    import importlib.util

    spec = importlib.util.spec_from_file_location("stack", ROOT / "cluster/local/stack.py")
    stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack)
    env = {**os.environ, **stack.env_vars(), "PYTHONUNBUFFERED": "1"}
    os.environ.update(stack.env_vars())
    from pipeline.core import storage
    from pipeline.inference import outputs

    client = storage.s3_client()
    if args.bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=args.bucket)
    base = f"s3://{args.bucket}"

    step(f"shards of the embedded digits -> {base}/digits")
    sh([PY, "jobs/make_shards.py", "--source", "digits", "--output", f"{base}/digits", "--shard-size", "256"], env)

    step("pretraining, submitted with `ray job submit`")
    entry = [
        "python",
        "jobs/pretrain.py",
        "--config",
        args.config,
        "--data",
        f"{base}/digits/manifest.json",
        "--output",
        f"{base}/runs",
        "--name",
        args.name,
    ]
    if args.epochs:
        entry += ["--epochs", str(args.epochs)]
    runtime_env = {"excludes": [".venv", ".state", ".git", "out", "*.egg-info", "__pycache__"]}
    t_train = time.time()
    sh(
        [
            RAY,
            "job",
            "submit",
            "--address",
            env["VITRAY_DASHBOARD"],
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            *entry,
        ],
        env,
    )
    train_s = time.time() - t_train
    run = f"{base}/runs/{args.name}"
    metrics = RunLayout.at(run).read_metrics()
    val = [m["val_top1"] for m in metrics if "val_top1" in m]
    ips = [m["images_per_s"] for m in metrics if "images_per_s" in m]

    step("batch inference on the held-out images -> Parquet")
    preds = f"{base}/predictions/{args.name}"
    sh(
        [
            PY,
            "jobs/batch_infer.py",
            "--model",
            f"{run}/model",
            "--input",
            f"{base}/digits/manifest.json",
            "--split",
            "val",
            "--output",
            preds,
        ],
        env,
    )
    table = outputs.read_published(preds)
    latest = table.filter(
        __import__("pyarrow.compute", fromlist=["x"]).equal(table["run_id"], max(table["run_id"].to_pylist()))
    )
    rows = latest.to_pylist()
    parquet_top1 = sum(r["label_id"] == r["pred_id"] for r in rows) / max(len(rows), 1)

    step("the same predictions into the embedded Iceberg table (SQLite catalog in .state/, files in S3)")
    table_name = "preds." + args.name.replace("-", "_")
    infer = [PY, "jobs/batch_infer.py", "--model", f"{run}/model", "--input", f"{base}/digits/manifest.json"]
    sh([*infer, "--split", "val", "--table", table_name], env)  # a re-run adds a snapshot, as it adds a run=
    from pipeline.inference.iceberg.catalog import open_catalog

    held = open_catalog(env["VITRAY_CATALOG"], env["VITRAY_WAREHOUSE"]).load_table(table_name)
    table_rows = held.scan(selected_fields=("image_uri",)).to_arrow().num_rows

    figures = None
    if not args.no_figures and (ROOT / "jobs/visualize.py").exists():
        step("figures of what the model learned")
        figures = f"{run}/figures"
        sh(
            [
                PY,
                "jobs/visualize.py",
                "--model",
                f"{run}/model",
                "--images",
                f"{base}/digits/manifest.json",
                "--output",
                figures,
                "--run",
                run,
            ],
            env,
        )

    print("\n" + "=" * 72)
    print(f"val top-1 (training)     {val[-1] * 100:.2f}% after {len(val)} epochs" if val else "val top-1: n/a")
    print(f"val top-1 (Parquet)      {parquet_top1 * 100:.2f}% over {len(rows)} held-out images")
    print(f"training images/s        {ips[-1]:.0f} (last report), {train_s:.0f} s for the job")
    print(f"checkpoints and model    {run}/  (model/, best/, checkpoint_*/)")
    print(f"predictions (Parquet)    {preds}/dt=*/run=*/part-*.parquet")
    query = f"source .state/env; python jobs/table.py show {table_name}"
    print(f"predictions (Iceberg)    {table_name}, {table_rows} rows: {query}")
    if figures:
        print(f"figures                  {figures}/")
    print(f"browse                   source .state/env; aws s3 ls --recursive {base}/  (or pyarrow)")
    print(f"dashboard                {env['VITRAY_DASHBOARD']}")
    print("stop the stack           make down")
    print(f"total                    {time.time() - t0:.0f} s")
    print("=" * 72)
    summary = {
        "val_top1": val[-1] if val else None,
        "parquet_top1": parquet_top1,
        "rows": len(rows),
        "run": run,
        "predictions": preds,
        "table": table_name,
        "table_rows": table_rows,
    }
    (ROOT / ".state" / "quickstart.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
