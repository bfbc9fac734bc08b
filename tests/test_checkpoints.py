"""Checkpoints of a long run: verified on resume (a damaged one is skipped for the previous one),
uploaded while training goes on, and nothing left in the temp folder."""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core import storage
from pipeline.core.runs import RunLayout
from pipeline.training import trainer
from pipeline.training.checkpoints import CheckpointError
from pipeline.training.loop import train
from pipeline.training.sessions import LocalSession
from pipeline.training.train_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _local_cfg(max_steps, **train_kw):
    return PretrainConfig.model_validate(
        {
            "train": {
                "batch_size": 16,
                "epochs": 1,
                "log_every_steps": 1,
                "max_steps": max_steps,
                "report_every_s": 0,
                "checkpoint_every_steps": 2,
                **train_kw,
            },
            "optim": {"warmup_steps": 1},
            "data": {"val_split": None},
        }
    )


def _data(bad_rows=()):
    rng = np.random.default_rng(0)
    data = {
        "patches": rng.integers(0, 255, (128, 64, 48), dtype=np.uint8),
        "label": rng.integers(0, 10, 128),
        "valid": np.ones(128, bool),
    }
    data["valid"][list(bad_rows)] = False
    data["patches"][list(bad_rows)] = 0  # what the stream sends for an undecodable sample

    def batches(split, bs, epoch, train_):
        for i in range(0, 128 - bs + 1, bs):
            yield {k: v[i : i + bs] for k, v in data.items()}

    return batches


def _train(root, max_steps, **kw):
    s = LocalSession(_data(), root, device=torch.device("cpu"), keep=3)
    return train(_local_cfg(max_steps, **kw), s, num_classes=10, train_count=128), s


def _flip_byte(path: Path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["flip a byte in the weights", "truncate the optimizer file", "break the JSON"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, capsys):
    _train(tmp_path, 6)  # checkpoints at steps 2, 4 and 6
    newest = tmp_path / "checkpoint_000000006"
    if damage.startswith("flip"):
        _flip_byte(newest / "model.safetensors")
    elif damage.startswith("truncate"):
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    else:
        (newest / "trainer_state.json").write_text('{"step": 6, "epoch"')
    capsys.readouterr()
    _, s = _train(tmp_path, 8)
    out = capsys.readouterr().out
    assert f"skipped checkpoint {newest}" in out and "resumed from" in out and "at step 4" in out, out
    assert [r["step"] for r in s.reports if "loss" in r][0] == 5  # the previous checkpoint's step, +1


def test_every_checkpoint_damaged_stops_unless_told_to_start_over(tmp_path):
    _train(tmp_path, 4)
    for ckpt in tmp_path.glob("checkpoint_*"):
        _flip_byte(ckpt / "optimizer.safetensors")
    with pytest.raises(
        CheckpointError, match="no usable checkpoint.*checkpoint_000000004: optimizer.safetensors does not match"
    ):
        _train(tmp_path, 6)
    _, s = _train(tmp_path, 6, fresh_start_if_checkpoints_bad=True)
    assert [r["step"] for r in s.reports if "loss" in r][0] == 1


def test_an_upload_cut_short_is_a_checkpoint_that_never_existed(tmp_path, capsys):
    """A worker killed during its first upload leaves a partial folder: the restart starts over (and
    says so) instead of refusing; with an older complete checkpoint it resumes from that one."""
    _train(tmp_path, 2)
    (tmp_path / "checkpoint_000000002" / "checksums.json").unlink()
    _, s = _train(tmp_path, 4)
    assert [r["step"] for r in s.reports if "loss" in r][0] == 1 and "incomplete" in capsys.readouterr().out
    (tmp_path / "checkpoint_000000004" / "model.safetensors").unlink()  # the newest, half uploaded
    _, s = _train(tmp_path, 6)
    assert [r["step"] for r in s.reports if "loss" in r][0] == 3  # from step 2


def test_a_micro_batch_of_only_bad_samples_keeps_the_loss_finite(tmp_path):
    s = LocalSession(_data(bad_rows=range(16, 32)), None, device=torch.device("cpu"))  # the second batch: all bad
    out = train(_local_cfg(4, checkpoint_every_steps=None), s, num_classes=10, train_count=128)
    losses = [r["loss"] for r in s.reports if "loss" in r]
    assert all(np.isfinite(losses)) and out["state"]["dropped_samples"] == 16 and out["state"]["skipped_batches"] == 1


def test_deit_batch_augmentations_run_in_the_step_and_repeat_on_a_rerun():
    def losses(**data_kw):
        cfg = _local_cfg(3, checkpoint_every_steps=None)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=data_kw)})
        s = LocalSession(_data(bad_rows=[5]), None, device=torch.device("cpu"))
        train(cfg, s, num_classes=10, train_count=128)
        return [r["loss"] for r in s.reports if "loss" in r]

    deit = dict(mixup_alpha=0.8, cutmix_alpha=1.0, random_erase=0.25)
    mixed = losses(**deit)
    assert all(np.isfinite(mixed)) and mixed == losses(**deit)  # draws seeded by (seed, rank, step): a rerun repeats
    assert mixed != losses()


class StepClock:
    """A clock that moves only when the test says: each training batch taken advances it by the next of
    `durations` (cycled), so every step lasts exactly that long whatever the machine's speed."""

    def __init__(self, durations):
        self.now, self._durations, self._i = 100.0, list(durations), 0

    def __call__(self) -> float:
        return self.now

    def data(self, rows=128):
        inner = _data()

        def batches(split, bs, epoch, train_):
            for b in inner(split, bs, epoch, train_):
                self.now += self._durations[self._i % len(self._durations)]
                self._i += 1
                yield b

        return batches


def _timed_run(durations, report_every_s, log_every_steps, epochs=3):
    cfg = PretrainConfig.model_validate(
        {
            "train": {
                "batch_size": 16,
                "epochs": epochs,
                "log_every_steps": log_every_steps,
                "report_every_s": report_every_s,
            },
            "optim": {"warmup_steps": 1},
            "data": {"val_split": None, "prefetch_next_epoch": False},
        }
    )
    clock = StepClock(durations)
    s = LocalSession(clock.data(), None, device=torch.device("cpu"))
    out = train(cfg, s, num_classes=10, train_count=128, clock=clock)
    progress = [r for r in s.reports if "images_per_s" in r and "epoch_s" not in r]  # not the epoch ends
    return out, progress


def test_progress_reports_are_timed_not_per_step():
    """8 steps an epoch of exactly 0.125 s each and a check every step: with report_every_s 0.25 a report
    goes out after steps 2, 4 and 6 of each epoch (step 8 ends the epoch, which reports anyway), and
    each report carries its metrics measured by the same clock: 2 x 16 images in 0.25 s."""
    out, progress = _timed_run([0.125], report_every_s=0.25, log_every_steps=1)
    assert out["state"]["step"] == 3 * 8
    assert out["progress_reports"] == len(progress) == 3 * 3
    assert [r["step"] for r in progress] == [e * 8 + k for e in range(3) for k in (2, 4, 6)]
    assert all(r["images_per_s"] == 128.0 and np.isfinite(r["loss"]) and r["torch_threads"] >= 1 for r in progress)
    assert out["elapsed_s"] == 3 * 8 * 0.125


def test_report_schedule_follows_uneven_steps_and_the_check_interval():
    """Steps of 1 s, 0, 0, 0, 0.25, 0.25, 0.125, 0.125 with a check every 2 steps and report_every_s 0.5:
    due at step 2 (1 s) and step 6 (0.5 s since), not at step 4 (0 s since); per epoch, two reports."""
    out, progress = _timed_run([1.0, 0, 0, 0, 0.25, 0.25, 0.125, 0.125], report_every_s=0.5, log_every_steps=2)
    assert [r["step"] for r in progress] == [e * 8 + k for e in range(3) for k in (2, 6)]
    assert [r["images_per_s"] for r in progress[:2]] == [32 / 1.0, 64 / 0.5]
    # slower than the interval: a report at every check (steps 2, 4, 6), never more often than the checks
    _, progress = _timed_run([0.5], report_every_s=0.25, log_every_steps=2, epochs=1)
    assert [r["step"] for r in progress] == [2, 4, 6]


def test_ema_follows_the_weights_with_foreach_updates():
    from pipeline.training.step import EMA

    m = torch.nn.Linear(4, 2)
    ema = EMA(m, decay=0.5)
    before = ema.weights["weight"].clone()
    with torch.no_grad():
        m.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.weights["weight"], before + 1.0)


def _leftovers():
    tmp = Path(tempfile.gettempdir())
    return sorted(str(p) for pat in ("vitray-ckpt-*", "vitray-resume-*", "vitray-tb-*") for p in tmp.glob(pat))


def _smoke(manifest, output, **train_kw):
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["data"]["manifest"], cfg["train"]["output"] = manifest, output
    cfg["train"].update(train_kw)
    return PretrainConfig.model_validate(cfg)


def test_ray_checkpoints_upload_async_leave_no_temp_files_and_resume_past_a_damaged_one(
    ray_cluster, digits_shards, bucket
):
    """Real Ray Train on the real S3 server: checkpoints every 2 steps, uploaded while training goes
    on (timed by the loop: the upload ends after report() gave the step back; in sync mode before);
    the temp folder is empty after the run; a flipped byte in the newest checkpoint makes the next
    run resume from the one before, and the job log says which it skipped."""
    before = _leftovers()
    trainer.run(
        _smoke(digits_shards, f"{bucket}/runs", name="async", max_steps=8, checkpoint_every_steps=2, keep_checkpoints=3)
    )
    assert _leftovers() == before
    metrics = RunLayout.at(f"{bucket}/runs/async").read_metrics()
    overlaps = [m["checkpoint_overlap_s"] for m in metrics if "checkpoint_overlap_s" in m]
    assert overlaps and all(o > 0 for o in overlaps), metrics  # training ran while each upload went on
    trainer.run(
        _smoke(
            digits_shards,
            f"{bucket}/runs",
            name="sync",
            max_steps=4,
            checkpoint_every_steps=2,
            checkpoint_upload="sync",
        )
    )
    metrics = RunLayout.at(f"{bucket}/runs/sync").read_metrics()
    assert [m["checkpoint_overlap_s"] for m in metrics if "checkpoint_overlap_s" in m] and all(
        m["checkpoint_overlap_s"] <= 0 for m in metrics if "checkpoint_overlap_s" in m
    )  # sync: the step waited
    # damage the newest checkpoint of the async run (step 8), then continue it to step 10
    ckpts = sorted(
        {f.path.split("/")[-2] for f in storage.list_files(f"{bucket}/runs/async") if "/checkpoint_" in f.path}
    )
    newest = f"{bucket}/runs/async/{ckpts[-1]}"
    data = bytearray(storage.read_bytes(f"{newest}/model.safetensors"))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(f"{newest}/model.safetensors", bytes(data))
    trainer.run(
        _smoke(
            digits_shards, f"{bucket}/runs", name="async", max_steps=10, checkpoint_every_steps=2, keep_checkpoints=3
        )
    )
    metrics = RunLayout.at(f"{bucket}/runs/async").read_metrics()
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == sorted(steps) and steps[-1] == 10, steps  # one curve: the first run's step 8 report is gone
    assert {m["start_step"] for m in metrics if m["step"] > 6 and "start_step" in m} == {6}, metrics  # from 6
    assert _leftovers() == before


def test_metrics_are_appended_and_a_resume_keeps_every_step_once(tmp_path, monkeypatch):
    """One new object per flush (nothing rewritten while a run goes); a resumed attempt (start_step 25)
    removes the rows its dead predecessor wrote after that checkpoint, touching only the newest objects."""
    cfg = PretrainConfig.model_validate({"train": {"output": str(tmp_path), "name": "r"}})
    layout = RunLayout.of(str(tmp_path), "r")
    writes = []
    real = storage.write_bytes

    def counted(uri, data):
        if "/metrics/" in str(uri):
            writes.append(uri)
        return real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", counted)
    sink = trainer.MetricsSink(cfg)
    for step in range(1, 61):  # the first attempt dies at step 60; its last checkpoint was at step 25
        sink.add({"step": step, "loss": 1.0 / step, "start_step": 0}, flush=step % 25 == 0)
    sink.flush()
    assert len(set(writes)) == len(writes) == len(layout.metric_objects())  # each object written once
    first, before = len(writes), layout.metric_objects()
    resumed = trainer.MetricsSink(cfg)  # a new controller: the job submitted again
    for step in range(26, 41):
        resumed.add({"step": step, "loss": 0.5, "start_step": 25}, flush=False)
    resumed.flush()
    rows = layout.read_metrics()
    assert [r["step"] for r in rows] == list(range(1, 41))  # every step once
    assert all(r["start_step"] == 25 for r in rows if r["step"] > 25)
    assert not [u for u in writes[first:] if u in writes[:first]]  # objects split at 25: none rewritten
    kept = [u for u in before if u in layout.metric_objects()]
    assert kept == before[:2]  # steps 1-20 and 21-25 untouched; the dead attempt's 26-60 removed
    again = trainer.MetricsSink(cfg)  # killed again at 40 with a checkpoint at 30: one object is cut in two
    again.add({"step": 31, "loss": 0.4, "start_step": 30}, flush=True)
    assert [r["step"] for r in layout.read_metrics()] == list(range(1, 32))


def test_a_storage_outage_is_retried_and_never_a_fresh_start(tmp_path, monkeypatch):
    """A transient read failure is retried with backoff (the sleeps come from an injected clock); a store that
    keeps failing stops the resume, even with fresh_start_if_checkpoints_bad."""
    from pipeline.training import checkpoints

    _train(tmp_path, 4)
    real, calls, slept = storage.download_folder, [], []

    def flaky(uri, local):
        calls.append(uri)
        if len(calls) <= 2:
            raise storage.StorageError(f"cannot download {uri}: SlowDown", transient=True)
        return real(uri, local)

    monkeypatch.setattr(storage, "download_folder", flaky)
    candidates = RunLayout.at(str(tmp_path)).checkpoints()
    uri, local, skipped = checkpoints.choose_checkpoint(candidates, allow_fresh_start=False, sleep=slept.append)
    assert uri.endswith("checkpoint_000000004") and not skipped and slept == [1, 2]  # the newest, after 2 retries
    __import__("shutil").rmtree(local)

    def down(uri, local):
        raise storage.StorageError(f"cannot download {uri}: the endpoint does not answer", transient=True)

    monkeypatch.setattr(storage, "download_folder", down)
    with pytest.raises(storage.StorageError, match="Not starting over"):
        checkpoints.choose_checkpoint(candidates, allow_fresh_start=True, sleep=lambda s: None)


RANK_SCRIPT = """
import hashlib, json, os, sys
import torch, torch.distributed as dist
from pipeline.core import storage
from pipeline.training import checkpoints
from pipeline.training.objectives import objective_for
from pipeline.training.train_config import PretrainConfig

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
if rank == 1:  # this rank's first read of a checkpoint fails as a flaky store would
    real, seen = storage.download_folder, []
    def flaky(uri, local):
        seen.append(uri)
        if len(seen) == 1:
            raise storage.StorageError(f"cannot download {uri}: connection reset", transient=True)
        return real(uri, local)
    storage.download_folder = flaky
cfg = PretrainConfig.model_validate(json.loads(sys.argv[2]))
objective = objective_for(cfg)
model = objective.build(10)
torch.nn.init.zeros_(model.head.weight)  # differs from every checkpoint: loading must change it
opt = torch.optim.AdamW(model.parameters())
def broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
candidates = [os.path.join(sys.argv[1], n) for n in sorted(os.listdir(sys.argv[1]), reverse=True)]
state, used, skipped = checkpoints.resume(
    candidates if rank == 0 else [], lambda folder: objective.load(model, folder), opt, None,
    allow_fresh_start=False, rank=rank, broadcast=broadcast,
    sleep=lambda s: None,
)
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"rank": rank, "used": used, "step": state["step"], "weights": digest, "skipped": len(skipped)}))
dist.destroy_process_group()
"""


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path):
    """Two ranks (torch.distributed, gloo): the newest checkpoint is damaged, so rank 0 falls back to the one
    before; rank 1's first read fails transiently: it retries and loads that same one, not its own pick."""
    import json
    import socket
    import subprocess
    import sys

    _train(tmp_path, 6)
    _flip_byte(tmp_path / "checkpoint_000000006" / "model.safetensors")
    for extra in tmp_path.iterdir():
        if not extra.name.startswith("checkpoint_"):
            __import__("shutil").rmtree(extra) if extra.is_dir() else extra.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = json.dumps(_local_cfg(6).model_dump(mode="json"))
    env = {**__import__("os").environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_SCRIPT, str(tmp_path), cfg],
            cwd=ROOT, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for o, _ in outs)
    assert r0["used"] == r1["used"] and r0["used"].endswith("checkpoint_000000004") and r0["step"] == r1["step"] == 4
    assert r0["weights"] == r1["weights"] and r0["skipped"] == r1["skipped"] == 1
    assert "retrying" in outs[1][1]  # rank 1's transient failure was retried, not a reason to pick another


def test_ranks_draw_different_drop_path_masks_and_the_same_ones_again_after_a_resume():
    import vit_model
    from pipeline.training.step import seed_step

    model = vit_model.create_model("vit_micro_patch4_32", drop_path_rate=0.5).train()
    x = torch.randn(8, 64, 48)

    def forward(rank, step):
        seed_step(seed=0, rank=rank, step=step)
        with torch.no_grad():
            return model.forward_features(x)  # the head starts at zero

    rank0, rank1 = forward(0, 5), forward(1, 5)
    assert not torch.equal(rank0, rank1)  # the two workers regularise differently
    assert torch.equal(forward(0, 5), rank0) and torch.equal(forward(1, 5), rank1)  # a resume at step 5
    assert not torch.equal(forward(0, 6), rank0)  # and each step its own masks


def test_a_download_left_by_a_killed_resume_is_removed_by_the_next(tmp_path):
    """A resume's download folder carries its owner's pid: one left by a process killed while loading (a whole
    checkpoint per rank and retry) is removed by the next resume on the node, a live owner's never."""
    import subprocess
    import sys
    import tempfile

    from pipeline.training import checkpoints

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = Path(tempfile.gettempdir()) / f"{checkpoints.RESUME_PREFIX}{int(dead.stdout)}-x"
    mine = Path(tempfile.mkdtemp(prefix=f"{checkpoints.RESUME_PREFIX}{os.getpid()}-"))
    (left / "model.safetensors").parent.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"0" * 1024)
    try:
        checkpoints.resume([], lambda folder: None, None, None, allow_fresh_start=False)
        assert not left.exists() and mine.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)
