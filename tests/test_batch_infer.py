"""jobs/batch_infer.py: Ray Data actor-pool inference from real S3 to Parquet read back with pyarrow; crashes,
overlapping runs, odd keys, retries and exit codes, with the job run as a subprocess where a scheduler would."""

import datetime as dt
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import vit_model
from pipeline.core import lease, storage
from pipeline.data.transforms import ImageTransform
from pipeline.inference import batch as inference
from pipeline.inference import outputs, predictor, publish
from pipeline.inference.batch import InferConfig
from pipeline.inference.rows import output_schema

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


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


def _released(output: str) -> bool:
    """The job gave its lease back (kept as `released`, so the fencing token only grows)."""
    return json.loads(storage.read_bytes(f"{output}/_lease.json"))["released"]


def test_predictions_equal_the_model_in_a_plain_loop(ray_cluster, bucket, model_uri):
    uris = _put_images(f"{bucket}/in", 10)
    storage.write_bytes(f"{bucket}/in/corrupt.jpg", b"\xff\xd8\xff garbage")
    storage.write_bytes(f"{bucket}/in/notes.txt", b"not an image")
    r = _run(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out", top_k=2, embeddings=True, batch_size=4)
    table = outputs.read_published(f"{bucket}/out")
    assert table.num_rows == 12 == r["rows"]
    assert table.schema.equals(output_schema(embeddings=True))
    rows = {row["image_uri"]: row for row in table.to_pylist()}
    assert rows[f"{bucket}/in/corrupt.jpg"]["error"] and rows[f"{bucket}/in/corrupt.jpg"]["pred_id"] is None
    assert "not an image" in rows[f"{bucket}/in/notes.txt"]["error"]
    model, _ = vit_model.model_from_bytes(
        storage.read_bytes(f"{model_uri}/model.safetensors"), storage.read_bytes(f"{model_uri}/config.json")
    )
    t = ImageTransform(32, 4, train=False, crop_fraction=0.6, interpolation="bilinear")  # the export's settings
    default = ImageTransform(32, 4, train=False)
    off_by_default = 0
    for uri in uris:
        with torch.no_grad():
            probs = model(torch.from_numpy(t(storage.read_bytes(uri), None))[None]).softmax(-1)[0]
            other = model(torch.from_numpy(default(storage.read_bytes(uri), None))[None]).softmax(-1)[0]
        row = rows[uri]
        assert row["pred_id"] == int(probs.argmax()) and row["error"] is None
        assert row["score"] == pytest.approx(float(probs.max()), abs=1e-5)
        off_by_default += abs(row["score"] - float(other.max())) > 1e-4
        assert len(row["topk_ids"]) == 2 and len(row["embedding"]) == 64
        assert row["model_sha256"] == r["model_sha256"] and row["inferred_at"].tzinfo is not None
        assert row["input_size"] == len(storage.read_bytes(uri)) and row["label_id"] is None and row["label"] is None
    assert off_by_default > 0  # the default crop would have given other scores: the export's settings were used
    success = json.loads(storage.read_bytes(r["output"] + "/_SUCCESS"))
    assert success["rows"] == success["inputs"] == 12 and success["errors"] == 2
    stages = "+".join(success["operator_s"])  # where the time went, stage by stage (fused stages joined by +)
    assert "read+decode" in stages and "model" in stages and "write" in stages
    first = success["startup_s"]  # the replicas' own notes: built, then their first batch, after the pipeline started
    assert (
        0 < first["model_load"] and 0 < first["replica_ready"] <= first["first_batch"] < success["timings_s"]["predict"]
    )
    assert {"connect", "list", "predict"} <= set(success["timings_s"])
    assert r["output"].split("/")[-2] == f"dt={dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    assert not storage.list_files(f"{bucket}/out/_staging")  # staging cleaned after publish
    assert _released(f"{bucket}/out")


def test_a_replica_computes_with_the_cpu_slots_it_holds(ray_cluster, model_uri):
    w, c = storage.read_bytes(f"{model_uri}/model.safetensors"), storage.read_bytes(f"{model_uri}/config.json")
    import hashlib

    replica = ray_cluster.remote(num_cpus=2)(predictor.Predictor).remote(
        w, c, hashlib.sha256(w).hexdigest(), model_uri, 2, False, "r", dt.datetime.now(dt.timezone.utc), False, 2
    )
    try:
        assert ray_cluster.get(replica.threads.remote()) == 2
    finally:
        ray_cluster.kill(replica)


def test_class_tree_input_writes_accuracy(ray_cluster, bucket, model_uri):
    _put_images(f"{bucket}/tree", 9, tree=True)
    r = _run(model=model_uri, input=f"{bucket}/tree", output=f"{bucket}/out")
    acc = json.loads(storage.read_bytes(r["output"] + "/_accuracy.json"))
    table = outputs.read_published(f"{bucket}/out")
    expected = np.mean(np.array(table.column("label_id").to_pylist()) == np.array(table.column("pred_id").to_pylist()))
    assert acc["count"] == 9 and acc["top1"] == pytest.approx(expected)
    assert set(acc["per_class"]) == {"cat", "dog", "eel"}


def _job(*args, **kw):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs/batch_infer.py"), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _committed(out):
    """image_uri of every committed prediction (error rows excluded), in a list: duplicates show."""
    t = outputs.read_published(out)
    return (
        sorted(u for u, e in zip(t.column("image_uri").to_pylist(), t.column("error").to_pylist()) if e is None)
        if t.num_rows
        else []
    )


def test_output_under_run_prefix_survives_crashes_and_reruns(ray_cluster, bucket, model_uri, monkeypatch):
    """An --output that itself contains `run=`, with a sibling beside it; a run crashes after staging,
    another in the middle of its commit: the sibling and every committed row survive, and in the end
    each input has exactly one committed prediction."""
    out = f"{bucket}/experiments/run=prod/preds"
    storage.write_bytes(f"{bucket}/experiments/run=prod/notes.txt", b"sibling")
    storage.write_bytes(f"{bucket}/experiments/run=prod/preds-old/part-0.parquet", b"not ours")
    first = _put_images(f"{bucket}/in", 4)
    assert _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)["rows"] == 4
    second = _put_images(f"{bucket}/in", 3, start=4)
    # crash 1: after Ray staged the predictions, before the commit (the process dies: BaseException)
    monkeypatch.setattr(publish, "commit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True, run_id="crash-1")
    monkeypatch.undo()
    storage.delete(f"{out}/_lease.json")  # a killed process leaves its lease until the TTL; skip the wait here
    # crash 2: in the middle of the commit, right after its first published part
    real_copy, copies = storage.copy, []

    def copy_then_die(src, dst, **kw):
        real_copy(src, dst, **kw)
        copies.append(dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True, run_id="crash-2")
    monkeypatch.undo()
    assert copies and storage.exists(copies[0])
    storage.delete(f"{out}/_lease.json")
    # the crashed run's id again (a scheduler's retry): refused once recovery has finished that commit (it ran
    # before recovery and found nothing: the parts and index were overwritten while the ledger kept the first)
    _put_images(f"{bucket}/in", 1, start=7)
    with pytest.raises(inference.RunIdTaken, match="crash-2"):
        _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True, run_id="crash-2")
    storage.delete(f"{out}/_lease.json")
    storage.delete(f"{bucket}/in/img007.jpg")
    r = _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True, run_id="after")
    assert r["rows"] == 0  # the crashed commit was finished by the refused run's recovery, nothing left to do
    assert _committed(out) == sorted(first + second)  # exactly once each
    assert storage.read_bytes(f"{bucket}/experiments/run=prod/notes.txt") == b"sibling"
    assert storage.read_bytes(f"{bucket}/experiments/run=prod/preds-old/part-0.parquet") == b"not ours"
    assert not [
        f.path
        for f in storage.list_files(out)
        if "/_staging/" in f.path or "/_commits/" in f.path or "crash-1" in f.path
    ]


def test_odd_keys_come_back_verbatim(ray_cluster, bucket, model_uri):
    names = ["cat#1.jpg", "q?x=1&y=2.png", "100%25 sure.jpg", "sp ace.png", "ünï cödé.jpg"]
    rng = np.random.default_rng(0)
    for n in names:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            buf, "JPEG" if n.endswith("jpg") else "PNG"
        )
        storage.write_bytes(f"{bucket}/in/{n}", buf.getvalue())
    _run(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out", since_last_run=True)
    table = outputs.read_published(f"{bucket}/out")
    assert sorted(table.column("image_uri").to_pylist()) == sorted(f"{bucket}/in/{n}" for n in names)
    assert table.column("error").null_count == len(names)  # each one read and predicted
    assert _run(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out", since_last_run=True)["rows"] == 0


def test_failed_inputs_are_retried_and_the_error_gate_publishes_nothing(ray_cluster, bucket, model_uri):
    out = f"{bucket}/out"
    good = _put_images(f"{bucket}/in", 2)
    storage.write_bytes(f"{bucket}/in/late.jpg", b"\xff\xd8\xff half-uploaded")
    r1 = _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)
    assert r1["errors"] == 1
    storage.write_bytes(f"{bucket}/in/late.jpg", storage.read_bytes(good[1]))  # the upload completes
    r2 = _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)
    assert r2["rows"] == 1 and r2["errors"] == 0
    assert _committed(out) == sorted(good + [f"{bucket}/in/late.jpg"])
    # an unchanged input that does not decode fails for good: one error row, not one per scheduled run
    storage.write_bytes(f"{bucket}/in/broken.jpg", b"never an image")
    assert _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True)["errors"] == 1
    for retry in (True, False):
        assert (
            _run(model=model_uri, input=f"{bucket}/in", output=out, since_last_run=True, retry_errors=retry)["rows"]
            == 0
        )
    rows = outputs.read_published(out, columns=["image_uri", "error_kind"]).to_pylist()
    assert [r["error_kind"] for r in rows if r["image_uri"].endswith("broken.jpg")] == ["permanent"]
    # a mostly broken input set: the run fails before its commit and leaves nothing behind
    for i in range(8):
        storage.write_bytes(f"{bucket}/junk/{i}.jpg", b"junk")
    _put_images(f"{bucket}/junk", 1)
    with pytest.raises(inference.ErrorRateExceeded, match="8 of 9 inputs could not be predicted"):
        _run(model=model_uri, input=f"{bucket}/junk", output=f"{bucket}/gated", max_error_rate=0.1)
    assert [f.path.rsplit("/", 1)[1] for f in storage.list_files(f"{bucket}/gated")] == ["_lease.json"]
    assert _released(f"{bucket}/gated")  # no run, no staging


def test_replicas_use_the_weights_the_driver_read(ray_cluster, bucket, model_uri):
    """The driver reads the weights once: replicas never re-read --model, so a new export landing
    mid-run cannot mix weights, and every row carries the hash of the bytes that produced it."""
    import hashlib

    _put_images(f"{bucket}/in", 3)
    cfg = InferConfig(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out")
    pre = inference.preflight(cfg)
    inputs = inference.list_inputs(cfg, pre.class_names)
    storage.delete(f"{model_uri}/model.safetensors")  # replaced by someone else right after preflight
    staged = inference.predict_to_staging(cfg, pre, inputs, "pinned", dt.datetime.now(dt.timezone.utc))
    shas = {s for u in staged.files for s in outputs.read_parquet(u, ["model_sha256"]).column(0).to_pylist()}
    assert shas == {hashlib.sha256(pre.weights).hexdigest()}
    with pytest.raises(RuntimeError, match="changed in transit"):
        predictor.Predictor(
            pre.weights[:-1] + b"x",
            pre.config,
            pre.weights_sha256,
            model_uri,
            1,
            False,
            "r",
            dt.datetime.now(dt.timezone.utc),
            False,
            1,
        )


def test_overlapping_scheduled_runs_and_a_killed_holder(stack, bucket, model_uri):
    """Two runs started together: one publishes, the other exits 75 and writes nothing. After a holder is
    killed mid-run, the next schedule watches its lease unchanged for one TTL, takes it over, cleans up and
    publishes every input exactly once. A run with nothing new exits 0."""
    out = f"{bucket}/out"
    uris = _put_images(f"{bucket}/in", 6)
    args = ["--model", model_uri, "--input", f"{bucket}/in", "--output", out, "--since-last-run", "--lease-ttl", "6"]
    a, b = _job(*args), _job(*args)
    (out_a, _), (out_b, _) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert sorted([a.returncode, b.returncode]) == [0, lease.EXIT_LEASE_HELD], out_a[-2000:] + out_b[-2000:]
    loser = out_a if a.returncode else out_b
    assert "another run holds the lease" in loser and "changed it while this run watched" in loser
    assert len(outputs.committed_runs(out)) == 1 and _committed(out) == sorted(uris)
    # the holder is killed once it has staged its predictions
    more = _put_images(f"{bucket}/in", 4, start=6)
    holder = _job(*args, start_new_session=True)
    deadline = time.time() + 240
    while not storage.list_files(f"{out}/_staging") and holder.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    assert holder.returncode == -signal.SIGKILL, "the holder finished before it could be killed"
    nxt = _job(*args)
    text = nxt.communicate(timeout=300)[0]
    assert nxt.returncode == 0, text[-3000:]
    assert "unchanged for 6 s" in text, text[-3000:]  # watched for one TTL on its own clock
    assert _committed(out) == sorted(uris + more)  # every input exactly once
    assert not [f for f in storage.list_files(out) if "/_staging/" in f.path or "/_commits/" in f.path]
    quiet = _job(*args)
    text = quiet.communicate(timeout=120)[0]
    assert quiet.returncode == 0 and "nothing new to predict" in text, text[-2000:]
    assert "terminate called" not in text


def test_job_entry_points_exit_zero_on_success(stack, bucket, tmp_path, model_uri):
    """Each job as a scheduler runs it, to its exit code (pretrain: tests/test_e2e.py through `ray job submit`)."""
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/make_shards.py"),
            "--source",
            "digits",
            "--output",
            str(tmp_path / "shards"),
            "--shard-size",
            "512",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "shards" / "manifest.json").exists()
    _put_images(f"{bucket}/in", 2)
    for _ in range(2):  # a run that publishes, then a quiet one
        job = _job("--model", model_uri, "--input", f"{bucket}/in", "--output", f"{bucket}/out", "--since-last-run")
        text = job.communicate(timeout=300)[0]
        assert job.returncode == 0, text[-3000:]
    assert "nothing new to predict" in text
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/batch_infer.py"),
            "--model",
            model_uri,
            "--input",
            f"{bucket}/in",
            "--output",
            f"{bucket}/out",
            "--max-error-rate",
            "1.5",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "max_error_rate" in r.stderr


def test_clear_errors_before_cluster_work(stack, bucket, model_uri, monkeypatch):
    _put_images(f"{bucket}/in", 1)
    with pytest.raises(storage.StorageError, match="no exported model at"):
        inference.preflight(InferConfig(model=f"{bucket}/nope", input=f"{bucket}/in", output=f"{bucket}/out"))
    with pytest.raises(storage.StorageError, match="no input files under"):
        inference.run(InferConfig(model=model_uri, input=f"{bucket}/empty", output=f"{bucket}/out"))
    assert _released(f"{bucket}/out")  # on the error path too
    with pytest.raises(storage.StorageError, match="bucket does not exist"):
        inference.preflight(InferConfig(model=model_uri, input=f"{bucket}/in", output="s3://vitray-no-such-out/x"))
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/batch_infer.py"),
            "--model",
            model_uri,
            "--input",
            f"{bucket}/in",
            "--output",
            f"{bucket}/out",
            "--replicas",
            "2,1",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "replicas must be MIN,MAX" in r.stderr
    # credentials the store refuses: named as such, before any Ray work, without the secret
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-123")
    with pytest.raises(storage.StorageError, match="credentials were refused") as e:
        inference.preflight(InferConfig(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out"))
    assert "not-the-secret-123" not in str(e.value)


def test_append_only_with_a_limit_marks_what_was_predicted(ray_cluster, bucket, model_uri):
    """The mark stored was the whole listing's: the inputs past --limit were never listed again."""
    uris = _put_images(f"{bucket}/in", 5)
    kw = dict(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/out", since_last_run=True)
    for _ in range(3):
        _run(**kw, input_append_only=True, limit=2)
    assert _committed(f"{bucket}/out") == sorted(uris)


SEGFAULTING_DECODER = """
import os, signal
from PIL import PngImagePlugin

_load = PngImagePlugin.PngImageFile.load


def load(self):  # a decoder bug that one input triggers: the process dies by SIGSEGV
    if self.info.get("vitray-test") == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    return _load(self)


PngImagePlugin.PngImageFile.load = load
"""


@pytest.mark.e2e
def test_an_input_that_kills_its_decoder_is_isolated_and_recorded_once(stack, bucket, model_uri, tmp_path):
    """#38 item 6: Ray Data retries a task whose worker died forever, so one input that crashes the decoder
    hung every scheduled run. Now the task is retried twice, its block's inputs are decoded alone in fresh
    processes, the one that kills them every time becomes a row with a permanent error, the others are
    predicted, and the next run does not meet it again. The crash is real (SIGSEGV in every process of the
    job, Ray's workers included, through a sitecustomize that patches Pillow's PNG loader)."""
    from PIL import PngImagePlugin

    uris = _put_images(f"{bucket}/in", 5)
    info = PngImagePlugin.PngInfo()
    info.add_text("vitray-test", "segfault")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buf, "PNG", pnginfo=info)
    poison = f"{bucket}/in/zz-poison.png"
    storage.write_bytes(poison, buf.getvalue())
    (tmp_path / "sitecustomize.py").write_text(SEGFAULTING_DECODER)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])  # a job-local Ray: its workers get it too
    out = f"{bucket}/out"
    args = ["--model", model_uri, "--input", f"{bucket}/in", "--output", out, "--since-last-run", "--batch-size", 2]
    job = _job(*args, env=env)
    text = job.communicate(timeout=600)[0]
    assert job.returncode == 0, text[-4000:]
    assert "poison input" in text and "killed by SIGSEGV" in text, text[-4000:]
    published = outputs.read_published(out)
    rows_by_uri = {r["image_uri"]: r for r in published.to_pylist()}
    assert sorted(rows_by_uri) == sorted(uris + [poison])  # nothing dropped, one row each
    assert (
        rows_by_uri[poison]["error_kind"] == "permanent"
        and "killed its process 2 times" in rows_by_uri[poison]["error"]
    )
    assert all(rows_by_uri[u]["error"] is None for u in uris)
    again = _job(*args, env=env)
    text = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "nothing new to predict" in text, text[-3000:]
