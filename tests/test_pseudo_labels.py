"""Pseudo-labels for self-training (#37 part 1): committed predictions -> the labels of a new shard set, on
local folders (the selection, the checks) and through `jobs/make_shards.py --labels-from` (no Ray: --local)."""

import datetime as dt
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.core import storage
from pipeline.data import manifest, shard_writer
from pipeline.inference import outputs, publish
from pipeline.inference.inputs import object_version
from pipeline.inference.rows import output_schema
from pipeline.selftrain import pseudo

ROOT = Path(__file__).resolve().parents[1]
SHA = "5e" * 32


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def world(tmp_path):
    """A labelled set (classes c0, c1: 4 train + 2 val images each), 12 unlabeled images (one a copy of a
    labelled val image), and a teacher's committed predictions of them."""
    lab = tmp_path / "labelled-src"
    for c in range(2):
        for i in range(6):
            split = "val" if i >= 4 else "train"
            (lab / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            (lab / split / f"c{c}" / f"{i}.png").write_bytes(_png(100 * c + i))
    labelled = shard_writer.make_shards(
        str(lab), str(tmp_path / "labelled"), shard_size=4, progress=False, executor="local"
    ).manifest
    un = tmp_path / "unlabeled"
    un.mkdir()
    for i in range(12):
        (un / f"u{i:02d}.png").write_bytes(_png(1000 + i))
    (un / "u11.png").write_bytes((lab / "val" / "c1" / "5.png").read_bytes())  # a val image among them
    preds = str(tmp_path / "preds")
    listing = {storage.to_uri(storage.parse_uri(str(un)), f.path): f for f in storage.list_files(str(un))}
    uris = sorted(listing)
    scores = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.4, 0.3, 0.2, 0.99]
    _commit(preds, "t1", uris, [f"c{i % 2}" for i in range(12)], scores, [object_version(listing[u]) for u in uris])
    return {"labelled": labelled, "source": str(un), "preds": preds, "uris": uris, "scores": scores, "tmp": tmp_path}


def _commit(out, run_id, uris, preds, scores, versions, sha=SHA, classes=("c0", "c1")):
    """Commit predictions through the real publish path (what batch inference writes)."""
    layout = outputs.Layout.of(out)
    now = dt.datetime.now(dt.timezone.utc)
    rows = [
        {
            "image_uri": u, "label_id": None, "label": None, "pred_id": list(classes).index(p) if p in classes else 0,
            "pred": p, "score": s, "topk_ids": [0], "topk_scores": [s], "error": None, "model_uri": "s3://m/teacher",
            "model_sha256": sha, "run_id": run_id, "inferred_at": now, "input_version": v,
        }
        for u, p, s, v in zip(uris, preds, scores, versions)
    ]  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=output_schema(False)), buf)
    staged = layout.staging(run_id).join(f"part-000000-x-0{outputs.STAGED_SUFFIX}").uri
    storage.write_bytes(staged, buf.getvalue())
    intent = publish.plan_commit(
        layout, run_id, "2026-12-07", [staged], accuracy_report=None, ledger=True, rows=len(rows),
        inputs=len(rows), errors=0, model_sha256=sha, model_uri="s3://m/teacher",
    )  # fmt: skip
    from pipeline.core.lease import NoLease

    with NoLease() as lease:
        publish.commit(layout, intent, lease)


def test_threshold_and_budget_select_the_most_confident_and_a_val_image_is_refused_by_name(world):
    chosen = pseudo.select(
        world["preds"], world["source"], labelled=world["labelled"], min_confidence=0.5, per_class_max=3
    )
    by_score = dict(zip(world["uris"], world["scores"]))
    for c in ("c0", "c1"):
        mine = [u for i, u in enumerate(world["uris"]) if f"c{i % 2}" == c and by_score[u] >= 0.5]
        mine = [u for u in mine if not u.endswith("u11.png")]  # the labelled val image
        best = sorted(mine, key=lambda u: -by_score[u])[:3]
        assert sorted(k for k, v in chosen.labels.items() if v == c) == sorted(u.rsplit("/", 1)[1] for u in best)
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in chosen.skipped}
    assert reasons["u11.png"].startswith("the same bytes as labelled sample val/")
    assert "below --min-confidence" in reasons["u08.png"] and "past --per-class-max 3" in reasons["u06.png"]
    assert len(chosen.labels) + len(chosen.skipped) == 12  # every prediction is a label or a listed skip
    assert chosen.provenance["model_sha256"] == SHA and chosen.provenance["runs"] == ["t1"]


def test_a_changed_or_gone_image_never_gets_a_label(world):
    src = Path(world["source"])
    (src / "u00.png").write_bytes(_png(7) + b"\0" * 10)  # other bytes, another size: another input_version
    (src / "u01.png").unlink()
    chosen = pseudo.select(world["preds"], world["source"], labelled=world["labelled"])
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in chosen.skipped}
    assert reasons["u00.png"].startswith("changed since it was predicted") and reasons["u01.png"] == (
        "gone since it was predicted"
    )
    assert "u00.png" not in chosen.labels and "u01.png" not in chosen.labels


def test_another_models_classes_an_empty_run_or_nothing_above_the_threshold_exit_2(world):
    with pytest.raises(pseudo.NoPseudoLabels, match=r"no pseudo-label left of 12 predictions: 12 skipped"):
        pseudo.select(world["preds"], world["source"], labelled=world["labelled"], min_confidence=0.995)
    with pytest.raises(pseudo.NoPseudoLabels, match="0 committed runs of run nope"):
        pseudo.select(world["preds"], world["source"], labelled=world["labelled"], run_id="nope")
    other = str(world["tmp"] / "other-preds")
    _commit(
        other, "o1", world["uris"][:2], ["dog", "cat"], [0.9, 0.9], [None, None], sha="77" * 32, classes=("dog", "cat")
    )
    with pytest.raises(pseudo.NoPseudoLabels, match=r"2 of them not classes of the labelled set \(\['cat', 'dog'\]"):
        pseudo.select(other, world["source"], labelled=world["labelled"])


def test_make_shards_labels_from_writes_a_pseudo_labelled_set_with_its_provenance(world):
    out = world["tmp"] / "pseudo-set"
    args = ["--source", world["source"], "--output", str(out), "--labels-from", world["preds"], "--local"]
    args += [
        "--labelled",
        world["labelled"].uri,
        "--min-confidence",
        "0.5",
        "--per-class-max",
        "3",
        "--shard-size",
        "4",
    ]
    r = subprocess.run([sys.executable, "jobs/make_shards.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    m = manifest.load_manifest(str(out))
    assert m.classes == ["c0", "c1"] and m.splits["train"].count == 6 and m.splits["val"].count == 0
    assert m.provenance["model_sha256"] == SHA and m.provenance["teacher"] == "s3://m/teacher"
    assert {s["reason"].split(" (")[0] for s in m.skipped} >= {"past --per-class-max 3 for c0"}
    assert any(s["reason"].startswith("the same bytes as labelled sample") for s in m.skipped)
    bad = subprocess.run(
        [sys.executable, "jobs/make_shards.py", *args[:-4], "--min-confidence", "0.999"], cwd=ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "no pseudo-label left" in bad.stdout + bad.stderr
    assert json.loads((out / "manifest.json").read_text())["version"] == m.version  # nothing new published
