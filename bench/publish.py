"""Publishing costs that grow with a run and with history, each against the way it was done before, in the
same run. Needs `make up` for (a).

(a) The visibility window: seconds from the first published part of a run to its `_SUCCESS`, the only
    time a plain glob reader can see part of a run (readers that honour `_SUCCESS` never do), for 100
    and 2,000 parts on the local S3 server: the concurrent roll-forward against the old serial one (a
    HEAD and a managed copy per part, one after another).
(b) The driver's cost of --since-last-run after 1, 10, 100 and 1,000 runs of 1,000 inputs (simulated runs
    through the real ledger code, local folder): the appended, compacted ledger read as Arrow and the
    mask over 1,000 listed inputs, against one ledger object read into a Python set (before); peak RSS
    of a fresh process doing only that, and the read time.

  python bench/publish.py
  python bench/publish.py --parts 100 2000 --runs 1 10 100 1000
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SHA = "cd" * 32


def _part(n_rows: int, tag: str) -> bytes:
    buf = io.BytesIO()
    pq.write_table(
        pa.table({"image_uri": [f"s3://in/{tag}/{i}.jpg" for i in range(n_rows)], "pred_id": [1] * n_rows}), buf
    )
    return buf.getvalue()


def _window(out: str, n: int, serial: bool) -> float:
    """Seconds from the first part copied to `_SUCCESS` written, committing `n` staged parts under `out`."""
    from pipeline.core import storage
    from pipeline.core.lease import Lease
    from pipeline.inference import outputs, publish

    layout = outputs.Layout.of(out)
    data = _part(20, "x")
    staged = [layout.staging("r").join(f"part-{i:06d}-w-0{outputs.STAGED_SUFFIX}").uri for i in range(n)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda u: storage.write_bytes(u, data), staged))
    intent = publish.plan_commit(
        layout, "r", "2026-12-03", staged, accuracy_report=None, ledger=False, rows=20 * n, inputs=20 * n,
        errors=0, model_sha256=SHA,
    )  # fmt: skip
    first = {}
    real_copy, real_parts = storage.copy, publish._copy_parts

    def timed_copy(src, dst, **kw):
        ok = real_copy(src, dst, **kw)
        first.setdefault("t", time.perf_counter())
        return ok

    def serial_parts(intent, lease):  # what roll_forward did before: a HEAD and a managed copy per part
        for s, d in intent.parts:
            lease.check()
            if storage.exists(s):
                src, dst = storage.parse_uri(s), storage.parse_uri(d)
                storage.s3_client().copy({"Bucket": src.bucket, "Key": src.key}, dst.bucket, dst.key)
                first.setdefault("t", time.perf_counter())
        return []

    storage.copy = timed_copy
    if serial:
        publish._copy_parts = serial_parts
    try:
        with Lease(out, "bench", ttl_s=600) as lease:
            publish.commit(layout, intent, lease)
            done = time.perf_counter()
    finally:
        storage.copy, publish._copy_parts = real_copy, real_parts
    assert storage.exists(f"{intent.run_dir}/_SUCCESS")
    return done - first["t"]


def visibility(parts_counts: list[int]) -> None:
    import local_stack

    local_stack.env()
    from pipeline.core import storage

    bucket = f"bench-publish-{uuid.uuid4().hex[:6]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    try:
        for n in parts_counts:
            before = _window(f"s3://{bucket}/{n}-serial", n, serial=True)
            now = _window(f"s3://{bucket}/{n}-concurrent", n, serial=False)
            print(
                f"{n:5d} parts: first part visible -> _SUCCESS: serial HEAD+copy (before) {before:6.2f} s | "
                f"concurrent copies (now) {now:6.2f} s | ratio {before / now:5.1f}x",
                flush=True,
            )
    finally:
        storage.delete(f"s3://{bucket}", recursive=True)
        storage.s3_client().delete_bucket(Bucket=bucket)


READ_NOW = """
import sys, time
def hwm():  # peak RSS of this process alone, MB (ru_maxrss would include the parent's, kept across exec)
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
import pyarrow as pa
from pipeline.inference import ledger, outputs, publish
layout = outputs.Layout.of(sys.argv[1])
n = int(sys.argv[3])  # the listing: the last run's inputs again, and 500 new ones (keys appended in order)
listed = [f"s3://in/r{n + k // 500:05d}/{k % 500:05d}.jpg" for k in range(1000)]
listed = pa.table({"image_uri": listed, "input_version": ["1:1"] * 1000})
t = time.perf_counter()
seen = ledger.read_ledger(layout, sys.argv[2], only=listed["image_uri"])
mask = ledger.todo(seen, listed)
print(time.perf_counter() - t, hwm(), seen.num_rows, flush=True)
import os; os._exit(0)  # pyarrow's pools at interpreter exit can abort ("terminate called"): not what is measured
"""
READ_BEFORE = """
import io, sys, time
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
import pyarrow.parquet as pq
t = time.perf_counter()
table = pq.read_table(io.BytesIO(open(sys.argv[1], "rb").read()))
done = set(table["image_uri"].to_pylist())
n = int(sys.argv[2])
listed = [f"s3://in/r{n + k // 500:05d}/{k % 500:05d}.jpg" for k in range(1000)]
todo = [u for u in listed if u not in done]
print(time.perf_counter() - t, hwm(), len(done), flush=True)
import os; os._exit(0)
"""


def _measure(script: str, *args: str) -> tuple[float, float, int]:
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    t, rss, n = out.stdout.split()
    return float(t), float(rss), int(n)


def ledger_growth(run_counts: list[int], per_run: int) -> None:
    from pipeline.inference import ledger, outputs, publish

    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
        layout = outputs.Layout.of(f"{tmp}/out")
        part = Path(tmp) / "part.parquet"
        single = Path(tmp) / "before.ledger"
        before_rows = []
        t0 = time.perf_counter()
        for r in range(1, max(run_counts) + 1):
            rows = pa.table(
                {
                    "image_uri": [f"s3://in/r{r:05d}/{i:05d}.jpg" for i in range(per_run)],
                    "error": pa.nulls(per_run, pa.string()),
                    "input_version": ["1:1"] * per_run,
                }
            )
            pq.write_table(rows, part)
            intent = publish.Intent(f"r{r:05d}", "", [["", str(part)]], None, True, {"model_sha256": SHA}, fence=r)
            ledger.append_ledger(layout, intent)
            before_rows.append(rows.select(["image_uri", "error"]))
            if r in run_counts:
                pq.write_table(pa.concat_tables(before_rows), single)  # the one object the old ledger was
                now = _measure(READ_NOW, layout.output.uri, SHA, str(r))
                old = _measure(READ_BEFORE, str(single), str(r))
                objects = len(outputs.files_under(layout.ledger_dir(SHA)))
                print(
                    f"after {r:5d} runs of {per_run} ({now[2]:4d} of 1,000 known): Arrow ledger "
                    f"({objects:2d} objects) read+mask "
                    f"{now[0] * 1000:7.1f} ms, peak RSS {now[1]:6.0f} MB | one object into a Python set (before) "
                    f"{old[0] * 1000:7.1f} ms, {old[1]:6.0f} MB | time ratio {old[0] / now[0]:4.1f}x, "
                    f"RSS ratio {old[1] / now[1]:4.2f}x",
                    flush=True,
                )
        print(f"(simulating {max(run_counts)} commits of the ledger took {time.perf_counter() - t0:.0f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, nargs="*", default=[100, 2000])
    ap.add_argument("--runs", type=int, nargs="*", default=[1, 10, 100, 1000])
    ap.add_argument("--per-run", type=int, default=1000)
    args = ap.parse_args()
    if args.parts:
        visibility(args.parts)
    if args.runs:
        ledger_growth(args.runs, args.per_run)
    print(json.dumps({"parts": args.parts, "runs": args.runs}))


if __name__ == "__main__":
    main()
