"""Checkpoints of a long run: verified on resume (a damaged one is skipped for the previous one),
uploaded while training goes on, and nothing left in the temp folder."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core import storage
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
    metrics = [json.loads(x) for x in storage.read_bytes(f"{bucket}/runs/async/metrics.jsonl").decode().splitlines()]
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
    metrics = [json.loads(x) for x in storage.read_bytes(f"{bucket}/runs/sync/metrics.jsonl").decode().splitlines()]
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
    metrics = [json.loads(x) for x in storage.read_bytes(f"{bucket}/runs/async/metrics.jsonl").decode().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    resumed_at = steps[steps.index(8) + 1 :]  # the reports after the first run's last one
    assert resumed_at[0] in (7, 8) and resumed_at[-1] == 10, steps  # from step 6, not 8 and not 0
    assert _leftovers() == before
