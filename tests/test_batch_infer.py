"""jobs/batch_infer.py: Ray Data actor-pool inference from real S3 to Parquet read back with pyarrow."""

import datetime as dt
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vit_model
from pipeline import inference, storage
from pipeline.inference import InferConfig
from pipeline.transforms import ImageTransform

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def model_uri(bucket):
    torch.manual_seed(0)
    m = vit_model.create_model("vit_micro_patch4_32", num_classes=3)
    with torch.no_grad():
        m.head.weight.normal_()
    w, c = vit_model.export_bytes(m, class_names=["cat", "dog", "eel"])
    storage.write_bytes(f"{bucket}/model/model.safetensors", w)
    storage.write_bytes(f"{bucket}/model/config.json", c)
    return f"{bucket}/model"


def _put_images(prefix, n, start=0, tree=False):
    rng = np.random.default_rng(start)
    uris = []
    for i in range(start, start + n):
        h, w = int(rng.integers(20, 120)), int(rng.integers(20, 120))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG" if i % 2 else "PNG")
        sub = f"{['cat', 'dog', 'eel'][i % 3]}/" if tree else ""
        uri = f"{prefix}/{sub}img{i:03d}.{'jpg' if i % 2 else 'png'}"
        storage.write_bytes(uri, buf.getvalue())
        uris.append(uri)
    return uris


def _run(**kw):
    return inference.run(InferConfig(**kw))


def test_predictions_equal_the_model_in_a_plain_loop(ray_cluster, bucket, model_uri):
    uris = _put_images(f"{bucket}/in", 10)
    storage.write_bytes(f"{bucket}/in/corrupt.jpg", b"\xff\xd8\xff garbage")
    storage.write_bytes(f"{bucket}/in/notes.txt", b"not an image")
    r = _run(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out", top_k=2, embeddings=True, batch_size=4)
    table = inference.read_published(f"{bucket}/out")
    assert table.num_rows == 12 == r["rows"]
    assert table.schema.equals(inference.output_schema(2, 64))
    rows = {row["image_uri"]: row for row in table.to_pylist()}
    assert rows[f"{bucket}/in/corrupt.jpg"]["error"] and rows[f"{bucket}/in/corrupt.jpg"]["pred_id"] is None
    assert "not an image" in rows[f"{bucket}/in/notes.txt"]["error"]
    model, _ = vit_model.model_from_bytes(storage.read_bytes(f"{model_uri}/model.safetensors"),
                                          storage.read_bytes(f"{model_uri}/config.json"))
    t = ImageTransform(32, 4, train=False)
    for uri in uris:
        with torch.no_grad():
            probs = model(torch.from_numpy(t(storage.read_bytes(uri), None))[None]).softmax(-1)[0]
        row = rows[uri]
        assert row["pred_id"] == int(probs.argmax()) and row["error"] is None
        assert row["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert len(row["topk_ids"]) == 2 and len(row["embedding"]) == 64
        assert row["model_sha256"] == r["model_sha256"] and row["inferred_at"].tzinfo is not None
    success = json.loads(storage.read_bytes(r["output"] + "/_SUCCESS"))
    assert success["rows"] == success["inputs"] == 12 and success["errors"] == 2
    assert r["output"].split("/")[-2] == f"dt={dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    assert not storage.list_files(f"{bucket}/out/_staging")  # staging cleaned after publish


def test_class_tree_input_writes_accuracy(ray_cluster, bucket, model_uri):
    _put_images(f"{bucket}/tree", 9, tree=True)
    r = _run(model=model_uri, input=f"{bucket}/tree", output=f"{bucket}/out")
    acc = json.loads(storage.read_bytes(r["output"] + "/accuracy.json"))
    table = inference.read_published(f"{bucket}/out")
    expected = np.mean(np.array(table.column("label_id").to_pylist()) == np.array(table.column("pred_id").to_pylist()))
    assert acc["count"] == 9 and acc["top1"] == pytest.approx(expected)
    assert set(acc["per_class"]) == {"cat", "dog", "eel"}


def test_since_last_run_and_crash_before_publish_give_exactly_one_prediction(ray_cluster, bucket, model_uri):
    out = f"{bucket}/out"
    first = _put_images(f"{bucket}/in", 4)
    r1 = _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)
    assert r1["rows"] == 4
    second = _put_images(f"{bucket}/in", 3, start=4)
    # a run that crashes after predicting, before publishing: only staging is left behind
    cfg = InferConfig(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)
    info = inference.preflight(cfg)
    info["inputs"] = [x for x in info["inputs"] if x[0] in second]
    staged, _ = inference.predict_to_staging(cfg, info, "crashed-run", dt.datetime.now(dt.timezone.utc))
    assert staged and inference.read_published(out).num_rows == 4  # readers do not see it
    ds = __import__("pyarrow.dataset", fromlist=["dataset"]).dataset(storage.resolve(out)[1], filesystem=storage.resolve(out)[0],
                                                                     format="parquet", partitioning="hive")
    assert ds.to_table().num_rows == 4  # nor does a Hive-style reader: _staging is ignored
    r3 = _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)
    assert r3["rows"] == 3
    r4 = _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)
    assert r4["rows"] == 0
    uris = inference.read_published(out).column("image_uri").to_pylist()
    assert sorted(uris) == sorted(first + second)  # exactly once each
    assert not [f for f in storage.list_files(out) if "crashed-run" in f.path]


def test_clear_errors_before_cluster_work(stack, bucket, model_uri, monkeypatch):
    _put_images(f"{bucket}/in", 1)
    with pytest.raises(storage.StorageError, match="no exported model at"):
        inference.preflight(InferConfig(model=f"{bucket}/nope", input=f"{bucket}/in", output=f"{bucket}/out"))
    with pytest.raises(storage.StorageError, match="no input files under"):
        inference.preflight(InferConfig(model=model_uri, input=f"{bucket}/empty", output=f"{bucket}/out"))
    with pytest.raises(storage.StorageError, match="bucket does not exist"):
        inference.preflight(InferConfig(model=model_uri, input=f"{bucket}/in", output="s3://vitray-no-such-out/x"))
    r = subprocess.run([sys.executable, str(ROOT / "jobs/batch_infer.py"), "--model", model_uri, "--input", f"{bucket}/in",
                        "--output", f"{bucket}/out", "--replicas", "2,1"], capture_output=True, text=True)
    assert r.returncode == 2 and "replicas must be MIN,MAX" in r.stderr
    # credentials the store refuses: named as such, before any Ray work, without the secret
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    with pytest.raises(storage.StorageError, match="credentials were refused") as e:
        inference.preflight(InferConfig(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out"))
    assert "not-the-secret-123" not in str(e.value)
