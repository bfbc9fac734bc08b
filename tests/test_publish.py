"""The output's lease and the publish protocol, against the real S3 server and local folders (no Ray):
one writer per prefix, a crash after any step of a commit, and what pandas, pyarrow and duckdb see."""

import datetime as dt
import importlib.util
import io
import json
import threading
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.core import conditional, storage
from pipeline.inference import publish
from pipeline.inference.lease import Lease, LeaseHeld, LeaseLost
from pipeline.inference.predictor import output_schema

SHA = "ab" * 32


@pytest.fixture(params=["s3", "local"])
def base(request, tmp_path):
    """An empty prefix on the real S3 server, or a local folder: the protocol is the same on both."""
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/team/run=prod/preds"  # `run=` above --output on purpose
    return str(tmp_path / "run=prod" / "preds")


# ---- lease -------------------------------------------------------------------------------------
def test_second_lease_is_refused_with_holder_and_expiry(base):
    with Lease(base, "night-1", ttl_s=60):
        with pytest.raises(LeaseHeld, match=r"run 'night-1' .* expires at 20\d\d-") as e:
            Lease(base, "night-2", ttl_s=60).acquire()
        assert e.value.holder["run_id"] == "night-1"
    with Lease(base, "night-2", ttl_s=60):  # released: the next one gets it at once
        pass
    assert not storage.exists(storage.parse_uri(base).join("_lease.json").uri)


def test_lease_is_renewed_while_held_and_taken_over_after_a_crash(base):
    holder = Lease(base, "long-run", ttl_s=3).acquire()
    time.sleep(3.5)  # past one TTL: still ours because it was renewed
    assert holder.renewals >= 2
    holder.check()
    with pytest.raises(LeaseHeld):
        Lease(base, "tonight", ttl_s=3).acquire()
    holder._stop.set()  # the holder crashes: no more renewals, no release
    holder._thread.join()
    time.sleep(3.2)
    with Lease(base, "tonight", ttl_s=30) as successor:
        assert json.loads(storage.read_bytes(successor.uri))["run_id"] == "tonight"
        with pytest.raises(LeaseLost):  # the old holder finds out before its next irreversible step
            holder.check()


def test_two_runs_started_together_get_one_lease(base):
    results = []

    def contend(i):
        try:
            Lease(base, f"run-{i}", ttl_s=60).acquire()
            results.append(("won", i))
        except LeaseHeld:
            results.append(("refused", i))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(r for r, _ in results) == ["refused"] * 3 + ["won"]


# ---- the commit protocol -----------------------------------------------------------------------
def _stage(layout, run_id, uris, parts=2, error_every=0):
    """Write what the Ray job would stage for `uris`: `parts` Parquet files of the real output schema."""
    schema = output_schema(2, None)
    now = dt.datetime.now(dt.timezone.utc)
    staged = []
    for p in range(parts):
        chunk = uris[p::parts]
        rows = [
            {
                "image_uri": u,
                "label_id": i % 3,
                "label": None,
                "pred_id": None if error_every and i % error_every == 0 else i % 3,
                "pred": None,
                "score": 0.5,
                "topk_ids": [i % 3, 0],
                "topk_scores": [0.5, 0.1],
                "error": "does not decode" if error_every and i % error_every == 0 else None,
                "model_uri": "m",
                "model_sha256": SHA,
                "run_id": run_id,
                "inferred_at": now,
            }
            for i, u in enumerate(chunk)
        ]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        uri = layout.staging(run_id).join(f"part-{p:06d}-x-0{publish.STAGED_SUFFIX}").uri
        storage.write_bytes(uri, buf.getvalue())
        staged.append(uri)
    return staged


def _run_once(layout, run_id, uris, lease):
    """A run of the job minus the model: recover, skip what the ledger has, stage the rest, commit."""
    publish.recover(layout, lease)
    todo = sorted(set(uris) - publish.done_inputs(layout, SHA))
    if not todo:
        return None
    staged = _stage(layout, run_id, todo)
    intent = publish.plan_commit(
        layout,
        run_id,
        "2026-11-28",
        staged,
        accuracy_report={"top1": 0.5},
        ledger=True,
        rows=len(todo),
        inputs=len(todo),
        errors=0,
        model_sha256=SHA,
    )
    publish.commit(layout, intent, lease)
    return intent


class Crash(BaseException):  # a killed process: no `except Exception` catches it
    pass


def _crash_after(monkeypatch, n):
    """Every storage write (put, copy, delete) counts; the n+1-th one raises, as a killed process would stop."""
    count = {"n": 0}
    writes = ((storage, "write_bytes"), (conditional, "write_conditional"), (storage, "copy"), (storage, "delete"))
    for module, name in writes:
        real = getattr(module, name)

        def wrapped(*a, _real=real, **kw):
            if count["n"] >= n:
                raise Crash(f"crash before write {count['n']}")
            count["n"] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, wrapped)
    return count


def _duckdb(sql_path: str, query: str):
    import duckdb

    con = duckdb.connect()
    if sql_path.startswith("s3://"):
        ext = list(importlib.util.find_spec("duckdb_ext").submodule_search_locations)[0]
        con.execute(f"SET extension_directory='{ext}/extensions'")
        con.execute("LOAD httpfs")
        endpoint = storage.endpoint_url().split("://", 1)[1]
        con.execute(
            "CREATE SECRET (TYPE s3, KEY_ID ?, SECRET ?, ENDPOINT ?, URL_STYLE 'path', USE_SSL false, REGION "
            "'us-east-1')",
            [
                __import__("os").environ["AWS_ACCESS_KEY_ID"],
                __import__("os").environ["AWS_SECRET_ACCESS_KEY"],
                endpoint,
            ],
        )
    return con.sql(query.replace("OUT", sql_path)).fetchall()


def _readers_see(base) -> dict:
    """Rows that pandas, pyarrow.dataset and duckdb read from the output, with their defaults and the
    README's queries; each must read without error whatever state a crash left."""
    import pandas as pd

    fs, path = storage.resolve(base)
    seen = {"pandas": len(pd.read_parquet(path, filesystem=fs)) if storage.list_files(base) else 0}
    ds = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    seen["pyarrow"] = ds.to_table().num_rows
    if any(f.path.endswith(".parquet") for f in storage.list_files(base)):
        seen["duckdb"] = _duckdb(
            base, "SELECT count(*) FROM read_parquet('OUT/**/*.parquet', hive_partitioning = true)"
        )[0][0]
    if publish.committed_runs(base):  # duckdb refuses a glob that matches nothing
        seen["duckdb_committed"] = _duckdb(
            base,
            """
            SELECT count(*) FROM read_parquet('OUT/*/*/*.parquet', hive_partitioning = true)
            WHERE run_id IN (SELECT run_id FROM read_json('OUT/*/*/_SUCCESS', columns = {run_id: 'VARCHAR'}))""",
        )[0][0]
    return seen


def test_a_clean_commit_is_what_every_reader_sees(base):
    layout = publish.Layout.of(base)
    uris = [f"s3://in/img{i:02d}.jpg" for i in range(10)]
    with Lease(base, "r1") as lease:
        intent = _run_once(layout, "r1", uris, lease)
    assert _readers_see(base) == {"pandas": 10, "pyarrow": 10, "duckdb": 10, "duckdb_committed": 10}
    assert [r["run_id"] for r in publish.committed_runs(base)] == ["r1"]
    assert sorted(publish.read_published(base).column("image_uri").to_pylist()) == uris
    names = {f.path.rsplit("/", 1)[1] for f in storage.list_files(intent.run_dir)}
    assert names == {"part-00000.parquet", "part-00001.parquet", "_accuracy.json", "_SUCCESS"}
    assert not [f for f in storage.list_files(base) if "/_staging/" in f.path or "/_commits/" in f.path]


def test_a_crash_after_any_step_of_a_commit_leaves_readable_output_and_exactly_one_result(base, monkeypatch):
    uris = [f"s3://in/img{i:02d}.jpg" for i in range(10)]
    probe = f"{base}/probe"
    with Lease(probe, "count") as lease:
        count = _crash_after(monkeypatch, 10**6)
        _run_once(publish.Layout.of(probe), "count", uris, lease)
        writes = count["n"]
    monkeypatch.undo()
    assert writes >= 9  # intent, 2 parts, accuracy, marker, ledger, 2 staged deletes, intent delete (+ staging)
    for n in range(writes):
        out = f"{base}/crash{n}"
        layout = publish.Layout.of(out)
        storage.write_bytes(f"{base}/sibling-{n}.txt", b"beside the output")  # must survive
        lease = Lease(out, "crashed", ttl_s=600).acquire()
        _crash_after(monkeypatch, n)
        with pytest.raises(Crash):
            _run_once(layout, "crashed", uris, lease)
        monkeypatch.undo()
        lease._stop.set()  # the process is gone: its lease is never renewed nor released
        seen = _readers_see(out)  # no reader fails on what the crash left
        assert seen.get("duckdb_committed", 0) in (0, 10) and seen["pyarrow"] <= 10
        storage.delete(lease.uri)  # the TTL has passed (the lease tests show the take-over itself)
        with Lease(out, "next") as nxt:
            _run_once(layout, "next", uris, nxt)
        table = publish.read_published(out)
        assert sorted(table.column("image_uri").to_pylist()) == uris, f"crash after write {n}"
        assert _readers_see(out) == {"pandas": 10, "pyarrow": 10, "duckdb": 10, "duckdb_committed": 10}
        assert not [f for f in storage.list_files(out) if "/_staging/" in f.path or "/_commits/" in f.path]
        assert storage.read_bytes(f"{base}/sibling-{n}.txt") == b"beside the output"


def test_ledger_retries_errors_and_its_read_does_not_grow_with_runs(base):
    layout = publish.Layout.of(base)
    with Lease(base, "r0") as lease:
        for r in range(3):
            uris = [f"s3://in/r{r}-{i}.jpg" for i in range(6)]
            staged = _stage(layout, f"r{r}", uris, error_every=3)
            intent = publish.plan_commit(
                layout,
                f"r{r}",
                "2026-11-28",
                staged,
                accuracy_report=None,
                ledger=True,
                rows=6,
                inputs=6,
                errors=2,
                model_sha256=SHA,
            )
            publish.commit(layout, intent, lease)
    failed = {r["image_uri"] for r in publish.read_published(base).to_pylist() if r["error"]}
    done = publish.done_inputs(layout, SHA)
    assert len(failed) == 6 and len(done) == 12 and not failed & done  # errors are retried
    assert len(publish.done_inputs(layout, SHA, retry_errors=False)) == 18  # unless told otherwise
    ledgers = [f.path.rsplit("/", 1)[1] for f in storage.list_files(layout.output.join("_ledger").uri)]
    assert [n for n in ledgers if not n.startswith(".")] == [f"{SHA}.ledger"]  # one object per model (+ a local lock)
    # an output written before ledgers existed: the ledger is rebuilt once from the committed runs
    storage.delete(layout.ledger(SHA).uri)
    assert publish.done_inputs(layout, SHA) == done


def test_storage_keeps_every_legal_s3_key_verbatim(bucket):
    names = ["cat#1.jpg", "q?x=1&y=2.jpg", "pc%20t.jpg", "sp ace.jpg", "ünï cödé.jpg", "a+b.jpg"]
    for n in names:
        storage.write_bytes(f"{bucket}/in/{n}", n.encode())
    listed = [storage.to_uri(storage.parse_uri(bucket), f.path) for f in storage.list_files(f"{bucket}/in")]
    assert sorted(listed) == sorted(f"{bucket}/in/{n}" for n in names)
    for uri in listed:
        assert storage.read_bytes(uri) == uri.rsplit("/", 1)[1].encode()
