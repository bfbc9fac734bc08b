"""A resumed run is the run that would have been (#26): the exact epoch order read through Ray Data, jobs
SIGKILLed after a mid-epoch checkpoint and submitted again, against the real S3 server and the local Ray."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors

from pipeline.core import storage
from pipeline.core.runs import RunLayout
from pipeline.data import order
from pipeline.data.manifest import load_manifest
from pipeline.data.streams import StreamConfig, ordered_stream
from pipeline.data.transforms import ImageTransform

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
STEPS, BATCH = 50, 32  # the digits' 1618 training images: one epoch of 50 steps, 18 sit out


def _read(manifest, ranges, epoch, seed=0):
    t = ImageTransform(32, 4, train=True)
    cfg = StreamConfig(t, num_cpus=0.5)
    ds = ordered_stream(manifest, "train", cfg, seed=seed, epoch=epoch, ranges=ranges, window_shards=2)
    rows = {"key": [], "patches": []}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows["key"] += list(b["key"])
        rows["patches"].append(b["patches"])
    return rows["key"], np.concatenate(rows["patches"])


def test_a_ranks_part_is_read_in_its_order_with_per_sample_augmentation(ray_cluster, digits_shards):
    m = load_manifest(digits_shards)
    shards = [(u, e.count) for u, e in zip(m.shard_uris("train"), m.split("train").shards)]
    todo = [[0, STEPS * BATCH]]
    parts = order.split(todo, 2)
    keys0, patches0 = _read(m, parts[0], epoch=0)
    keys1, _ = _read(m, parts[1], epoch=0)
    assert len(keys0) == len(keys1) == STEPS * BATCH // 2 and not set(keys0) & set(keys1)
    # the order is the plan's: position p holds the window's permuted sample
    wins = order.windows(shards, 0, 0, 2)
    assert keys0[:3] == _keys_at(wins, [0, 1, 2], m.format)
    again_keys, again = _read(m, parts[0], epoch=0)  # another execution: same samples, same crops and flips
    assert again_keys == keys0 and np.array_equal(again, patches0)
    # a resume 100 samples in reads the rest of the part, augmented as the uninterrupted read was
    rest_keys, rest = _read(m, order.skip(parts[0], 100), epoch=0)
    assert rest_keys == keys0[100:] and np.array_equal(rest, patches0[100:])
    next_keys, _ = _read(m, parts[0], epoch=1)
    assert next_keys != keys0


def _keys_at(wins, positions, fmt):
    from pipeline.data.shard_reader import read_shard

    out = []
    for p in positions:
        w = next(w for w in wins if w.start <= p < w.start + w.size)
        samples = [s for u in w.shards for s in read_shard(u, None, fmt)]
        out.append(samples[order.permutation(w, 0, 0)[p - w.start]][0])
    return out


# ---- jobs killed and submitted again ---------------------------------------------------------
def _job(digits_shards, out, name, *extra):
    args = [
        sys.executable, str(ROOT / "jobs/pretrain.py"), "--config", str(ROOT / "configs/smoke.yaml"),
        "--data", digits_shards, "--output", out, "--name", name, "--train.max_steps", str(STEPS),
        "--train.checkpoint_every_steps", "10", "--data.window_shards", "2", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=os.environ.copy()
    )


def _finish(job, timeout=600) -> str:
    try:
        text = job.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        pytest.fail(f"the job did not exit within {timeout} s:\n{job.communicate()[0][-4000:]}")
    assert job.returncode == 0, text[-4000:]
    return text


def _kill_after_checkpoint(job, run: RunLayout, step: int) -> None:
    """SIGKILL the job's process group once the checkpoint of `step` is complete in storage (its checksums,
    written last, are there)."""
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None and not _has_checkpoint(run, step):
        time.sleep(0.1)
    if job.poll() is not None:
        pytest.fail(f"the job ended before it could be killed:\n{job.communicate()[0][-3000:]}")
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()


def _has_checkpoint(run: RunLayout, step: int) -> bool:
    for c in run.checkpoints():
        try:  # Ray's upload copies the files in any order, and the oldest checkpoints are deleted as new ones come
            names = {f.path.rsplit("/", 1)[1] for f in storage.list_files(c)}
            if {"checksums.json", "trainer_state.json", "optimizer.safetensors", "model.safetensors"} <= names:
                if json.loads(storage.read_bytes(f"{c}/trainer_state.json"))["step"] == step:
                    return True
        except storage.StorageError:
            continue
    return False


def _weights(run: RunLayout) -> dict:
    return load_tensors(storage.read_bytes(run.model.join("model.safetensors").uri))


@pytest.mark.e2e
def test_a_killed_deterministic_run_resumes_bitwise(stack, digits_shards, bucket):
    one = ("--train.num_workers", "1", "--train.cpus_per_worker", "1", "--train.deterministic", "true")
    out = f"{bucket}/runs"
    _finish(_job(digits_shards, out, "whole", *one))
    killed = RunLayout.of(out, "killed")
    _kill_after_checkpoint(_job(digits_shards, out, "killed", *one), killed, 20)
    text = _finish(_job(digits_shards, out, "killed", *one))
    resumed_at = re.search(r"resumed from \S+ at step (\d+)", text)
    assert resumed_at and int(resumed_at[1]) in (20, 30, 40), text[-3000:]  # mid-epoch, at a checkpoint
    whole, resumed = _weights(RunLayout.of(out, "whole")), _weights(killed)
    assert whole.keys() == resumed.keys()
    differ = [k for k in whole if not torch.equal(whole[k], resumed[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.e2e
@pytest.mark.parametrize("resume_workers", [2, 1])
def test_two_workers_killed_mid_epoch_read_every_sample_once(stack, digits_shards, bucket, resume_workers):
    """Killed after a mid-epoch checkpoint and submitted again, on as many workers or on one: the keys the
    ranks trained on (train.record_keys) hold every sample of the epoch once."""
    out, keys = f"{bucket}/runs", ("--train.record_keys", "true")
    run = RunLayout.of(out, "two")
    _kill_after_checkpoint(_job(digits_shards, out, "two", *keys), run, 20)
    _finish(_job(digits_shards, out, "two", *keys, "--train.num_workers", str(resume_workers)))
    per_rank = {0: [], 1: []}
    for f in sorted(storage.list_files(run.root.join("consumed").uri), key=lambda f: f.path):
        rank = int(f.path.rsplit("-r", 1)[1].split(".")[0])
        per_rank[rank] += json.loads(storage.read_bytes(storage.to_uri(run.root, f.path)))
    every = per_rank[0] + per_rank[1]
    assert len(set(every)) == len(every) == STEPS * BATCH  # each sample of the epoch once
    if resume_workers == 2:
        assert len(per_rank[0]) == len(per_rank[1])  # equal steps on both ranks
    else:
        assert len(per_rank[0]) > len(per_rank[1]) > 0  # rank 0 alone took the rest of the epoch
    metrics = [m["step"] for m in run.read_metrics() if "loss" in m]
    assert len(metrics) == len(set(metrics))  # every step once in the metrics after the resume
