"""Predictions as an Iceberg table (#36): real SeaweedFS, pyiceberg's SqlCatalog on SQLite, real Ray; the job
in-process where a step is interleaved, as a subprocess where a scheduler would run it (kills, exit codes)."""

import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.core import storage
from pipeline.inference import batch
from pipeline.inference.iceberg import catalog, maintenance, snapshots, table_run
from pipeline.inference.infer_config import InferConfig

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _put_images(prefix, n, start=0):
    rng = np.random.default_rng(start)
    uris = []
    for i in range(start, start + n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(buf, "PNG")
        uri = f"{prefix}/img{i:03d}.png"
        storage.write_bytes(uri, buf.getvalue())
        uris.append(uri)
    return uris


@pytest.fixture
def where(bucket, tmp_path):
    """A catalog of the test's own (SQLite in tmp_path) with its warehouse in the test's bucket."""
    return {"catalog": f"sqlite:///{tmp_path}/catalog.db", "warehouse": f"{bucket}/warehouse"}


def _cfg(model_uri, bucket, where, **kw):
    return InferConfig(model=model_uri, input=f"{bucket}/in", table="preds.t", **where, **kw)


def _table(where):
    return catalog.open_catalog(where["catalog"], where["warehouse"]).load_table("preds.t")


def _versions(where) -> list[tuple[str, str]]:
    """(image_uri, input_version) of every committed row that is not a transient error: duplicates show."""
    t = _table(where).scan(selected_fields=("image_uri", "input_version", "error_kind")).to_arrow().to_pylist()
    return sorted((r["image_uri"], r["input_version"]) for r in t if r["error_kind"] != "transient")


def test_runs_commit_one_snapshot_each_and_every_reader_agrees(ray_cluster, bucket, model_uri, where):
    uris = _put_images(f"{bucket}/in", 6)
    storage.write_bytes(f"{bucket}/in/corrupt.png", b"\x89PNG garbage")
    first = table_run.run(_cfg(model_uri, bucket, where, since_last_run=True, run_id="night-1"))
    assert first["rows"] == 7 and first["errors"] == 1
    table = _table(where)
    snap = table.current_snapshot()
    s = snapshots.summary(snap)
    assert s[snapshots.RUN_ID] == "night-1" and s[snapshots.MODEL_SHA] == first["model_sha256"]
    assert table.properties[snapshots.MODEL_SHA] == first["model_sha256"]
    assert [f.name for f in table.spec().fields] == ["inferred_day"] and table.sort_order().fields
    mine = table.scan().to_arrow()
    assert mine.num_rows == 7 and mine.schema.field("image_uri").type in (pa.string(), pa.large_string())
    errors = mine.filter(pa.compute.is_valid(mine["error"]))
    assert errors["image_uri"].to_pylist() == [f"{bucket}/in/corrupt.png"] and errors["error_kind"][0].as_py()

    # nothing new: no snapshot; two more images: only they are predicted
    again = table_run.run(_cfg(model_uri, bucket, where, since_last_run=True))
    assert again["rows"] == 0 and again["already_done"] == 7 and len(_table(where).snapshots()) == 1
    _put_images(f"{bucket}/in", 2, start=6)
    third = table_run.run(_cfg(model_uri, bucket, where, since_last_run=True, embeddings=True))
    assert third["rows"] == 2 and third["already_done"] == 7
    table = _table(where)
    assert len(_versions(where)) == 9 == len(set(_versions(where)))

    # --embeddings later: a nullable column, the first run's rows null in it
    t = table.scan(selected_fields=("image_uri", "embedding", "run_id")).to_arrow().to_pylist()
    assert all((r["embedding"] is None) == (r["run_id"] == "night-1") for r in t)

    # time travel: the table as the first run left it
    old = table.scan(snapshot_id=snap.snapshot_id).to_arrow()
    assert sorted(old["image_uri"].to_pylist()) == sorted(mine["image_uri"].to_pylist())

    # four readers, one answer
    def key(rows):
        return sorted((r["image_uri"], r["pred_id"]) for r in rows)

    expected = key(table.scan(selected_fields=("image_uri", "pred_id")).to_arrow().to_pylist())
    import polars

    assert key(polars.scan_iceberg(table).select(["image_uri", "pred_id"]).collect().to_dicts()) == expected
    con = table.scan(selected_fields=("image_uri", "pred_id")).to_duckdb("preds")
    assert (
        key(dict(zip(("image_uri", "pred_id"), r)) for r in con.execute("select * from preds").fetchall()) == expected
    )
    props = catalog.catalog_properties(where["catalog"], where["warehouse"])
    ds = ray_cluster.data.read_iceberg(table_identifier="preds.t", catalog_kwargs={"name": "vitray", **props})
    assert key(ds.select_columns(["image_uri", "pred_id"]).take_all()) == expected
    assert sorted(uris) == sorted(u for u, _ in _versions(where) if "img00" in u and u < f"{bucket}/in/img006")


def test_a_reused_run_id_and_a_foreign_table_are_refused_before_anything_is_written(
    ray_cluster, bucket, model_uri, where
):
    _put_images(f"{bucket}/in", 2)
    table_run.run(_cfg(model_uri, bucket, where, run_id="once"))
    with pytest.raises(batch.RunIdTaken, match="--run-id once"):
        table_run.run(_cfg(model_uri, bucket, where, run_id="once"))
    assert len(_table(where).snapshots()) == 1
    cat = catalog.open_catalog(where["catalog"], where["warehouse"])
    cat.create_table("preds.other", schema=pa.schema([("image_uri", pa.int64()), ("score", pa.float32())]))
    with pytest.raises(catalog.TableRefused, match=r"preds.other .*missing columns \[.*'label_id'.*image_uri \(int64"):
        table_run.run(InferConfig(model=model_uri, input=f"{bucket}/in", table="preds.other", **where))
    assert cat.load_table("preds.other").current_snapshot() is None  # nothing written to it


def test_sqlite_catalog_in_a_pod_is_refused_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(catalog.TableRefused, match="pod.*REST catalog"):
        catalog.catalog_properties(f"sqlite:///{tmp_path}/c.db", None)
    with pytest.raises(catalog.TableRefused, match="expected sqlite"):
        catalog.catalog_properties("mysql://x", None)


def test_a_run_that_planned_before_another_committed_commits_nothing_twice(
    ray_cluster, bucket, model_uri, where, monkeypatch
):
    """Run A plans on snapshot S and predicts; meanwhile run B (same inputs) commits. A's commit lands on a newer
    snapshot, finds its input versions in what B added, and stops with nothing committed (exit 75); the next
    run predicts only what is still new. One row per input version throughout, no lease involved."""
    _put_images(f"{bucket}/in", 4)
    real = batch.predict_to_staging
    state = {"nested": False}

    def predict_then_let_b_commit(*a, **kw):
        staged = real(*a, **kw)
        if not state["nested"]:
            state["nested"] = True
            table_run.run(_cfg(model_uri, bucket, where, since_last_run=True, run_id="b"))
        return staged

    monkeypatch.setattr(batch, "predict_to_staging", predict_then_let_b_commit)
    with pytest.raises(snapshots.Conflict) as e:
        table_run.run(_cfg(model_uri, bucket, where, since_last_run=True, run_id="a"))
    assert e.value.exit_code == 75 and "4 of its inputs" in str(e.value)
    monkeypatch.undo()
    table = _table(where)
    assert [snapshots.summary(s)[snapshots.RUN_ID] for s in table.snapshots()] == ["b"]
    assert len(_versions(where)) == 4 == len(set(_versions(where)))
    assert not storage.list_files(f"{storage.parse_uri(table.location()).uri}/data/vitray-run=a")  # its files removed
    _put_images(f"{bucket}/in", 1, start=4)
    r = table_run.run(_cfg(model_uri, bucket, where, since_last_run=True, run_id="a2"))
    assert r["rows"] == 1 and len(_versions(where)) == 5 == len(set(_versions(where)))


def test_append_only_with_a_limit_keeps_the_mark_of_what_was_predicted(ray_cluster, bucket, model_uri, where):
    """The mark stored was the whole listing's: inputs past --limit were never listed again."""
    _put_images(f"{bucket}/in", 5)
    kw = dict(since_last_run=True, input_append_only=True, limit=2)
    for _ in range(3):
        table_run.run(_cfg(model_uri, bucket, where, **kw))
    assert len(_versions(where)) == 5 == len(set(_versions(where)))
    mark = snapshots.marks(_table(where).current_snapshot())
    assert list(mark.values())[0] == {storage.parse_uri(f"{bucket}/in").uri: f"{bucket}/in/img004.png"}


def _job(*args, env=None):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs/batch_infer.py"), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )


def test_killed_at_random_moments_every_input_version_is_committed_once(stack, bucket, model_uri, where):
    """SIGKILL of the job's process group at 5 seeded moments between its start and its end (planning,
    predicting, committing), each followed by a clean run: every input version exactly once, readers agree,
    and maintenance removes what the killed runs left."""
    _put_images(f"{bucket}/in", 6)
    args = ["--model", model_uri, "--input", f"{bucket}/in", "--table", "preds.t", "--since-last-run"]
    args += ["--catalog", where["catalog"], "--warehouse", where["warehouse"]]
    t0 = time.time()
    clean = _job(*args)
    out = clean.communicate(timeout=300)[0]
    assert clean.returncode == 0, out[-3000:]
    whole = time.time() - t0  # how long a run takes here: the kills land anywhere within it
    assert "query        python jobs/table.py show preds.t" in out
    rng = random.Random(36)
    for i in range(5):
        _put_images(f"{bucket}/in", 2, start=10 + 2 * i)
        job = _job(*args)
        time.sleep(rng.uniform(0.2, whole))
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        job.communicate(timeout=60)
        after = _job(*args)
        text = after.communicate(timeout=300)[0]
        assert after.returncode == 0, text[-3000:]
        versions = _versions(where)
        assert len(versions) == 6 + 2 * (i + 1) == len(set(versions)), versions
    table = _table(where)
    removed = maintenance.remove_orphans(table, grace_h=1.0, clock=lambda: time.time() + 7200)
    assert all("/data/vitray-run=" in u for u in removed)
    assert len(_versions(where)) == 16  # nothing the table references was removed
    con = table.scan(selected_fields=("image_uri", "input_version")).to_duckdb("p")
    assert con.execute("select count(*), count(distinct (image_uri, input_version)) from p").fetchone() == (16, 16)


def test_a_locked_catalog_is_a_clear_exit_75_with_nothing_committed(stack, bucket, model_uri, where, tmp_path):
    _put_images(f"{bucket}/in", 1)
    catalog.open_catalog(where["catalog"], where["warehouse"])  # the catalog's tables exist
    lock = sqlite3.connect(str(tmp_path / "catalog.db"), timeout=1)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        job = _job(
            "--model", model_uri, "--input", f"{bucket}/in", "--table", "preds.t",
            "--catalog", where["catalog"], "--warehouse", where["warehouse"],
        )  # fmt: skip
        text = job.communicate(timeout=300)[0]
    finally:
        lock.rollback()
        lock.close()
    assert job.returncode == 75, text[-3000:]
    assert "catalog" in text and "locked" in text and "Traceback" not in text
    with pytest.raises(Exception, match="preds.t"):
        _table(where)  # never created


def test_an_unreachable_rest_catalog_is_a_clear_exit_75_with_nothing_written(stack, bucket, model_uri):
    """The cluster's REST catalog is down (nothing listens on its port): the job says which catalog and
    why, exits 75 for the scheduler to try again, and writes nothing to the warehouse."""
    import socket

    _put_images(f"{bucket}/in", 2)
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = _job(
        "--model", model_uri, "--input", f"{bucket}/in", "--table", "preds.t",
        "--catalog", f"rest+http://127.0.0.1:{port}/api/catalog", "--warehouse", f"{bucket}/warehouse",
    )  # fmt: skip
    text = job.communicate(timeout=300)[0]
    assert job.returncode == 75, text[-3000:]
    assert f"cannot open the catalog http://127.0.0.1:{port}/api/catalog" in text and "Traceback" not in text
    assert not storage.list_files(f"{bucket}/warehouse")


def test_maintenance_expires_old_snapshots_and_keeps_the_current_one(ray_cluster, bucket, model_uri, where):
    _put_images(f"{bucket}/in", 2)
    for i in range(3):
        _put_images(f"{bucket}/in", 1, start=2 + i)
        table_run.run(_cfg(model_uri, bucket, where, since_last_run=True))
    table = _table(where)
    assert len(table.snapshots()) == 3
    later = time.time() + 40 * 86400  # the injected clock: 40 days on
    out = maintenance.maintain(table, retention_days=30, grace_h=24, clock=lambda: later)
    table = _table(where)
    assert out["expired_snapshots"] == 2 and len(table.snapshots()) == 1 and out["removed_files"] == 0
    assert table.scan().to_arrow().num_rows == 5  # the current snapshot still holds every row


def _commit_rows(cat, run_id, rows_, sha="ab" * 32, when=None):
    """Commit hand-made prediction rows as one run's snapshot (no Ray): the table's planning side, alone."""
    import datetime as dt

    import pyarrow.parquet as pq

    from pipeline.inference.rows import output_schema

    schema = output_schema(False)
    when = when or dt.datetime.now(dt.timezone.utc)
    full = [
        {f.name: None for f in schema}
        | {"model_uri": "m", "model_sha256": sha, "run_id": run_id, "inferred_at": when, "input_version": "1:1"}
        | r
        for r in rows_
    ]
    path = f"{cat.load_table('preds.t').location()}/data/vitray-run={run_id}/part-0.parquet"
    local = storage.parse_uri(path).path
    os.makedirs(os.path.dirname(local), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=schema), local)
    props = {snapshots.RUN_ID: run_id, snapshots.MODEL_SHA: sha, snapshots.MARKS: "{}"}
    return snapshots.commit(cat, "preds.t", cat.load_table("preds.t"), [path], props, {}, None, sha)


def test_append_only_planning_adds_back_only_what_is_still_failed_transiently(tmp_path):
    """Below the mark the listing no longer returns an input; one whose latest row is a transient error is
    added back, one that failed transiently and then succeeded is not (it would be predicted every night)."""
    import datetime as dt
    import types

    cat = catalog.open_catalog(f"sqlite:///{tmp_path}/c.db", f"file://{tmp_path}/wh")
    catalog.open_table(cat, "preds.t", embeddings=False)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (src / name).write_bytes(b"x")
    a, b, c = (storage.parse_uri(f"{src}/{n}").uri for n in ("a.png", "b.png", "c.png"))
    t0 = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    cut = {"error": "cannot read (timeout)", "error_kind": "transient"}
    _commit_rows(cat, "r1", [{"image_uri": a, **cut}, {"image_uri": b, **cut}], when=t0)
    _commit_rows(cat, "r2", [{"image_uri": b, "pred_id": 1}], when=t0 + dt.timedelta(days=1))
    table = cat.load_table("preds.t")
    marks = {"ab" * 32: {storage.parse_uri(str(src)).uri: storage.parse_uri(c).uri}}  # all listed once already
    base = table.current_snapshot()
    base.summary.additional_properties[snapshots.MARKS] = __import__("json").dumps(marks)
    cfg = InferConfig(model="m", input=str(src), table="preds.t", since_last_run=True, input_append_only=True)
    pre = types.SimpleNamespace(weights_sha256="ab" * 32, class_names=[])
    inputs, held, _, _ = table_run._plan(cfg, pre, table, base)
    assert inputs.table["image_uri"].to_pylist() == [a]  # b succeeded later: not added back
    todo = inputs.table.filter(__import__("pipeline.inference.ledger", fromlist=["x"]).todo(held, inputs.table))
    assert todo["image_uri"].to_pylist() == [a]


def test_two_schedules_started_together_leave_one_row_per_input_version(stack, bucket, model_uri, where):
    """No lease: both plan on the same snapshot; the one that commits second finds the other's rows and exits 75
    with nothing committed (or, if it planned after the first commit, has nothing new): never two rows."""
    _put_images(f"{bucket}/in", 4)
    args = ["--model", model_uri, "--input", f"{bucket}/in", "--table", "preds.t", "--since-last-run"]
    args += ["--catalog", where["catalog"], "--warehouse", where["warehouse"]]
    catalog.open_table(catalog.open_catalog(where["catalog"], where["warehouse"]), "preds.t", embeddings=False)
    a, b = _job(*args), _job(*args)
    outs = [p.communicate(timeout=300)[0] for p in (a, b)]
    codes = sorted(p.returncode for p in (a, b))
    assert codes in ([0, 0], [0, 75]), outs
    if codes == [0, 75]:
        loser = outs[[a.returncode, b.returncode].index(75)]
        assert "committed by another run after it planned" in loser and "Traceback" not in loser
    assert len(_versions(where)) == 4 == len(set(_versions(where)))
    assert len(_table(where).snapshots()) == 1


@pytest.mark.e2e
def test_a_writer_paused_after_planning_commits_nothing_twice(stack, bucket, model_uri, where):
    """Run A (a subprocess) is stopped with SIGSTOP (its process group: its driver and job-local Ray) once
    it writes its data files, after it planned; run B
    plans, predicts and commits everything; A resumes: its commit finds B's rows for its input versions and
    exits 75 with nothing committed. One row per input version, B's snapshot only, A's files orphans that
    maintenance may remove."""
    _put_images(f"{bucket}/in", 6)
    args = ["--model", model_uri, "--input", f"{bucket}/in", "--table", "preds.t", "--since-last-run"]
    args += ["--catalog", where["catalog"], "--warehouse", where["warehouse"], "--batch-size", 2]
    location = storage.parse_uri(
        catalog.open_table(catalog.open_catalog(where["catalog"], where["warehouse"]), "preds.t", False).location()
    )
    # each on a job-local Ray of its own: a stopped driver's actors would hold the shared cluster's CPU slots
    own = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    a = _job(*args, "--run-id", "a", env=own)
    deadline = time.time() + 240
    while time.time() < deadline and a.poll() is None:
        if storage.list_files(location.join("data", "vitray-run=a").uri):
            break
        time.sleep(0.05)
    os.killpg(a.pid, signal.SIGSTOP)
    try:
        b = _job(*args, "--run-id", "b", env=own)
        text_b = b.communicate(timeout=300)[0]
        assert b.returncode == 0, text_b[-3000:]
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    text_a = a.communicate(timeout=300)[0]
    runs = [snapshots.summary(s)[snapshots.RUN_ID] for s in _table(where).snapshots()]
    if runs == ["b"]:  # paused before its commit (what this test is for): refused at its commit
        assert a.returncode == 75 and "committed by another run after it planned" in text_a, text_a[-3000:]
    else:  # A had committed in the instant before the stop: B then found nothing new
        assert runs == ["a"] and a.returncode == 0 and "nothing new to predict" in text_b, (runs, text_a[-2000:])
    assert "Traceback" not in text_a
    assert len(_versions(where)) == 6 == len(set(_versions(where)))
