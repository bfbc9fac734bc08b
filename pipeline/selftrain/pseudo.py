"""Pseudo-labels from committed batch-inference predictions, for `make_shards --labels-from`.

predictions (one model's, one run's or all its runs': the latest row per input)
  -> the inputs as they are now (a changed or gone image is a listed skip: never a label on other bytes)
  -> at least --min-confidence top-1 probability
  -> at most --per-class-max per class, the most confident first (classes short of it stay short: a
     duplicated pseudo-label weighs a possibly wrong label twice; the summary says which are short)
  -> no image whose bytes are in the labelled set (its val split above all), refused by name
  -> {path relative to the source: class}, the labels make_shards reads, and the provenance it records.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pyarrow.compute as pc

from pipeline.core import storage
from pipeline.data.manifest import Manifest
from pipeline.data.shard_reader import read_shard
from pipeline.inference import outputs
from pipeline.inference.inputs import object_version
from pipeline.inference.ledger import latest_per_input


class NoPseudoLabels(ValueError):
    """Nothing usable: another model's classes, an empty run, nothing above the threshold (exit 2)."""

    exit_code = 2


@dataclass
class PseudoLabels:
    labels: dict[str, str]  # path relative to the source -> class
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    provenance: dict = field(default_factory=dict)  # teacher, run(s), threshold, budget, counts
    per_class: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        short = [c for c, n in self.per_class.items() if n < (self.provenance.get("per_class_max") or 0)]
        return (
            f"{len(self.labels)} pseudo-labels from model {self.provenance['model_sha256'][:12]} "
            f"(min confidence {self.provenance['min_confidence']:g}), {len(self.skipped)} skipped"
            + (f"; short of --per-class-max: {', '.join(short[:10])}" if short else "")
        )


def labelled_hashes(manifest: Manifest) -> dict[str, str]:
    """sha256 of every image in the labelled set -> `<split>/<shard>#<key>`: one read of its shards."""
    out = {}
    for split in manifest.splits:
        for uri in manifest.shard_uris(split):
            for s in read_shard(uri, None, manifest.format):
                out.setdefault(hashlib.sha256(bytes(s.image)).hexdigest(), f"{split}/{uri.rsplit('/', 1)[-1]}#{s.key}")
    return out


def select(
    predictions: str,
    source: str,
    *,
    labelled: Manifest,
    min_confidence: float = 0.0,
    per_class_max: int | None = None,
    model_sha256: str | None = None,
    run_id: str | None = None,
) -> PseudoLabels:
    """The pseudo-labels for the images under `source` from the predictions committed under `predictions`."""
    if not 0 <= min_confidence < 1:
        raise ValueError(f"--min-confidence must be in [0, 1), got {min_confidence}")
    if per_class_max is not None and per_class_max < 1:
        raise ValueError(f"--per-class-max must be at least 1, got {per_class_max}")
    runs = [r for r in outputs.committed_runs(predictions) if not run_id or r["run_id"] == run_id]
    shas = sorted({r.get("model_sha256") for r in runs if r.get("model_sha256")})
    if model_sha256:
        shas = [s for s in shas if s == model_sha256]
    if len(shas) != 1:
        raise NoPseudoLabels(
            f"--labels-from {predictions}: {len(runs)} committed runs"
            + (f" of run {run_id}" if run_id else "")
            + f" by {len(shas)} models{' matching --teacher-sha256' if model_sha256 else ''}: "
            + ("name one with --teacher-sha256" if len(shas) > 1 else "nothing to label from")
        )
    sha = shas[0]
    cols = ["image_uri", "pred", "score", "error", "input_version", "run_id", "model_uri"]
    table = outputs.read_published(predictions, sha, columns=cols)
    if run_id:
        table = table.filter(pc.equal(table["run_id"], run_id))
    if table.num_rows == 0:
        raise NoPseudoLabels(f"--labels-from {predictions}: model {sha[:12]} has no predictions there")
    table = latest_per_input(table)
    table = table.filter(pc.is_valid(table["pred"]))  # error rows have no prediction
    classes = sorted(set(table["pred"].to_pylist()))
    unknown = sorted(set(classes) - set(labelled.classes))
    if unknown or not labelled.classes:
        raise NoPseudoLabels(
            f"the teacher's predictions name {len(classes)} classes, {len(unknown)} of them not classes of the "
            f"labelled set ({unknown[:5]}{' ...' if len(unknown) > 5 else ''}; it has {len(labelled.classes)}): "
            "a student cannot learn them beside it; use the teacher trained on that set"
        )
    src = storage.parse_uri(source)
    now = {storage.to_uri(src, f.path): f for f in storage.list_files(src.uri)}
    root = src.uri.rstrip("/") + "/"
    skipped, candidates = [], []
    for r in table.to_pylist():
        uri = r["image_uri"]
        if not uri.startswith(root):
            skipped.append({"path": uri, "reason": f"not under --source {src.uri}"})
        elif uri not in now:
            skipped.append({"path": uri, "reason": "gone since it was predicted"})
        elif r["input_version"] is not None and object_version(now[uri]) != r["input_version"]:
            skipped.append({"path": uri, "reason": "changed since it was predicted (another input_version)"})
        elif r["score"] is None or r["score"] < min_confidence:
            skipped.append({"path": uri, "reason": f"top-1 probability {r['score']:.3f} below --min-confidence"})
        else:
            candidates.append(r)
    known = labelled_hashes(labelled)
    chosen: dict[str, list[dict]] = {}
    for r in sorted(candidates, key=lambda r: (-r["score"], r["image_uri"])):
        picked = chosen.setdefault(r["pred"], [])
        if per_class_max is not None and len(picked) >= per_class_max:
            skipped.append({"path": r["image_uri"], "reason": f"past --per-class-max {per_class_max} for {r['pred']}"})
            continue
        digest = hashlib.sha256(storage.read_bytes(r["image_uri"])).hexdigest()
        if digest in known:
            skipped.append({"path": r["image_uri"], "reason": f"the same bytes as labelled sample {known[digest]}"})
            continue
        picked.append(r)
    labels = {r["image_uri"][len(root) :]: c for c, rs in chosen.items() for r in rs}
    if not labels:
        raise NoPseudoLabels(
            f"no pseudo-label left of {table.num_rows} predictions: {len(skipped)} skipped "
            f"({_reasons(skipped)}); lower --min-confidence or predict the current images"
        )
    provenance = {
        "predictions": predictions,
        "model_sha256": sha,
        "teacher": sorted({r["model_uri"] for rs in chosen.values() for r in rs})[0],
        "runs": sorted({r["run_id"] for rs in chosen.values() for r in rs}),
        "min_confidence": min_confidence,
        "per_class_max": per_class_max,
    }
    return PseudoLabels(labels, skipped, provenance, {c: len(rs) for c, rs in sorted(chosen.items())})


def _reasons(skipped: list[dict]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        kind = s["reason"].split(" (")[0].split(" below")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])[:4])


def labels_jsonl(p: PseudoLabels) -> bytes:
    """The labels as make_shards' JSON lines (`{"path", "label"}`)."""
    return "".join(json.dumps({"path": k, "label": v}) + "\n" for k, v in sorted(p.labels.items())).encode()
