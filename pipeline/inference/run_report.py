"""What a batch-inference run measured and says: stage timings, Ray Data operator seconds, the first
batch, rows/errors/accuracy of what was staged, and the summary a person reads at the end.
"""

from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core import storage
from pipeline.inference import outputs

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


_STAGE_NAMES = [
    ("fetch_and_preprocess", "read+decode"),
    ("preprocess", "decode"),
    ("Predictor", "model"),
    ("Write", "write"),
    ("FromItems", "list"),
    ("read_shards", "read"),
    ("shard_rows", "read"),
    ("Read", "read"),
]


def operator_seconds(stats: str) -> dict[str, float]:
    """Task-seconds per Ray Data operator (the sum of its tasks' wall time), from `Dataset.stats()`:
    where a run's time went, stage by stage (read + decode, model, write)."""
    out: dict[str, float] = {}
    for m in re.finditer(
        r"Operator \d+ (?P<name>[^:\n]+):[^\n]*\n\* Remote wall time:[^\n]*?(?P<v>[\d.]+)(?P<u>us|ms|s) total", stats
    ):
        # fused operators (on CPU, Ray Data runs the decode inside the model actor) keep every part's name
        parts = []
        for part in m.group("name").strip().split("->"):
            word = next((v for k, v in _STAGE_NAMES if k in part), part)
            if word not in parts:
                parts.append(word)
        name = "+".join(parts)
        out[name] = round(out.get(name, 0.0) + float(m.group("v")) * _UNITS[m.group("u")], 3)
    return out


TIMELINE = "_timeline"  # in the run's staging folder: one note per model replica


def startup_seconds(timeline: str, t0: float) -> dict[str, float]:
    """From the replicas' notes: seconds from the pipeline's start (`t0`) to the first replica ready
    (model built) and to the first batch predicted, and the longest model load of a replica."""
    notes = []
    for f in storage.list_files(timeline):
        try:
            notes.append(json.loads(storage.read_bytes(storage.to_uri(storage.parse_uri(timeline), f.path))))
        except (storage.StorageError, ValueError):
            continue
    if not notes:
        return {}
    return {
        "first_batch": round(min(n["first_batch_at"] for n in notes) - t0, 3),
        "replica_ready": round(min(n["ready_at"] for n in notes) - t0, 3),
        "model_load": round(max(n["ready_at"] - n["started_at"] for n in notes), 3),
    }


def summarize_staged(staged: list[str], class_names: list[str]) -> dict:
    """Rows, error counts and accuracy of a staged run, from its small columns only (pyarrow.compute)."""
    cols = ["label_id", "pred_id", "topk_ids", "error", "error_kind"]
    tables = [outputs.read_present(u, cols) for u in staged]
    table = pa.concat_tables(tables, promote_options="default") if tables else None
    if table is None or table.num_rows == 0:
        return {"rows": 0, "errors": 0, "errors_transient": 0, "accuracy": None}
    errors = table.num_rows - table["error"].null_count
    transient = (
        pc.sum(pc.equal(table["error_kind"], "transient")).as_py() or 0 if "error_kind" in table.column_names else 0
    )
    return {
        "rows": table.num_rows,
        "errors": errors,
        "errors_transient": transient,
        "accuracy": accuracy_summary(table, class_names),
    }


def accuracy_summary(table: pa.Table | None, class_names: list[str]) -> dict | None:
    """Top-1, top-5 and per-class accuracy over the rows with a known label and a prediction, in Arrow: a
    million rows never become Python objects."""
    if table is None:
        return None
    t = table.filter(pc.and_(pc.is_valid(table["label_id"]), pc.is_valid(table["pred_id"])))
    n = t.num_rows
    if not n:
        return None
    hit = pc.cast(pc.equal(t["label_id"], t["pred_id"]), pa.int64())
    top5 = pc.list_slice(t["topk_ids"], 0, 5)
    parents = pc.list_parent_indices(top5)
    in_top5 = pc.equal(pc.list_flatten(top5), pc.take(t["label_id"], parents))
    hits5 = pc.count_distinct(pc.filter(parents, in_top5)).as_py()
    per = pa.table({"label": t["label_id"], "hit": hit}).group_by("label").aggregate([("hit", "sum"), ("hit", "count")])
    per_class = {}
    for label, a, c in zip(per["label"].to_pylist(), per["hit_sum"].to_pylist(), per["hit_count"].to_pylist()):
        per_class[class_names[label] if label < len(class_names) else str(label)] = {"top1": a / c, "count": c}
    return {
        "count": n,
        "top1": pc.sum(hit).as_py() / n,
        "top5": hits5 / n,
        "per_class": dict(sorted(per_class.items())),
    }


class StageTimes:
    """Wall seconds per stage of the job, for the summary line; `listed` counts entries listed so far (the
    lease's progress while a long listing runs)."""

    def __init__(self):
        self.t0, self.s, self.listed = time.time(), {}, 0

    @contextmanager
    def __call__(self, name: str):
        t = time.time()
        yield
        self.s[name] = round(self.s.get(name, 0.0) + time.time() - t, 3)


def nothing_yet(run_id: str, model_sha256: str) -> dict:
    """A run's result before it has predicted anything (what a run with nothing new returns)."""
    return {
        "run_id": run_id,
        "rows": 0,
        "inputs": 0,
        "errors": 0,
        "output": None,
        "images_per_s": 0.0,
        "accuracy_full": None,
        "model_sha256": model_sha256,
        "already_done": 0,
        "skipped_inputs": 0,
    }


def print_summary(r: dict) -> None:
    lines = [
        "=" * 64,
        f"run          {r['run_id']}",
        f"images       {r['inputs']} ({r['errors']} errors)   {r['images_per_s']:.1f} images/s   {r['elapsed_s']:.1f} "
        "s",
        f"predictions  {r['output'] or 'nothing new to predict'}",
    ]
    if r.get("table"):
        lines.append(
            f"query        python jobs/table.py show {r['table']}   (pyiceberg, duckdb, polars, Spark: README)"
        )
    if r.get("skipped_inputs"):
        lines.append(f"not inputs   {r['skipped_inputs']} hidden names (listed in _SUCCESS `not_inputs`)")
    if r.get("already_done"):
        lines.append(f"skipped      {r['already_done']} inputs already predicted with this model")
    if r.get("recovered"):
        lines.append(f"recovered    finished the commit of crashed run(s) {', '.join(r['recovered'])}")
    if r.get("rolled_back"):
        lines.append(f"rolled back  run(s) {', '.join(r['rolled_back'])}: their inputs are predicted again")
    acc = r.get("accuracy_full")
    if acc:
        lines.append(
            f"accuracy     top-1 {acc['top1'] * 100:.2f}%  top-5 {acc['top5'] * 100:.2f}%  over {acc['count']} "
            "labelled images"
        )
        worst = sorted(acc["per_class"].items(), key=lambda kv: kv[1]["top1"])[:3]
        lines.append("lowest       " + ", ".join(f"{c} {v['top1'] * 100:.0f}%" for c, v in worst))
    lines.append("stages       " + "  ".join(f"{k} {v:.1f} s" for k, v in r.get("timings_s", {}).items()))
    first = r.get("startup_s") or {}
    if first or r.get("operator_s"):
        lines.append(
            "in predict   "
            + "  ".join(
                (
                    [
                        f"first batch {first['first_batch']:.1f} s (replica ready {first['replica_ready']:.1f} s, "
                        "model load "
                        f"{first['model_load']:.1f} s)"
                    ]
                    if first
                    else []
                )
                + [f"{k} {v:.1f} task-s" for k, v in r.get("operator_s", {}).items()]
            )
        )
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)
