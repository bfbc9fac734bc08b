"""Inputs as users have them (#23): standard sizes pass the defaults, odd inputs are counted and listed
skips with the same words in make_shards and batch inference, nothing usable is an error, and
unlabeled folders make unlabeled shard sets."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vit_model
from pipeline.core import storage
from pipeline.data import images, manifest, shard_writer
from pipeline.data.sources import name_rule
from pipeline.inference import batch as inference
from pipeline.inference.infer_config import InferConfig
from pipeline.training import trainer
from pipeline.training.train_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _png(w, h, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _shards(source, output, **kw):
    return shard_writer.make_shards(str(source), str(output), progress=False, executor="local", **kw)


def test_standard_sizes_pass_the_defaults_and_odd_ones_are_named():
    rules = images.DecodeRules()
    for side in (28, 32, 96, 224):  # MNIST / Fashion-MNIST / EMNIST, CIFAR / SVHN, STL-10, ImageNet
        assert rules.check(_png(side, side))[:2] == (side, side)
    with pytest.raises(images.ImageDecodeError, match="4x4 px is smaller than the minimum of 16 px"):
        rules.check(_png(4, 4))
    with pytest.raises(images.ImageDecodeError, match="16x4000 px is more than 20 times as long"):
        rules.check(_png(16, 4000))
    with pytest.raises(images.ImageDecodeError, match="object of 30.0 MB is larger than --max-object-mb 20: not read"):
        images.DecodeRules(max_object_mb=20).check_object_size(30_000_000)
    with pytest.raises(ValueError, match="--min-size must be at least 1"):
        images.DecodeRules(min_side=0)


def test_the_naming_rule():
    assert name_rule("_DSC0001.JPG") is None and name_rule("cats/_MG_1234.JPG") is None  # camera names: inputs
    assert name_rule(".DS_Store").startswith("hidden") and name_rule("a/.cache/x.jpg").startswith("hidden")
    assert name_rule("_SUCCESS") == "" and name_rule("_staging/run=1/x.parquet.staged") == ""  # ours: silent
    # a legal S3 key (SeaweedFS refuses it; AWS does not) that a path reading would relabel: a listed skip
    assert name_rule("cat/../dog/x.jpg").startswith("a '..' path component")


def test_mnist_sized_class_folders_shard_with_the_defaults(tmp_path):
    src = tmp_path / "mnist"
    for c in range(3):
        (src / str(c)).mkdir(parents=True)
        for i in range(5):
            (src / str(c) / f"{i}.png").write_bytes(_png(28, 28, 10 * c + i))
    m = _shards(src, tmp_path / "out", val_fraction=0.2).manifest
    assert m.count("train") + m.count("val") == 15 and m.classes == ["0", "1", "2"] and not m.skipped
    assert (m.min_size, m.max_aspect, m.max_object_mb) == (16, 20.0, 64.0)  # the rules it was written with


def test_nothing_usable_is_an_error_and_publishes_nothing(tmp_path):
    src = tmp_path / "tiny"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            (src / c / f"{i}.png").write_bytes(_png(4, 4, i))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"nothing usable in .*6 inputs, 6 skipped: 6 image of .*smaller than the"):
        _shards(src, out, val_fraction=0.0)
    assert not (out / "manifest.json").exists() and not list((out / "versions").glob("*"))
    # the job: exit code 2 and the counted reason, one line
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs/make_shards.py"), "--source", str(src), "--output", str(out), "--local"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "make_shards: error: nothing usable" in r.stderr and "e.g." in r.stderr
    # a val split left empty by the split fraction is an error too, with what to change
    few = tmp_path / "few"
    (few / "a").mkdir(parents=True)
    (few / "a" / "x.png").write_bytes(_png(32, 32))
    with pytest.raises(ValueError, match="the val split is empty.*lower --val-fraction"):
        _shards(few, tmp_path / "out2", val_fraction=0.1)


def test_odd_inputs_are_listed_skips_never_silently_gone(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "cats").mkdir(parents=True)
    (src / "cats" / "_DSC0001.JPG").write_bytes(_png(40, 40, 1))  # a camera's name: an input
    (src / "cats" / ".hidden.png").write_bytes(_png(40, 40, 2))
    (src / "cats" / "strip.png").write_bytes(_png(16, 4000, 3))
    (src / "cats" / "big.png").write_bytes(_png(40, 40, 4) + b"\0" * 25_000_000)  # 25 MB: over a 20 MB cap
    elsewhere = tmp_path / "disk2" / "dogs"
    elsewhere.mkdir(parents=True)
    (elsewhere / "d.png").write_bytes(_png(40, 40, 5))
    (src / "dogs").symlink_to(elsewhere, target_is_directory=True)  # a class assembled from another disk
    (elsewhere / "loop").symlink_to(elsewhere.parent, target_is_directory=True)  # ... with a loop in it
    read = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda uri, **kw: read.append(uri) or real_read(uri, **kw))
    m = _shards(src, tmp_path / "out", val_fraction=0.0, rules=images.DecodeRules(max_object_mb=20)).manifest
    reasons = {Path(s["path"]).name: s["reason"] for s in m.skipped}
    assert m.classes == ["cats", "dogs"] and m.count("train") == 2  # _DSC0001.JPG and the linked dogs/d.png
    assert reasons[".hidden.png"].startswith("hidden name")
    assert "more than 20 times as long" in reasons["strip.png"]
    assert "larger than --max-object-mb 20: not read" in reasons["big.png"]
    assert not [u for u in read if u.endswith("big.png")]  # refused by its listed size, never read
    assert reasons["loop"].startswith("symlink loop")
    assert m.skip_counts and sum(m.skip_counts.values()) == len(m.skipped) == 4
    assert "4 skipped (" in m.summary()


def test_a_flat_folder_without_labels_is_an_unlabeled_set(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(10):
        (src / f"IMG_{i:04d}.png").write_bytes(_png(40, 30, i))
    written = _shards(src, tmp_path / "out", val_fraction=0.2)
    m = written.manifest
    assert not m.labeled and m.classes == [] and (m.count("train"), m.count("val")) == (8, 2)
    assert "unlabeled" in written.summary
    rows = [r for s in m.shard_uris("train") for r in _labels_in(s)]
    assert rows == [-1] * 8
    # nested folders made unlabeled on request (dates, cameras: not classes)
    (src / "2026-12-01").mkdir()
    (src / "2026-12-01" / "x.png").write_bytes(_png(40, 30, 99))
    assert _shards(src, tmp_path / "out2", val_fraction=0.0, unlabeled=True).manifest.count("train") == 11
    # supervised pretraining refuses it with a message that says why
    cfg = PretrainConfig.model_validate(
        {"data": {"manifest": str(tmp_path / "out"), "val_split": None}, "train": {"output": str(tmp_path / "runs")}}
    )
    with pytest.raises(trainer.JobError, match="unlabeled shard set: train.objective supervised needs labels"):
        trainer.preflight(cfg)


def _labels_in(shard: str) -> list[int]:
    from pipeline.data.shard_reader import read_shard

    return [s.label for s in read_shard(shard, None, "webdataset")]


def test_an_empty_train_split_says_why(tmp_path):
    m = manifest.Manifest(
        "webdataset",
        "v1",
        ["a"],
        {"train": manifest.Split(0, {"a": 0}, []), "val": manifest.Split(0, {"a": 0}, [])},
        skipped=[{"path": "x.png", "reason": "image of 4x4 px is smaller than the minimum of 16 px per side"}],
        skip_counts={"image of N px is smaller than the minimum of N px per side": 1},
    )
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "manifest.json").write_bytes(m.to_json())
    cfg = PretrainConfig.model_validate(
        {"data": {"manifest": str(tmp_path / "set"), "val_split": None}, "train": {"output": str(tmp_path / "runs")}}
    )
    with pytest.raises(trainer.JobError, match=r"0 samples in split 'train'.*make_shards skipped 1 inputs: 1 image"):
        trainer.preflight(cfg)


def test_one_odd_set_gets_the_same_decisions_from_both_jobs(ray_cluster, bucket):
    """The same inputs in S3 through make_shards and batch inference: the same inputs are refused, for the
    same kind of reason; `_DSC0001.JPG` is an input in both, a hidden name a listed skip in both."""
    odd = {
        "_DSC0001.JPG": _png(40, 40, 1),
        "ok.png": _png(28, 28, 2),
        "tiny.png": _png(4, 4, 3),
        "strip.png": _png(16, 4000, 4),
        "big.png": _png(40, 40, 5) + b"\0" * 3_000_000,
        "broken.png": _png(40, 40, 6)[:200],
        ".hidden.png": _png(40, 40, 7),
    }
    for name, data in odd.items():
        storage.write_bytes(f"{bucket}/odd/x/{name}", data)
    rules = images.DecodeRules(max_object_mb=2)
    m = shard_writer.make_shards(
        f"{bucket}/odd", f"{bucket}/odd-shards", val_fraction=0.0, rules=rules, progress=False, executor="local"
    ).manifest
    shard_refused = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in m.skipped}
    model = vit_model.create_model("vit_micro_patch4_32", num_classes=1)
    w, c = vit_model.export_bytes(model, class_names=["x"])
    storage.write_bytes(f"{bucket}/m/model.safetensors", w)
    storage.write_bytes(f"{bucket}/m/config.json", c)
    cfg = InferConfig(model=f"{bucket}/m", input=f"{bucket}/odd", output=f"{bucket}/odd-out", max_object_mb=2)
    result = inference.run(cfg)
    from pipeline.inference import outputs

    table = outputs.read_published(f"{bucket}/odd-out", columns=["image_uri", "error"]).to_pylist()
    infer_refused = {r["image_uri"].rsplit("/", 1)[1]: r["error"] for r in table if r["error"]}
    success = json.loads(storage.read_bytes(f"{result['output']}/_SUCCESS"))
    infer_refused.update({s["path"].rsplit("/", 1)[1]: s["reason"] for s in success["not_inputs"]})

    def kind(reason):  # the decision and its numbers; the decoder's own detail in parentheses may differ
        return reason.split(" (")[0]

    assert set(shard_refused) == set(infer_refused) == {"tiny.png", "strip.png", "big.png", "broken.png", ".hidden.png"}
    for name in shard_refused:
        assert kind(shard_refused[name]) == kind(infer_refused[name]), (name, shard_refused[name], infer_refused[name])
    assert m.count("train") == 2 and result["rows"] == 6  # the two inputs, plus the four error rows


def test_shard_time_resizing_stores_training_size_images(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    photo = np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=95)
    (src / "a" / "big.jpg").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    rotated = Image.fromarray(photo[:, :300])  # 300 wide, 400 high as stored; EXIF 6: shown 400 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(buf, "PNG", exif=exif)
    (src / "a" / "turned.png").write_bytes(buf.getvalue())
    small = _png(100, 80, 1)
    (src / "a" / "small.png").write_bytes(small)
    m = _shards(src, tmp_path / "out", val_fraction=0.0, max_side=256).manifest
    assert m.max_side == 256 and m.count("train") == 3
    from pipeline.data.shard_reader import read_shard

    stored = {}
    for s in m.shard_uris("train"):
        stored.update({r.key: (bytes(r.image), r.format) for r in read_shard(s, None, "webdataset")})
    by_size = {Image.open(io.BytesIO(b)).size: (b, f) for b, f in stored.values()}
    assert set(by_size) == {(256, 171), (256, 192), (100, 80)}  # longer side 256, aspect kept; small unchanged
    assert by_size[(256, 171)][1] == "jpeg" and Image.open(io.BytesIO(by_size[(256, 171)][0])).format == "JPEG"
    assert by_size[(256, 192)][1] == "png"  # stored upright (the EXIF turn applied), lossless
    assert by_size[(100, 80)][0] == small  # byte for byte
    with pytest.raises(ValueError, match="--max-side 8 is below --min-size 16"):
        _shards(src, tmp_path / "out2", max_side=8)


def test_odd_keys_are_read_as_listed_by_both_jobs(ray_cluster, bucket, tmp_path):
    # (`a//b.png` is a legal S3 key that SeaweedFS stores as `a/b.png`: it cannot be tried here, see
    # test_keys_pyarrow_cannot_address_go_through_boto3)
    keys = ["ünï cödé.png", "with space #1?.png", "100%.png", "_DSC0001.JPG", "sub/dir/deep.png"]
    for i, k in enumerate(keys):
        storage.write_bytes(f"{bucket}/keys/{k}", _png(40, 40, i))
    storage.write_bytes(f"{bucket}/keys/.thumbs/x.png", _png(40, 40, 9))
    written = shard_writer.make_shards(
        f"{bucket}/keys", f"{bucket}/keys-shards", val_fraction=0.0, unlabeled=True, progress=False, executor="local"
    )
    m = written.manifest
    assert m.count("train") == len(keys), written.summary
    assert [s["reason"] for s in m.skipped] == ["hidden name (a path component begins with '.')"]
    model = vit_model.create_model("vit_micro_patch4_32", num_classes=1)
    w, c = vit_model.export_bytes(model, class_names=["x"])
    storage.write_bytes(f"{bucket}/km/model.safetensors", w)
    storage.write_bytes(f"{bucket}/km/config.json", c)
    result = inference.run(InferConfig(model=f"{bucket}/km", input=f"{bucket}/keys", output=f"{bucket}/keys-out"))
    from pipeline.inference import outputs

    rows = outputs.read_published(f"{bucket}/keys-out", columns=["image_uri", "error"]).to_pylist()
    assert sorted(r["image_uri"] for r in rows) == sorted(f"{bucket}/keys/{k}" for k in keys)
    assert all(r["error"] is None for r in rows) and result["skipped_inputs"] == 1


def test_keys_pyarrow_cannot_address_go_through_boto3():
    """pyarrow's S3 filesystem refuses an empty path component and folds `a//b` when listing; storage
    reads, writes and lists such keys through boto3 by the exact key."""
    assert storage._odd_key(storage.parse_uri("s3://b/in/a//b.jpg"))
    assert storage._odd_key(storage.parse_uri("s3://b/in/cat/../dog/x.jpg"))
    assert not storage._odd_key(storage.parse_uri("s3://b/in/ünï #1?.jpg"))
    assert not storage._odd_key(storage.parse_uri("/tmp/a//b.jpg"))  # local paths: the OS decides


def test_batch_inference_and_the_figures_read_an_unlabeled_set(ray_cluster, bucket):
    for i in range(6):
        storage.write_bytes(f"{bucket}/flat/IMG_{i:04d}.png", _png(40, 30, i))
    m = shard_writer.make_shards(
        f"{bucket}/flat", f"{bucket}/flat-shards", val_fraction=0.0, progress=False, executor="local"
    ).manifest
    assert not m.labeled and m.count("train") == 6
    model = vit_model.create_model("vit_micro_patch4_32", num_classes=2)
    w, c = vit_model.export_bytes(model, class_names=["a", "b"])
    storage.write_bytes(f"{bucket}/um/model.safetensors", w)
    storage.write_bytes(f"{bucket}/um/config.json", c)
    result = inference.run(
        InferConfig(model=f"{bucket}/um", input=f"{bucket}/flat-shards/manifest.json", output=f"{bucket}/u-out")
    )
    from pipeline.figures import plots as figures
    from pipeline.inference import outputs

    rows = outputs.read_published(f"{bucket}/u-out", columns=["label_id", "pred_id", "error"]).to_pylist()
    assert result["rows"] == len(rows) == 6 and all(r["label_id"] is None and r["error"] is None for r in rows)
    assert len(figures.resolve_images(f"{bucket}/flat-shards/manifest.json", 4)) == 4


def test_a_killed_shard_task_leaves_nothing_behind_for_long(tmp_path, monkeypatch):
    """A task killed with SIGKILL cannot remove its temporary folder: the next make_shards on the node removes
    the folders of dead owners, never a live one's, and leaves none of its own."""
    import tempfile

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = temp / f"{shard_writer.SHARD_TMP_PREFIX}{int(gone.stdout)}-abc"
    live = temp / f"{shard_writer.SHARD_TMP_PREFIX}{os.getppid()}-def"
    for d in (dead, live):
        d.mkdir()
        (d / "shard").write_bytes(b"half a shard")
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "x.png").write_bytes(_png(32, 32))
    _shards(src.parent, tmp_path / "out", val_fraction=0.0)
    assert sorted(p.name for p in temp.iterdir()) == [live.name]


def test_an_object_over_the_size_cap_is_logged_with_that_reason(tmp_path, caplog):
    """Not read, and not decoded either: the worker's log gives the size reason, as the row does (it said
    "empty file (0 bytes)", from decoding the bytes that were never fetched)."""
    import logging

    from pipeline.data.transforms import ImageTransform
    from pipeline.inference.inputs import fetch_and_preprocess

    big, ok = tmp_path / "big.png", tmp_path / "ok.png"
    big.write_bytes(b"\0" * 3_000_000)
    ok.write_bytes(_png(40, 40, 1))
    t = ImageTransform(32, 4, train=False, rules=images.DecodeRules(max_object_mb=2))
    batch = {
        "image_uri": np.asarray([str(big), str(ok)], dtype=object),
        "label_id": np.asarray([None, None], dtype=object),
        "input_size": np.asarray([3_000_000, ok.stat().st_size]),
    }
    with caplog.at_level(logging.WARNING):
        out = fetch_and_preprocess(batch, t, reads=2)
    assert "larger than --max-object-mb 2: not read" in out["error"][0] and out["error_kind"][0] == "permanent"
    assert out["valid"].tolist() == [False, True] and out["error"][1] is None
    logged = [r.getMessage() for r in caplog.records if "big.png" in r.getMessage()]
    assert logged and all("max-object-mb" in m and "empty file" not in m for m in logged), logged


def test_a_fifo_and_a_non_utf8_name_are_listed_skips(tmp_path):
    """A FIFO in the source would block its read forever, a name that is not UTF-8 aborted the planning: both
    are skips with their reason, and the rest is sharded."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(3):
        (src / "a" / f"{i}.png").write_bytes(_png(40, 40, i))
    os.mkfifo(src / "a" / "pipe.png")
    with open(os.path.join(os.fsencode(src / "a"), b"caf\xe9.png"), "wb") as f:
        f.write(_png(40, 40, 9))
    m = _shards(src, tmp_path / "out", val_fraction=0.0).manifest
    reasons = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in m.skipped}
    assert m.count("train") == 3, reasons
    assert "not a regular file" in reasons["pipe.png"] and "not UTF-8" in reasons["caf\\xe9.png"], reasons


def test_both_jobs_read_the_decode_rules_from_one_declaration(tmp_path):
    """make_shards takes a schema like the other jobs (flags, --config YAML, exit 2 by name), and the decode
    rules' flags are declared once: the same values give the same rules in both jobs."""
    from pipeline.core.config import parse_job_args
    from pipeline.data.shards_config import RULE_ALIASES, SHARDS_ALIASES, DecodeRuleFields, ShardsConfig
    from pipeline.inference.infer_config import ALIASES, InferConfig

    flags = ["--min-size", "20", "--max-aspect", "3", "--max-object-mb", "5"]
    shards = parse_job_args(ShardsConfig, SHARDS_ALIASES, "", flags)
    infer = parse_job_args(InferConfig, ALIASES, "", flags)
    assert shards.rules == infer.rules == images.DecodeRules(20, 3.0, 5.0)
    assert issubclass(ShardsConfig, DecodeRuleFields) and issubclass(InferConfig, DecodeRuleFields)
    assert RULE_ALIASES.items() <= SHARDS_ALIASES.items() and RULE_ALIASES.items() <= ALIASES.items()
    cfg = tmp_path / "shards.yaml"
    cfg.write_text("source: digits\nshard_size: 64\nformat: parquet\n")
    got = parse_job_args(ShardsConfig, SHARDS_ALIASES, "", ["--config", str(cfg), "--seed", "3"])
    assert (got.source, got.shard_size, got.format, got.seed) == ("digits", 64, "parquet", 3)
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs/make_shards.py"), "--source", "digits", "--format", "tar", "--local"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "format" in r.stderr and "webdataset" in r.stderr, r.stderr


def test_a_local_input_folder_with_a_symlink_loop_lists_each_image_once(tmp_path):
    """#38 items 7, 15: pyarrow's listing followed a loop 40 levels deep (one image came back as 41 URIs and 41
    rows) and dropped dangling links silently; batch inference now lists local folders with make_shards'
    walker: the loop, the dangling link and the FIFO are listed skips with their reason."""
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.png").write_bytes(_png(40, 40, 1))
    (src / "b.png").write_bytes(_png(40, 40, 2))
    os.symlink(src, src / "sub" / "loop")
    os.symlink(tmp_path / "gone.png", src / "dangling.png")
    os.mkfifo(src / "pipe.png")
    got = inference.list_inputs(InferConfig(model="m", input=str(src), output=str(tmp_path / "out")), [])
    uris = got.table["image_uri"].to_pylist()
    assert sorted(u.rsplit("/", 1)[-1] for u in uris) == ["a.png", "b.png"] and len(uris) == 2
    reasons = " | ".join(s["reason"] for s in got.skipped)
    assert "symlink loop" in reasons and "dangling symlink" in reasons and "not a regular file" in reasons
    assert got.table["input_size"].to_pylist() == [os.path.getsize(u) for u in uris]


def test_a_listing_is_progress_for_the_lease_page_by_page(bucket, tmp_path, monkeypatch):
    """#38 item 9: stall detection counted finished stages only, so a listing that outlasted --stall-s gave
    the lease up every run and a huge prefix was never processed. Each page (or local folder) listed now
    changes the run's progress value, whatever the stage."""
    from pipeline.inference.run_report import StageTimes

    for i in range(23):
        storage.write_bytes(f"{bucket}/in/img{i:03d}.jpg", b"x")
    monkeypatch.setattr(storage, "LIST_PAGE", 5)
    for where in (f"{bucket}/in", str(tmp_path / "in")):
        if not where.startswith("s3://"):
            for d in range(4):
                (tmp_path / "in" / f"d{d}").mkdir(parents=True)
                (tmp_path / "in" / f"d{d}" / "a.jpg").write_bytes(b"x")
        stages, seen = StageTimes(), []

        def page(n, stages=stages, seen=seen, staging=f"{bucket}/out/_staging/run=r"):
            before = inference.progress(stages, staging)
            stages.listed += n
            seen.append(inference.progress(stages, staging) != before)

        cfg = InferConfig.model_validate({"model": "m", "input": where, "output": f"{bucket}/out"})
        inference.list_inputs(cfg, [], None, page)
        assert len(seen) >= 5 and all(seen), where  # 5 pages of S3 keys; the root and 4 folders locally


def test_a_16_bit_image_converts_by_its_top_byte_in_bounded_memory():
    """#38 item 6: a 16-bit image near the pixel limit made whole-image int64 copies (~2 GB at 89 Mpx) and
    killed its worker, run after run. The conversion now works a few rows at a time: same pixels, and the
    peak allocation stays a small multiple of the 8-bit result."""
    import tracemalloc

    h, w = 2048, 2048
    ramp = (np.arange(h * w, dtype=np.uint32) * 65535 // (h * w - 1)).astype(np.uint16).reshape(h, w)
    img = Image.fromarray(ramp)  # mode I;16
    tracemalloc.start()
    rgb = images.to_rgb(img)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    got = np.asarray(rgb)[:, :, 0]
    assert np.array_equal(got, ((ramp.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    # the 16-bit array, the 8-bit result and a few row blocks (measured 19 MB); whole-image int64 copies: 71 MB
    assert peak < 2 * h * w + h * w + 48 * images.TO_RGB_CHUNK_PX


def test_an_input_without_a_listed_size_is_read_only_up_to_the_cap(tmp_path):
    """#38 item 6: an input the ledger adds back has no listed size and skipped the size cap, so a huge
    object was read whole; it is now read to the cap plus one byte, and refused past it."""
    from pipeline.data.transforms import ImageTransform
    from pipeline.inference.inputs import fetch_and_preprocess

    big, small = tmp_path / "big.jpg", tmp_path / "small.png"
    big.write_bytes(b"\0" * 3_000_001)
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(buf, "PNG")
    small.write_bytes(buf.getvalue())
    rules = images.DecodeRules(max_object_mb=3.0)
    t = ImageTransform(32, 4, train=False, rules=rules)
    out = fetch_and_preprocess({"image_uri": [str(big), str(small)], "input_size": [None, None]}, t, reads=2)
    assert "larger than --max-object-mb 3" in out["error"][0] and out["error"][1] is None
    assert list(out["error_kind"])[0] == "permanent"
    assert storage.read_bytes(str(big), limit=10) == b"\0" * 10
