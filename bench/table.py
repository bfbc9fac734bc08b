"""The Iceberg table output's costs that grow with history, against the prefix output's ledger, same run.

After 1, 10, 100 and 1,000 runs of 1,000 inputs (simulated runs: hand-made prediction rows committed through
the real code, a SQLite catalog and a local warehouse folder for the table, a local folder for the prefix):
  plan    "what is new" for a listing of 1,000 inputs (the last run's 500 again and 500 new): the table's
          pushed-down projection (`snapshots.seen` + `ledger.todo`) against the ledger (`read_ledger` + todo),
          each in a fresh process: seconds and its peak RSS
  commit  one more run's commit: `snapshots.commit` (one snapshot, validated) against the prefix's
          ledger append (`append_ledger`; the prefix's part copies are bench/publish.py's)
Images/s with --table against the prefix output (the goal >= 0.95) is bench/infer.py --table.

  python bench/table.py
  python bench/table.py --runs 1 10 100 1000 --per-run 1000
"""

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHA = "cd" * 32

PLAN_TABLE = """
import sys, time
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
import pyarrow as pa
from pipeline.inference import ledger
from pipeline.inference.iceberg import catalog, snapshots
n, per = int(sys.argv[3]), int(sys.argv[4])
listed = [f"s3://in/r{n + k // (per // 2):05d}/{k % (per // 2):05d}.jpg" for k in range(per)]
listed = pa.table({"image_uri": listed, "input_version": ["1:1"] * per})
t = time.perf_counter()
table = catalog.open_catalog(sys.argv[1], sys.argv[2]).load_table("bench.preds")
held = snapshots.seen(table, table.current_snapshot().snapshot_id, sys.argv[5], only=listed["image_uri"].to_pylist())
todo = listed.filter(ledger.todo(held, listed))
print(time.perf_counter() - t, hwm(), todo.num_rows, flush=True)
import os; os._exit(0)
"""
PLAN_PREFIX = """
import sys, time
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
import pyarrow as pa
from pipeline.inference import ledger, outputs
n, per = int(sys.argv[2]), int(sys.argv[3])
listed = [f"s3://in/r{n + k // (per // 2):05d}/{k % (per // 2):05d}.jpg" for k in range(per)]
listed = pa.table({"image_uri": listed, "input_version": ["1:1"] * per})
t = time.perf_counter()
held = ledger.read_ledger(outputs.Layout.of(sys.argv[1]), sys.argv[4], only=listed["image_uri"])
todo = listed.filter(ledger.todo(held, listed))
print(time.perf_counter() - t, hwm(), todo.num_rows, flush=True)
import os; os._exit(0)
"""


def _measure(script: str, *args: str) -> tuple[float, float, int]:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    t, rss, n = out.stdout.split()
    return float(t), float(rss), int(n)


def _rows(r: int, per: int):
    from pipeline.inference.rows import output_schema

    schema = output_schema(False)
    n = per
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols.update(
        image_uri=pa.array([f"s3://in/r{r:05d}/{i:05d}.jpg" for i in range(n)]),
        pred_id=pa.array([1] * n, pa.int64()),
        input_version=pa.array(["1:1"] * n),
        model_uri=pa.array(["m"] * n),
        model_sha256=pa.array([SHA] * n),
        run_id=pa.array([f"r{r:05d}"] * n),
        inferred_at=pa.array([dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)] * n, pa.timestamp("us", tz="UTC")),
    )
    return pa.table([cols[f.name].cast(f.type) for f in schema], schema=schema)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, nargs="+", default=[1, 10, 100, 1000])
    ap.add_argument("--per-run", type=int, default=1000)
    args = ap.parse_args()
    from pipeline.inference import ledger, outputs, publish
    from pipeline.inference.iceberg import catalog, snapshots

    with tempfile.TemporaryDirectory(prefix="bench-table-") as tmp:
        spec, wh = f"sqlite:///{tmp}/catalog.db", f"file://{tmp}/warehouse"
        cat = catalog.open_catalog(spec, wh)
        table = catalog.open_table(cat, "bench.preds", embeddings=False)
        layout = outputs.Layout.of(f"{tmp}/prefix")
        print(f"{args.per_run} inputs per run; plan = 'what is new' for {args.per_run} listed, in a fresh process")
        for r in range(1, max(args.runs) + 1):
            rows = _rows(r, args.per_run)
            path = f"{table.location()}/data/vitray-run=r{r:05d}/part-0.parquet"
            Path(path.removeprefix("file://")).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(rows, path.removeprefix("file://"))
            part = Path(tmp) / f"part-{r}.parquet"
            pq.write_table(rows, part)
            props = {snapshots.RUN_ID: f"r{r:05d}", snapshots.MODEL_SHA: SHA, snapshots.MARKS: json.dumps({})}
            t = time.perf_counter()
            table = cat.load_table("bench.preds")
            snapshots.commit(
                cat, "bench.preds", table, [path], props, {}, rows.select(["image_uri", "input_version"]), SHA
            )
            commit_table = time.perf_counter() - t
            intent = publish.Intent(f"r{r:05d}", "", [["", str(part)]], None, True, {"model_sha256": SHA}, fence=r)
            t = time.perf_counter()
            ledger.append_ledger(layout, intent)
            commit_prefix = time.perf_counter() - t
            part.unlink()
            if r in args.runs:
                pt, prss, pn = _measure(PLAN_TABLE, spec, wh, str(r), str(args.per_run), SHA)
                lt, lrss, ln = _measure(PLAN_PREFIX, layout.output.uri, str(r), str(args.per_run), SHA)
                assert pn == ln == args.per_run // 2, (pn, ln)  # both find the same 500 new inputs
                print(
                    f"after {r:4d} runs: plan table {pt * 1000:7.1f} ms {prss:6.0f} MB | ledger {lt * 1000:7.1f} ms "
                    f"{lrss:6.0f} MB | ratio {pt / lt:5.2f}x  ||  commit table {commit_table * 1000:6.1f} ms | "
                    f"ledger append {commit_prefix * 1000:6.1f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
