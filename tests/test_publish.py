"""The output's lease and the publish protocol, against the real S3 server and local folders (no Ray):
one writer per prefix, a crash after any step of a commit, and what pandas, pyarrow and duckdb see."""

import datetime as dt
import hashlib
import importlib.util
import io
import json
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.core import conditional, scratch, storage
from pipeline.core.lease import Lease, LeaseHeld, LeaseLost
from pipeline.inference import ledger, outputs, publish
from pipeline.inference.rows import output_schema

SHA = "ab" * 32


@pytest.fixture(params=["s3", "local"])
def base(request, tmp_path):
    """An empty prefix on the real S3 server, or a local folder: the protocol is the same on both."""
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/team/run=prod/preds"  # `run=` above --output on purpose
    return str(tmp_path / "run=prod" / "preds")


# ---- lease -------------------------------------------------------------------------------------
class Watch:
    """An injected monotonic clock for a run that watches another holder's lease: each sleep advances it."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def _watching(base, run_id, watch, **kw) -> Lease:
    return Lease(base, run_id, clock=watch, sleep=watch.sleep, **kw)


def test_second_lease_is_refused_with_holder_and_expiry(base):
    with Lease(base, "night-1", ttl_s=3):  # renewed every second: the second run sees it change
        with pytest.raises(LeaseHeld, match=r"run 'night-1' .* changed it while this run watched") as e:
            Lease(base, "night-2", ttl_s=3).acquire()
        assert e.value.holder["run_id"] == "night-1"
    with Lease(base, "night-2", ttl_s=60):  # released: the next one gets it at once
        pass
    released = json.loads(storage.read_bytes(storage.parse_uri(base).join("_lease.json").uri))
    assert released["released"] and released["generation"] == 2  # kept, so the fencing token only grows


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
    watch = Watch()
    with _watching(base, "tonight", watch, ttl_s=30) as successor:  # unchanged for one TTL: taken over
        assert 30 <= watch.t < 33
        assert json.loads(storage.read_bytes(successor.uri))["run_id"] == "tonight"
        with pytest.raises(LeaseLost):  # the old holder finds out before its next irreversible step
            holder.check()


def test_two_runs_started_together_get_one_lease(base):
    results, won = [], []

    def contend(i):
        try:
            won.append(Lease(base, f"run-{i}", ttl_s=3).acquire())
            results.append(("won", i))
        except LeaseHeld:
            results.append(("refused", i))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    [lease.release() for lease in won]
    assert sorted(r for r, _ in results) == ["refused"] * 3 + ["won"]


# ---- the commit protocol -----------------------------------------------------------------------
def _stage(layout, run_id, uris, parts=2, error_every=0):
    """Write what the Ray job would stage for `uris`: `parts` Parquet files of the real output schema."""
    schema = output_schema(embeddings=False)
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
        uri = layout.staging(run_id).join(f"part-{p:06d}-x-0{outputs.STAGED_SUFFIX}").uri
        storage.write_bytes(uri, buf.getvalue())
        staged.append(uri)
    return staged


def _todo(layout, uris, retry_errors=True, versions=None):
    listed = pa.table({"image_uri": uris, "input_version": versions or pa.nulls(len(uris), pa.string())})
    mask = ledger.todo(ledger.read_ledger(layout, SHA), listed, retry_errors)
    return sorted(listed.filter(mask)["image_uri"].to_pylist())


def _run_once(layout, run_id, uris, lease, fence=0):
    """A run of the job minus the model: recover, skip what the ledger has, stage the rest, commit."""
    publish.recover(layout, lease)
    todo = _todo(layout, uris)
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
        fence=fence,
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
    if outputs.committed_runs(base):  # duckdb refuses a glob that matches nothing
        seen["duckdb_committed"] = _duckdb(
            base,
            """
            SELECT count(*) FROM read_parquet('OUT/*/*/*.parquet', hive_partitioning = true)
            WHERE run_id IN (SELECT run_id FROM read_json('OUT/*/*/_SUCCESS', columns = {run_id: 'VARCHAR'}))""",
        )[0][0]
    return seen


def test_a_clean_commit_is_what_every_reader_sees(base):
    layout = outputs.Layout.of(base)
    uris = [f"s3://in/img{i:02d}.jpg" for i in range(10)]
    with Lease(base, "r1") as lease:
        intent = _run_once(layout, "r1", uris, lease)
    assert _readers_see(base) == {"pandas": 10, "pyarrow": 10, "duckdb": 10, "duckdb_committed": 10}
    assert [r["run_id"] for r in outputs.committed_runs(base)] == ["r1"]
    assert sorted(outputs.read_published(base).column("image_uri").to_pylist()) == uris
    names = {f.path.rsplit("/", 1)[1] for f in storage.list_files(intent.run_dir)}
    assert names == {"part-00000.parquet", "part-00001.parquet", "_accuracy.json", "_SUCCESS"}
    assert not [f for f in storage.list_files(base) if "/_staging/" in f.path or "/_commits/" in f.path]


def test_a_crash_after_any_step_of_a_commit_leaves_readable_output_and_exactly_one_result(base, monkeypatch):
    uris = [f"s3://in/img{i:02d}.jpg" for i in range(10)]
    probe = f"{base}/probe"
    with Lease(probe, "count") as lease:
        count = _crash_after(monkeypatch, 10**6)
        _run_once(outputs.Layout.of(probe), "count", uris, lease)
        writes = count["n"]
    monkeypatch.undo()
    assert writes >= 9  # intent, 2 parts, accuracy, marker, ledger, 2 staged deletes, intent delete (+ staging)
    for n in range(writes):
        out = f"{base}/crash{n}"
        layout = outputs.Layout.of(out)
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
        table = outputs.read_published(out)
        assert sorted(table.column("image_uri").to_pylist()) == uris, f"crash after write {n}"
        assert _readers_see(out) == {"pandas": 10, "pyarrow": 10, "duckdb": 10, "duckdb_committed": 10}
        assert not [f for f in storage.list_files(out) if "/_staging/" in f.path or "/_commits/" in f.path]
        assert storage.read_bytes(f"{base}/sibling-{n}.txt") == b"beside the output"


def _commit_rows(layout, lease, run_id, rows):
    """Commit one run whose rows are given as (uri, error, error_kind, version)."""
    schema = output_schema(embeddings=False)
    now = dt.datetime.now(dt.timezone.utc)
    table = pa.Table.from_pylist(
        [
            {
                "image_uri": u,
                "pred_id": None if err else 1,
                "error": err,
                "error_kind": kind,
                "input_version": ver,
                "model_uri": "m",
                "model_sha256": SHA,
                "run_id": run_id,
                "inferred_at": now,
            }
            for u, err, kind, ver in rows
        ],
        schema=schema,
    )
    uri = layout.staging(run_id).join(f"part-000000-x-0{outputs.STAGED_SUFFIX}").uri
    storage.write_bytes(uri, outputs.parquet_bytes(table))
    intent = publish.plan_commit(
        layout,
        run_id,
        "2026-12-03",
        [uri],
        accuracy_report=None,
        ledger=True,
        fence=lease.generation,
        rows=len(rows),
        inputs=len(rows),
        errors=0,
        model_sha256=SHA,
        listed_through={"s3://in": max(u for u, *_ in rows)},
    )
    publish.commit(layout, intent, lease)


def test_ledger_retries_transient_errors_and_changed_objects_never_an_unchanged_broken_one(base, monkeypatch):
    monkeypatch.setattr(ledger, "COMPACT_AFTER", 3)
    layout = outputs.Layout.of(base)
    uris = ["s3://in/ok.jpg", "s3://in/timeout.jpg", "s3://in/truncated.jpg", "s3://in/fixed.jpg"]
    v1 = ["10:1", "10:1", "10:1", "10:1"]
    with Lease(base, "nightly") as lease:
        _commit_rows(
            layout,
            lease,
            "n1",
            [
                (uris[0], None, None, "10:1"),
                (uris[1], "cannot read (timed out)", "transient", "10:1"),
                (uris[2], "does not decode", "permanent", "10:1"),
                (uris[3], "does not decode", "permanent", "10:1"),
            ],
        )
        # unchanged objects: only the transient failure is tried again
        assert _todo(layout, uris, versions=v1) == [uris[1]]
        assert ledger.transient_failures(layout, SHA) == [uris[1]]
        assert _todo(layout, uris, retry_errors=False, versions=v1) == []
        # the broken file was replaced: a new version is a new input
        v2 = ["10:1", "10:1", "10:1", "12:9"]
        assert _todo(layout, uris, versions=v2) == sorted([uris[1], uris[3]])
        for n in range(2, 7):  # nightly runs: the same two inputs each time until they succeed
            todo = _todo(layout, uris, versions=v2)
            if not todo:
                break
            _commit_rows(layout, lease, f"n{n}", [(u, None, None, v2[uris.index(u)]) for u in todo])
        assert _todo(layout, uris, versions=v2) == []
    published = outputs.read_published(base).to_pylist()
    per_input = {}
    for r in published:
        per_input.setdefault(r["image_uri"], []).append((r["input_version"], r["error_kind"]))
    # one row per version of each object; the unchanged broken one has exactly one row
    assert per_input[uris[2]] == [("10:1", "permanent")]
    assert sorted(per_input[uris[3]]) == [("10:1", "permanent"), ("12:9", None)]
    assert per_input[uris[1]] == [("10:1", "transient"), ("10:1", None)]
    objects = [n for _, n in outputs.files_under(layout.ledger_dir(SHA))]
    assert all(n.endswith(".ledger") for n in objects) and len(objects) <= 4  # appended, compacted after 3
    assert ledger.read_ledger(layout, SHA).num_rows == 4
    assert ledger.high_water_marks(layout, SHA) == {"s3://in": max(uris)}  # kept through the compaction


def test_an_intent_that_landed_after_a_take_over_is_rolled_back_not_wedging_the_output(base):
    """Run A staged and paused; run B took the output over and removed A's staging; A's intent PUT then
    landed. The next run rolls that intent back (A's inputs stay unpredicted) instead of failing forever."""
    layout = outputs.Layout.of(base)
    uris = [f"s3://in/img{i:02d}.jpg" for i in range(6)]
    a = Lease(base, "A", ttl_s=60).acquire()
    staged = _stage(layout, "A", uris)
    intent = publish.plan_commit(
        layout,
        "A",
        "2026-12-03",
        staged,
        accuracy_report=None,
        ledger=True,
        fence=a.generation,
        rows=6,
        inputs=6,
        errors=0,
        model_sha256=SHA,
    )
    a._stop.set()  # A is paused: no renewals
    storage.write_bytes(a.uri, json.dumps({"run_id": "A", "expires_at": 0, "generation": 1}).encode())  # expired
    with _watching(base, "B", Watch()) as b:
        assert b.generation == 2
        publish.recover(layout, b)  # A's staging is gone
        storage.write_bytes(layout.intent("A").uri, intent.to_json())  # A's late PUT lands
        with pytest.raises(LeaseLost):
            publish.commit(layout, intent, a)  # A itself is fenced off: it writes nothing more
    with Lease(base, "C") as c:
        rec = publish.recover(layout, c)
        assert rec.rolled_back == ["A"] and not rec.finished
        assert _todo(layout, uris) == sorted(uris)
        _run_once(layout, "C", uris, c)
    assert sorted(outputs.read_published(base).column("image_uri").to_pylist()) == sorted(uris)
    assert _readers_see(base) == {"pandas": 6, "pyarrow": 6, "duckdb": 6, "duckdb_committed": 6}
    # a part that a stale holder copies in after the roll-back is removed by the next run
    storage.write_bytes(intent.parts[0][1], b"late")
    with Lease(base, "D") as d:
        assert publish.recover(layout, d).removed == 1
    assert not storage.exists(intent.parts[0][1])


def test_a_holder_superseded_at_its_intent_leaves_it_for_the_one_finishing_it(base, monkeypatch):
    """A writes its intent and is superseded before its next fence; B, taking over, starts finishing A's
    commit and dies after one part. A must not delete the intent B was finishing: the next holder rolls
    it forward, so no glob reader is left with parts that no intent, `_SUCCESS` or tombstone accounts for."""
    layout = outputs.Layout.of(base)
    uris = [f"s3://in/img{i:02d}.jpg" for i in range(6)]
    a = Lease(base, "A", ttl_s=3).acquire()
    intent = publish.plan_commit(
        layout, "A", "2026-12-03", _stage(layout, "A", uris), accuracy_report=None, ledger=True,
        fence=a.generation, rows=6, inputs=6, errors=0, model_sha256=SHA,
    )  # fmt: skip
    real_fence, real_copy = a.fence, storage.copy

    def superseded_after_its_intent():
        if storage.exists(layout.intent("A").uri):  # A's second fence: B took over in the meantime
            a._stop.set()
            a._thread.join()
            copies = {"n": 0}

            def dies_after_one(*args, **kw):
                if copies["n"]:
                    raise Crash("B is killed mid-copy")
                copies["n"] += 1
                return real_copy(*args, **kw)

            b = _watching(base, "B", Watch()).acquire()
            b._stop.set()  # B dies: it renews no more
            monkeypatch.setattr(storage, "copy", dies_after_one)
            with pytest.raises(Crash):
                publish.recover(layout, b)
            monkeypatch.setattr(storage, "copy", real_copy)
        real_fence()

    monkeypatch.setattr(a, "fence", superseded_after_its_intent)
    with pytest.raises(LeaseLost):
        publish.commit(layout, intent, a)
    assert publish.outcome(layout, "A") == "pending"  # the intent stays for whoever holds the output next
    with _watching(base, "C", Watch()) as c:
        assert publish.recover(layout, c).finished == ["A"]
    assert publish.outcome(layout, "A") == "published"
    assert sorted(outputs.read_published(base).column("image_uri").to_pylist()) == sorted(uris)
    assert _readers_see(base) == {"pandas": 6, "pyarrow": 6, "duckdb": 6, "duckdb_committed": 6}


def test_a_superseded_holder_finds_out_at_its_fence(base):
    a = Lease(base, "A", ttl_s=3).acquire()
    a._stop.set()  # paused past its TTL
    a._thread.join()
    time.sleep(3.2)
    with _watching(base, "B", Watch(), ttl_s=60) as b:
        assert b.generation == a.generation + 1
        with pytest.raises(LeaseLost, match="not renewed"):  # its own clock tells it
            a.fence()
        a.renewed_at = time.monotonic()  # a clock that does not see the pause (skew): the store tells it
        with pytest.raises(LeaseLost, match="changed by another run"):
            a.fence()
        assert json.loads(storage.read_bytes(b.uri))["run_id"] == "B"  # A's fence wrote nothing


def test_a_retried_put_whose_first_attempt_landed_is_ours(base, monkeypatch):
    """The reply to our conditional PUT was lost, the retry got 412: the lease recognises its own token."""
    real = conditional.write_conditional
    lost = {"n": 0}

    def reply_lost(uri, data, **kw):
        tag = real(uri, data, **kw)  # it lands ...
        if uri.endswith("_lease.json") and lost["n"] < 2:
            lost["n"] += 1
            raise conditional.PreconditionFailed("412 on the retry")  # ... and the retry is refused
        return tag

    monkeypatch.setattr(conditional, "write_conditional", reply_lost)
    lease = Lease(base, "mine", ttl_s=60).acquire()  # the acquiring PUT
    assert lost["n"] == 1 and lease.tag == conditional.read_with_tag(lease.uri)[1]
    lease.fence()  # a renewal, same story
    assert lost["n"] == 2 and not lease.lost
    monkeypatch.undo()
    lease.release()
    assert json.loads(storage.read_bytes(lease.uri))["released"]


def test_expiry_is_judged_by_watching_the_lease_not_by_the_holders_clock(base):
    """A crashed holder whose clock is a day fast is taken over after one TTL of watching; a live holder
    whose clock is an hour slow (its lease looks long expired) is left alone."""
    uri = storage.parse_uri(base).join("_lease.json").uri

    def body(run_id, expires_at, token):
        return json.dumps(
            {"run_id": run_id, "token": token, "generation": 4, "expires_at": expires_at, "ttl_s": 3, "released": False}
        ).encode()

    conditional.write_conditional(uri, body("fast", time.time() + 86400, "t0"), if_absent=True)
    watch = Watch()
    with _watching(base, "next", watch, ttl_s=3) as taker:
        assert 3 <= watch.t < 4 and taker.generation == 5
    stop, renewals = threading.Event(), [0]

    def slow_live_holder():
        tag = conditional.read_with_tag(uri)[1]
        while not stop.wait(0.3):
            renewals[0] += 1
            tag = conditional.write_conditional(uri, body("slow", time.time() - 3600, str(renewals[0])), if_match=tag)

    conditional.write_conditional(
        uri, body("slow", time.time() - 3600, "t1"), if_match=conditional.read_with_tag(uri)[1]
    )
    holder = threading.Thread(target=slow_live_holder)
    holder.start()
    try:
        with pytest.raises(LeaseHeld, match="'slow'"):
            Lease(base, "eager", ttl_s=3).acquire()  # the real clock: it sees a renewal within the TTL
    finally:
        stop.set()
        holder.join()
    assert json.loads(storage.read_bytes(uri))["run_id"] == "slow" and renewals[0] >= 1


def test_the_generation_only_grows_when_the_lease_is_deleted_or_unreadable(base, monkeypatch):
    """An operator deletes a stuck lease on a compacted output (or it is overwritten with garbage): the
    next holder continues the generation from the output's records, so its ledger object sorts after the
    merged base and is read: nothing is predicted twice, and --unsafe-no-lease continues it too."""
    from pipeline.core.lease import NoLease

    monkeypatch.setattr(ledger, "COMPACT_AFTER", 1)
    layout = outputs.Layout.of(base)
    floor = lambda: outputs.highest_fence(layout)  # noqa: E731
    uris = [f"s3://in/img{i:02d}.jpg" for i in range(6)]
    for i in range(3):
        with Lease(base, f"r{i}", floor=floor) as lease:
            _run_once(layout, f"r{i}", uris[: 2 * (i + 1)], lease, fence=lease.generation)
    assert lease.generation == 3 and outputs.highest_fence(layout) == 3
    for damage in (lambda: storage.delete(lease.uri), lambda: storage.write_bytes(lease.uri, b"not json")):
        damage()
        with Lease(base, "after", floor=floor) as nxt:
            assert nxt.generation == 4
    more = [*uris, "s3://in/new.jpg"]
    with NoLease(floor) as unleased:
        assert unleased.generation == 4
        assert _run_once(layout, "after", more, unleased, fence=unleased.generation).success["inputs"] == 1
    assert outputs.highest_fence(layout) == 4
    with Lease(base, "again", floor=floor) as lease:
        assert _todo(layout, more) == []  # the newest run's ledger object is read: nothing twice
        assert _run_once(layout, "again", more, lease, fence=lease.generation) is None


def test_409_conditional_request_conflict_is_a_lost_race():
    from botocore.exceptions import ClientError

    conflict = ClientError(
        {"Error": {"Code": "ConditionalRequestConflict"}, "ResponseMetadata": {"HTTPStatusCode": 409}}, "PutObject"
    )
    assert conditional._is_precondition_failure(conflict)
    other = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    assert not conditional._is_precondition_failure(other)


def test_a_holder_without_progress_or_past_its_maximum_gives_the_output_up(base):
    for kwargs, why in (({"stall_s": 0.5, "progress": lambda: 0}, "no progress"), ({"max_run_s": 0.5}, "max-run-s")):
        gave_up = threading.Event()
        lease = Lease(base, "hung", ttl_s=3, on_lost=gave_up.set, **kwargs).acquire()
        assert gave_up.wait(30)
        with pytest.raises(LeaseLost, match=why):
            lease.check()
        lease.release()  # still ours: released, so the next run need not wait a TTL
        with Lease(base, "next", ttl_s=60):
            pass


def test_the_probe_passes_a_store_that_honours_conditional_writes(bucket):
    conditional.probe(f"{bucket}/out", "t")
    assert not storage.list_files(f"{bucket}/out")


def _look_alike(mode: str):
    """A tiny S3 look-alike. "ignoring": 200 to every PUT and DELETE, whatever the headers say.
    "check-then-write": honours If-None-Match / If-Match one request at a time, but checks apart from the
    write (two PUTs that both arrive before either wrote both pass: a barrier makes them overlap)."""
    import http.server
    import socketserver

    objects, writes = {}, threading.Lock()
    overlap = threading.Barrier(2, timeout=5)  # a probe that never sends two at once: the wait times out

    class Store(http.server.BaseHTTPRequestHandler):
        def _send(self, code, body=b"", etag=None):
            self.send_response(code)
            if etag:
                self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self):
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if mode == "check-then-write":
                current = objects.get(self.path)
                tag = current and f'"{hashlib.md5(current).hexdigest()}"'
                refused = (self.headers.get("If-None-Match") == "*" and current is not None) or (
                    self.headers.get("If-Match") not in (None, tag)
                )
                if refused:
                    return self._send(412, b"<Error><Code>PreconditionFailed</Code></Error>")
                if self.path.endswith("-race"):
                    try:
                        overlap.wait()  # the check is done; the write comes later
                    except threading.BrokenBarrierError:
                        pass
            with writes:
                objects[self.path] = data
            self._send(200, etag=f'"{hashlib.md5(data).hexdigest()}"')

        def do_GET(self):
            if self.path in objects:
                self._send(200, objects[self.path], etag=f'"{hashlib.md5(objects[self.path]).hexdigest()}"')
            else:
                self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")

        def do_DELETE(self):
            objects.pop(self.path, None)
            self._send(204)

        def log_message(self, *a):
            pass

    return socketserver.ThreadingTCPServer(("127.0.0.1", 0), Store), objects


@pytest.mark.parametrize(
    "mode, accepted",
    [
        ("ignoring", "a second PUT with If-None-Match"),
        ("check-then-write", r"\d of 4 PUTs with If-None-Match: \* sent at once"),
    ],
)
def test_the_probe_refuses_a_store_that_ignores_conditional_writes(bucket, monkeypatch, mode, accepted):
    """#38 item 10: a store that checks the condition apart from the write passes every sequential check;
    the probe's concurrent PUTs catch it."""
    server, objects = _look_alike(mode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(conditional.UnsafeStore, match=f"{accepted}.*--unsafe-no-lease"):
            conditional.probe("s3://any/out", "t")
        assert not objects  # the scratch keys are removed
    finally:
        server.shutdown()
        server.server_close()


def test_a_local_output_on_a_mount_without_shared_locks_is_refused(tmp_path):
    """#38 item 10: local outputs rely on flock, which does not lock across machines on FUSE object-store
    mounts, SMB or NFS mounted nolock; /proc/self/mountinfo says which mount holds the output."""
    line = "36 25 0:32 / {point} rw,relatime - {fstype} server:/x rw,{opts}\n"
    base = line.format(point="/", fstype="ext4", opts="discard")
    for fstype, opts, refused in (
        ("ext4", "discard", False),
        ("nfs4", "vers=4.2,hard", False),
        ("nfs", "vers=3,nolock", True),
        ("nfs4", "vers=4.1,local_lock=all", True),
        ("fuse.s3fs", "user_id=0", True),
        ("cifs", "vers=3.0", True),
    ):
        info = base + line.format(point="/mnt/shared", fstype=fstype, opts=opts)
        assert conditional.mount_of("/mnt/shared/preds", info)[0] == fstype
        if refused:
            with pytest.raises(conditional.UnsafeStore, match=f"{fstype} mount.*--unsafe-no-lease"):
                conditional.check_local_locking("/mnt/shared/preds", info)
        else:
            conditional.check_local_locking("/mnt/shared/preds", info)
        conditional.check_local_locking("/home/preds", info)  # another mount: not affected
    conditional.probe(str(tmp_path / "out"), "t")  # this machine's own disk passes


def test_a_local_writer_killed_mid_copy_leaves_nothing_a_reader_trips_on(tmp_path):
    """A process killed between writing a part's bytes and renaming them: pandas and pyarrow read the
    folder, and the next run's recovery removes the leftover."""
    import subprocess
    import sys
    import textwrap

    import pandas as pd

    out = tmp_path / "preds"
    script = textwrap.dedent(
        f"""
        import os, signal
        import pyarrow as pa, pyarrow.parquet as pq
        from pipeline.core import storage
        os.makedirs("{out}/dt=1/run=a")
        pq.write_table(pa.table({{"x": [1, 2]}}), "{out}/dt=1/run=a/part-00000.parquet")
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # killed right before the rename
        storage.write_bytes("{out}/dt=1/run=a/part-00001.parquet", b"PAR1 half a file")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert proc.returncode == -9
    leftovers = list((out / "dt=1" / "run=a" / "_tmp").iterdir())
    assert len(leftovers) == 1  # the half-written bytes, where no reader looks
    assert len(pd.read_parquet(out)) == 2
    assert pads.dataset(str(out), format="parquet", partitioning="hive").to_table().num_rows == 2
    assert scratch.remove_local_tmp(str(out / "dt=1" / "run=a")) == 1
    assert not (out / "dt=1" / "run=a" / "_tmp").exists()


def test_storage_keeps_every_legal_s3_key_verbatim(bucket):
    names = ["cat#1.jpg", "q?x=1&y=2.jpg", "pc%20t.jpg", "sp ace.jpg", "ünï cödé.jpg", "a+b.jpg"]
    for n in names:
        storage.write_bytes(f"{bucket}/in/{n}", n.encode())
    listed = [storage.to_uri(storage.parse_uri(bucket), f.path) for f in storage.list_files(f"{bucket}/in")]
    assert sorted(listed) == sorted(f"{bucket}/in/{n}" for n in names)
    for uri in listed:
        assert storage.read_bytes(uri) == uri.rsplit("/", 1)[1].encode()


def test_recovery_touches_nothing_outside_the_output_and_one_bad_object_never_blocks_it(base, tmp_path):
    """#38 items 4-5: an intent or a tombstone is a file anyone who can write the prefix can put there. One
    naming a folder outside --output (a sibling, another bucket's data) must not have it deleted or written;
    a torn tombstone or an intent without its model used to make every run exit 4. Each is quarantined."""
    layout = outputs.Layout.of(base)
    sibling = f"{base}-sibling/dt=2026-12-01/run=x"
    storage.write_bytes(f"{sibling}/part-00000.parquet", b"someone else's data")
    good = _stage(layout, "good", ["s3://in/a.jpg", "s3://in/b.jpg"])
    ok = publish.plan_commit(layout, "good", "2026-12-03", good, accuracy_report=None, ledger=True, model_sha256=SHA)
    escaping = publish.Intent("evil", sibling, [[good[0], f"{sibling}/part-00001.parquet"]], None, False, {}, 0)
    no_model = publish.Intent("nomodel", layout.run_dir("2026-12-03", "nomodel").uri, [], None, True, {}, 0)
    storage.write_bytes(layout.intent("evil").uri, escaping.to_json())
    storage.write_bytes(layout.intent("nomodel").uri, no_model.to_json())
    storage.write_bytes(layout.intent("good").uri, ok.to_json())
    storage.write_bytes(layout.tombstone("far").uri, json.dumps({"run_id": "far", "run_dir": sibling}).encode())
    storage.write_bytes(layout.tombstone("torn").uri, b'{"run_id": "torn", "run_d')
    with Lease(base, "R") as lease:
        rec = publish.recover(layout, lease)
    assert rec.finished == ["good"]  # the trustworthy intent is finished, the rest set aside
    assert storage.read_bytes(f"{sibling}/part-00000.parquet") == b"someone else's data"
    assert not storage.exists(f"{sibling}/part-00001.parquet")
    quarantined = sorted(n.split("-", 1)[1] for _, n in outputs.files_under(layout.output.join(outputs.QUARANTINE)))
    assert quarantined == ["run=evil.json", "run=far.json", "run=nomodel.json", "run=torn.json"]
    assert not outputs.files_under(layout.output.join(outputs.COMMITS))
    with Lease(base, "S") as lease:  # and the next run goes on as usual
        assert publish.recover(layout, lease).finished == []


def test_runs_an_older_version_committed_stay_visible_once_new_runs_are_indexed(base):
    """#38 item 5: an output whose early runs have `_SUCCESS` but no `_runs/` record (written by an older
    version). Once a new run adds its record, `committed_runs` used to read `_runs/` alone and the early
    runs vanished from `read_published`; recovery now indexes them once, and the run id stays taken."""
    layout = outputs.Layout.of(base)
    old_uris, new_uris = [f"s3://in/old{i}.jpg" for i in range(3)], [f"s3://in/new{i}.jpg" for i in range(2)]
    with Lease(base, "old") as lease:
        _run_once(layout, "old", old_uris, lease)
    storage.delete(layout.output.join(outputs.RUNS).uri, recursive=True)  # as an older version left it
    assert [r["run_id"] for r in outputs.committed_runs(base)] == ["old"]  # found by listing the output
    with Lease(base, "new") as lease:
        _run_once(layout, "new", old_uris + new_uris, lease)  # recover indexes "old" before it commits
    assert storage.exists(layout.run_record("old").uri)
    assert sorted(r["run_id"] for r in outputs.committed_runs(base)) == ["new", "old"]
    assert sorted(outputs.read_published(base).column("image_uri").to_pylist()) == sorted(old_uris + new_uris)
    with Lease(base, "again") as lease:
        assert publish.index_runs(layout) == 0  # once only: later runs read `_runs/` alone


def test_a_killed_local_writers_tmp_in_any_bookkeeping_folder_never_reaches_recovery(tmp_path):
    """#38 item 5: a killed local writer leaves `_commits/_tmp/...` (or the ledger's): it is removed before
    recovery lists the intents, instead of being read as one (or quarantined as a torn one)."""
    out = tmp_path / "preds"
    layout = outputs.Layout.of(str(out))
    for folder in ("_commits", f"_ledger/{SHA}", "_rolled_back"):
        (out / folder / "_tmp").mkdir(parents=True)
        (out / folder / "_tmp" / "half.json.123").write_bytes(b'{"run_id": "x", "run_d')
    with Lease(str(out), "next") as lease:
        rec = publish.recover(layout, lease)
    assert rec.removed == 3 and not rec.rolled_back
    assert not list(out.rglob("_tmp")) and not (out / outputs.QUARANTINE).exists()


def test_the_ledger_streams_its_compaction_and_reads_only_what_a_run_needs(base, monkeypatch, tmp_path):
    """#38 item 8: a compaction merges the base one row group at a time, a listing's rows come from the row
    groups that can hold them, the transient failures from the base's side object: the result is what
    merging every run's rows in memory gives, run after run."""
    monkeypatch.setattr(ledger, "BASE_ROW_GROUP", 8)
    monkeypatch.setattr(ledger, "COMPACT_AFTER", 3)
    layout = outputs.Layout.of(base)
    history = []
    for r in range(12):
        uris = [f"s3://in/k{(r * 7 + i * 3) % 90:03d}.jpg" for i in range(15)]  # overlapping runs
        kinds = [("transient" if (i + r) % 5 == 0 else "permanent" if (i + r) % 7 == 0 else None) for i in range(15)]
        part = tmp_path / f"part-{r}.parquet"
        rows = pa.table(
            {
                "image_uri": uris,
                "error": [k and "failed" for k in kinds],
                "error_kind": kinds,
                "input_version": [f"v{r}"] * 15,
            }
        )
        pq.write_table(rows, part)
        history.append(rows.append_column("run_id", pa.array([f"r{r:02d}"] * 15)))
        success = {"model_sha256": SHA, "listed_through": {"s3://in": uris[-1]}}
        ledger.append_ledger(layout, publish.Intent(f"r{r:02d}", "", [["", str(part)]], None, True, success, fence=r))
        expected = ledger.latest_per_input(pa.concat_tables(history)).sort_by("image_uri")
        got = ledger.read_ledger(layout, SHA).sort_by("image_uri")
        assert got.to_pylist() == expected.select(got.column_names).to_pylist(), f"after run {r}"
        transient = expected.filter(pc.equal(pc.fill_null(expected["error_kind"], ""), "transient"))
        assert sorted(ledger.transient_failures(layout, SHA)) == sorted(transient["image_uri"].to_pylist())
        few = expected["image_uri"].to_pylist()[:3] + ["s3://in/never.jpg"]
        assert ledger.read_ledger(layout, SHA, only=pa.array(few)).num_rows == 3
    names = [n for _, n in outputs.files_under(layout.ledger_dir(SHA))]
    bases = [n for n in names if n.startswith("base-")]
    assert len(bases) == 1 and f"transient-{bases[0]}" in names  # the old base and its side object are gone
    meta = pq.ParquetFile(io.BytesIO(storage.read_bytes(layout.ledger_dir(SHA).join(bases[0]).uri))).metadata
    assert meta.num_row_groups > 2  # streamed in groups, each sorted and disjoint from the next
    read_groups = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, g, **kw: read_groups.append(g) or real(self, g, **kw)
    )
    ledger.read_ledger(layout, SHA, only=pa.array([expected["image_uri"][0].as_py()]))
    assert len(read_groups) == 1  # one row group of the base, not all of it
    assert ledger.high_water_marks(layout, SHA) == {"s3://in": max(h["image_uri"][-1].as_py() for h in history)}
