"""What one scheduled run pays for the prefix output's ledger as its history grows (#38 item 8).

After 1, 100 and 1,000 simulated runs of 1,000 new inputs each (rows committed through the real
`append_ledger`, compactions included, a local folder or `--output s3://...`), each in a fresh process:
  plan      `read_ledger(only=<a listing of 1,000>)`: the row groups that can hold them
  marks     `high_water_marks`: the objects' footers
  transient `transient_failures`: the base's side object and the deltas
against the baseline measured in the same process, the whole ledger read (`read_ledger()`), which is what
each of the three cost before: seconds and peak RSS. Also the slowest append (a compaction) so far.

  python bench/ledger.py
  python bench/ledger.py --runs 1 100 1000 --per-run 1000 --output s3://bucket/bench-ledger
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHA = "ef" * 32

MEASURE = """
import sys, time
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
import pyarrow as pa
from pipeline.inference import ledger, outputs
layout, n, per, what = outputs.Layout.of(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
listed = pa.array([f"s3://in/r{n:05d}/{k:05d}.jpg" for k in range(per // 2)]
                  + [f"s3://in/r{n + 1:05d}/{k:05d}.jpg" for k in range(per // 2)])
t = time.perf_counter()
if what == "plan":
    got = ledger.read_ledger(layout, sys.argv[5], only=listed).num_rows
elif what == "marks":
    got = len(ledger.high_water_marks(layout, sys.argv[5]))
elif what == "transient":
    got = len(ledger.transient_failures(layout, sys.argv[5]))
else:
    got = ledger.read_ledger(layout, sys.argv[5]).num_rows
print(time.perf_counter() - t, hwm(), got, flush=True)
import os; os._exit(0)
"""


def _measure(*args: str) -> tuple[float, float, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    t, rss, n = out.stdout.split()
    return float(t), float(rss), int(n)


def _rows(r: int, per: int) -> pa.Table:
    kinds = ["transient" if i % 100 == 0 else None for i in range(per)]  # 1% fail transiently
    return pa.table(
        {
            "image_uri": [f"s3://in/r{r:05d}/{i:05d}.jpg" for i in range(per)],
            "error": [k and "timed out" for k in kinds],
            "error_kind": kinds,
            "input_version": ["1:1"] * per,
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, nargs="+", default=[1, 100, 1000])
    ap.add_argument("--per-run", type=int, default=1000)
    ap.add_argument("--output", default=None, help="default: a temporary local folder")
    args = ap.parse_args()
    from pipeline.core import storage
    from pipeline.inference import ledger, outputs, publish

    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        out = args.output or f"{tmp}/prefix"
        layout = outputs.Layout.of(out)
        print(f"{args.per_run} inputs per run into {out}; each figure from a fresh process", flush=True)
        slowest = 0.0
        for r in range(1, max(args.runs) + 1):
            part = Path(tmp) / "part.parquet"
            pq.write_table(_rows(r, args.per_run), part)
            success = {"model_sha256": SHA, "listed_through": {"s3://in": f"s3://in/r{r:05d}/"}}
            t = time.perf_counter()
            ledger.append_ledger(layout, publish.Intent(f"r{r:05d}", "", [["", str(part)]], None, True, success, r))
            slowest = max(slowest, time.perf_counter() - t)
            if r in args.runs:
                wt, wrss, wn = _measure(out, str(r), str(args.per_run), "whole", SHA)
                cells = []
                for what in ("plan", "marks", "transient"):
                    st, srss, _ = _measure(out, str(r), str(args.per_run), what, SHA)
                    cells.append(f"{what} {st * 1000:7.1f} ms {srss:5.0f} MB ({wt / max(st, 1e-9):5.1f}x faster)")
                print(
                    f"after {r:4d} runs ({wn:8d} rows): whole ledger {wt * 1000:7.1f} ms {wrss:5.0f} MB | "
                    + " | ".join(cells)
                    + f" | slowest append so far {slowest * 1000:6.0f} ms",
                    flush=True,
                )
        if args.output:
            storage.delete(out, recursive=True)


if __name__ == "__main__":
    main()
