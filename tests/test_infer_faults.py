"""Scheduled batch inference when processes die, pause or are misused: the jobs run as subprocesses
against the real S3 server and the local Ray, and each test reads the output back with pandas,
pyarrow and duckdb."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
from test_batch_infer import _committed, _job, _put_images, _run
from test_publish import _readers_see

from pipeline.core import storage
from pipeline.core.exits import EXIT_PARTIAL, EXIT_TEMPFAIL
from pipeline.inference import batch as inference
from pipeline.inference import outputs


def _args(model_uri, bucket, out, ttl=4):
    return [
        "--model", model_uri, "--input", f"{bucket}/in", "--output", out, "--since-last-run",
        "--lease-ttl", ttl, "--replicas", "1,1", "--batch-size", 4,
    ]  # fmt: skip


def _leftovers(out) -> list[str]:
    return [f.path for f in storage.list_files(out) if any(f"/{d}/" in f.path for d in ("_staging", "_commits"))]


def _finish(job, timeout) -> str:
    """The job's output once it exits; a job still running after `timeout` is killed and the test fails with
    what it printed (not a bare TimeoutExpired)."""
    try:
        return job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job did not exit within {timeout} s; it printed:\n{job.communicate()[0][-4000:]}")


def _lease(out) -> dict:
    return json.loads(storage.read_bytes(f"{out}/_lease.json")) if storage.exists(f"{out}/_lease.json") else {}


def _wait_taken(out, job, generation, limit_s=120) -> None:
    """Until `job` holds the lease (a generation after `generation`): a run watches a killed holder's lease
    for one TTL before it takes it over, and the kill moments count from then."""
    deadline = time.time() + limit_s
    while time.time() < deadline and job.poll() is None and _lease(out).get("generation", 0) <= generation:
        time.sleep(0.05)


@pytest.mark.e2e
def test_runs_killed_at_random_moments_then_a_clean_run_publish_every_input_exactly_once(stack, bucket, model_uri):
    """SIGKILL of the job's process group at seeded random moments (wherever that lands on this machine:
    listing, predicting, staging, any step of a commit), the dead runs' staged objects deleted between
    some of them (a superseded or half-cleaned output), then one clean run."""
    out = f"{bucket}/out"
    rng = random.Random(25)
    uris = _put_images(f"{bucket}/in", 6)
    codes = []
    for i in range(5):
        uris += _put_images(f"{bucket}/in", 2, start=100 + 2 * i)
        job = _job(*_args(model_uri, bucket, out), start_new_session=True)
        _wait_taken(out, job, _lease(out).get("generation", 0))
        time.sleep(rng.uniform(0.5, 7.0))
        os.killpg(job.pid, signal.SIGKILL)
        codes.append(job.wait())
        if i % 2:
            for f in storage.list_files(f"{out}/_staging"):
                storage.delete(storage.to_uri(storage.parse_uri(out), f.path))
        seen = _readers_see(out)  # nothing a kill left makes a reader fail
        assert seen.get("duckdb_committed", 0) <= len(uris)
    clean = _job(*_args(model_uri, bucket, out))
    text = clean.communicate(timeout=300)[0]
    assert clean.returncode == 0, text[-3000:]
    assert _committed(out) == sorted(uris), f"exit codes of the killed runs: {codes}"
    n = len(uris)
    assert _readers_see(out) == {"pandas": n, "pyarrow": n, "duckdb": n, "duckdb_committed": n}
    assert not _leftovers(out)


@pytest.mark.e2e
def test_a_paused_holder_is_superseded_and_its_late_writes_are_refused(stack, bucket, model_uri):
    """SIGSTOP the holder past its TTL; a second run takes over and publishes; SIGCONT the first: it finds
    its lease gone at its next renewal or fence, writes nothing more and exits 75 (4 if it was publishing)."""
    out = f"{bucket}/out"
    uris = _put_images(f"{bucket}/in", 24)
    paused = _job(*_args(model_uri, bucket, out), start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and paused.poll() is None:
        if (
            storage.exists(f"{out}/_lease.json")
            and not json.loads(storage.read_bytes(f"{out}/_lease.json"))["released"]
        ):
            break
        time.sleep(0.05)
    os.killpg(paused.pid, signal.SIGSTOP)
    try:
        successor = _job(*_args(model_uri, bucket, out))
        text = successor.communicate(timeout=300)[0]
        assert successor.returncode == 0, text[-3000:]
        lease_after = json.loads(storage.read_bytes(f"{out}/_lease.json"))
        assert lease_after["generation"] == 2 and lease_after["released"]
        published = outputs.committed_runs(out)
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
    text = _finish(paused, 180)
    assert paused.returncode in (EXIT_TEMPFAIL, EXIT_PARTIAL), text[-3000:]
    assert "another run" in text and "lease" in text and "Traceback" not in text
    assert outputs.committed_runs(out) == published  # nothing of the stale holder landed
    assert _committed(out) == sorted(uris)
    assert json.loads(storage.read_bytes(f"{out}/_lease.json"))["generation"] == 2  # it did not take it back
    again = _job(*_args(model_uri, bucket, out))
    assert again.wait(timeout=300) == 0
    assert _committed(out) == sorted(uris) and not _leftovers(out)
    assert _readers_see(out)["duckdb_committed"] == len(uris)


def test_an_output_inside_the_input_and_a_reused_run_id_are_refused(ray_cluster, bucket, model_uri):
    _put_images(f"{bucket}/in", 2)
    with pytest.raises(ValueError, match="is inside --input"):
        _run(model=model_uri, input=f"{bucket}/in", output=f"{bucket}/in/predictions")
    assert not storage.list_files(f"{bucket}/in/predictions")  # refused before anything was written
    out = f"{bucket}/out"
    assert _run(model=model_uri, input=f"{bucket}/in", output=out, run_id="nightly-1")["rows"] == 2
    _put_images(f"{bucket}/in", 1, start=5)
    with pytest.raises(inference.RunIdTaken, match="already committed"):
        _run(model=model_uri, input=f"{bucket}/in", output=out, run_id="nightly-1")
    assert [r["run_id"] for r in outputs.committed_runs(out)] == ["nightly-1"]
    assert len(_committed(out)) == 2  # the committed run was neither overwritten nor merged into


def test_an_append_only_input_is_listed_from_the_last_runs_mark(ray_cluster, bucket, model_uri):
    """--input-append-only lists only keys after the greatest key a committed run listed (S3 StartAfter):
    new keys are found, and a late key that sorts before the mark is not (the documented limit)."""
    args = {"model": model_uri, "input": f"{bucket}/in", "since_last_run": True, "input_append_only": True}
    _put_images(f"{bucket}/in", 3)  # img000..img002
    assert _run(output=f"{bucket}/out", **args)["rows"] == 3
    _put_images(f"{bucket}/in", 2, start=3)
    assert _run(output=f"{bucket}/out", **args)["rows"] == 2
    storage.write_bytes(f"{bucket}/in/early.jpg", storage.read_bytes(f"{bucket}/in/img001.jpg"))  # "e" < "i"
    assert _run(output=f"{bucket}/out", **args)["rows"] == 0
    assert _run(output=f"{bucket}/out", **{**args, "input_append_only": False})["rows"] == 1  # a full listing
    with pytest.raises(ValueError, match="needs --since-last-run"):
        _run(output=f"{bucket}/out", **{**args, "since_last_run": False})


@pytest.mark.e2e
def test_sigterm_from_a_scheduler_unwinds_the_run(stack, bucket, model_uri):
    """A scheduler's timeout or cancel while the run predicts: it stops with 143, removes what it staged and
    gives the lease back, so the next run need not wait a TTL. (During a commit it would exit 4: partly
    written, finished by the next run.)"""
    out = f"{bucket}/out"
    _put_images(f"{bucket}/in", 60)  # 15 batches, one replica: seconds of predicting after the first staged file
    job = _job(*_args(model_uri, bucket, out, ttl=600))
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None and not storage.list_files(f"{out}/_staging"):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    text = _finish(job, 120)
    if job.returncode == 0:
        pytest.fail("the run finished before SIGTERM landed: give it more inputs")  # not a skip: make it fail loud
    assert job.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert json.loads(storage.read_bytes(f"{out}/_lease.json"))["released"]
    # Its Ray tasks end as it disconnects; a write already in flight may still land in its staging (never
    # where readers look), and the next run sweeps it.
    assert not [f for f in _leftovers(out) if "/_staging/" not in f], "no commit was begun"
    assert _readers_see(out)["pyarrow"] == 0
    nxt = _job(*_args(model_uri, bucket, out, ttl=600))
    assert nxt.wait(timeout=300) == 0  # at once: no TTL to wait out
    assert len(_committed(out)) == 60 and not _leftovers(out)
