"""Shard sets that never change under a reader, made by the Ray Data job: awkward real-world inputs either
train or are listed as skipped, a re-run writes a new version beside the old, a damaged shard is named."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core import storage
from pipeline.data import manifest, shard_reader, shard_writer
from pipeline.data.streams import StreamConfig, patch_stream, sample_stream
from pipeline.data.transforms import ImageTransform
from pipeline.training import trainer
from pipeline.training.train_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _half(data):
    return data[: len(data) // 2]


def _exif_rotated_jpeg():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 90 clockwise)
    return _encode(_photo(64, 40, 1), "JPEG", exif=exif.tobytes())


@pytest.fixture
def awkward_tree(tmp_path):
    """One file of each awkward kind; what each must become: 'train' or a skip reason's words."""
    root = tmp_path / "awkward"
    gradient16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (40, 1))
    files = {
        "a/photo.mpo": (_encode(_photo(), "MPO", save_all=True, append_images=[_photo(seed=2)]), "train"),
        "a/targa.tga": (_encode(_photo(seed=3), "TGA"), "train"),
        "a/icon.ico": (_encode(_photo(48, 48, 4), "ICO", sizes=[(48, 48)]), "train"),
        "a/deep.png": (_encode(Image.fromarray(gradient16), "PNG"), "train"),
        "a/cmyk.jpg": (_encode(_photo(seed=5).convert("CMYK"), "JPEG"), "train"),
        "a/rotated.jpg": (_exif_rotated_jpeg(), "train"),
        "a/alpha.png": (_encode(_photo(seed=6).convert("LA"), "PNG"), "train"),
        "b/palette.gif": (_encode(_photo(seed=7).convert("P"), "GIF"), "train"),
        "b/tiny.png": (_encode(_photo(1, 1), "PNG"), "smaller than the minimum"),
        "b/truncated.jpg": (_half(_encode(_photo(seed=8), "JPEG")), "does not decode"),
        "b/zero.jpg": (b"", "empty file"),
        "b/notes.jpg": (b"just text, not an image at all", "not an image"),
        "b/vector.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n", "not one of the allowed formats"),
    }
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink(root / "gone.jpg", root / "b" / "dangling.jpg")
    (root / "empty_class").mkdir()
    expect = {str(root / rel): want for rel, (_, want) in files.items()}
    expect[str(root / "b" / "dangling.jpg")] = "dangling symlink"
    expect[str(root / "empty_class")] = "empty folder"
    return root, expect


def test_awkward_inputs_train_or_are_listed_skipped_and_nothing_counted_is_dropped(ray_cluster, awkward_tree, bucket):
    root, expect = awkward_tree
    m = shard_writer.make_shards(
        str(root), f"{bucket}/awk", val_fraction=0.0, shard_size=3, progress=False
    ).manifest  # the Ray Data job
    assert Image.open(root / "a/photo.mpo").format == "MPO"
    skipped = {s["path"]: s["reason"] for s in m.skipped}
    for path, want in expect.items():
        if want == "train":
            assert path not in skipped, (path, skipped.get(path))
        else:
            assert want in skipped.get(path, ""), (path, skipped.get(path))
    counted = m.splits["train"].count
    assert counted == sum(w == "train" for w in expect.values()) == 8 and m.classes == ["a", "b"]
    ds = patch_stream(f"{bucket}/awk", "train", StreamConfig(ImageTransform(32, 4, train=True)))
    rows = ds.take_all()
    assert len(rows) == counted and all(r["valid"] for r in rows)  # every counted sample arrives decodable
    formats = sorted(r["format"] for r in sample_stream(manifest.load_manifest(f"{bucket}/awk"), "train").take_all())
    assert formats == sorted(["mpo", "tga", "ico", "png", "jpeg", "jpeg", "png", "gif"])


def test_a_rerun_leaves_the_version_a_job_holds_byte_for_byte(ray_cluster, tmp_path, bucket):
    root = tmp_path / "tree"
    for i in range(12):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.png").write_bytes(_encode(_photo(40, 40, i), "PNG"))
    out = f"{bucket}/set"
    v1 = shard_writer.make_shards(
        str(root), out, val_fraction=0.0, shard_size=2, progress=False, executor="local"
    ).manifest
    held = manifest.load_manifest(out)  # what a starting training job holds
    expected = {}
    for entry in held.splits["train"].shards:
        rows = shard_reader.read_shard(f"{out}/{entry.name}", None, "webdataset")
        expected.update({s.key: (bytes(s.image), s.label) for s in rows})
    stream = sample_stream(held, "train")  # built now, executed after the re-run
    # the data changes: every image re-encoded, a third class; the same seed and shard names
    for i in range(12):
        (root / f"c{i % 2}" / f"{i}.png").write_bytes(_encode(_photo(40, 40, 100 + i), "PNG"))
    (root / "c2").mkdir()
    (root / "c2" / "new.png").write_bytes(_encode(_photo(40, 40, 99), "PNG"))
    v2 = shard_writer.make_shards(
        str(root), out, val_fraction=0.0, shard_size=2, progress=False, executor="local", keep_versions=2
    ).manifest
    assert v2.version != v1.version and v2.classes == ["c0", "c1", "c2"]
    got = {r["key"]: (bytes(r["image"]), int(r["label"])) for r in stream.take_all()}
    assert got == expected  # the old job read the old version, sha256-checked, byte for byte
    assert manifest.load_manifest(out).version == v2.version
    # a resumed training run reads the version it started on
    cfg = PretrainConfig.model_validate(
        {
            "data": {"manifest": f"{out}/manifest.json", "val_split": None},
            "train": {"output": f"{bucket}/runs", "batch_size": 4},
        }
    )
    trainer.pin_data(cfg, held)
    assert trainer.preflight(cfg).manifest.version == v1.version
    # pruning keeps the newest N complete versions, never the current one, and (#38 item 12) none that an
    # unfinished run reads: the pinned run claimed v1
    written = shard_writer.make_shards(
        str(root), out, val_fraction=0.0, shard_size=2, progress=False, executor="local", keep_versions=2
    )
    assert "pruned" not in written.summary and written.manifest.version > v2.version
    assert f"kept 1 old version(s) that unfinished runs use ({v1.version}: {trainer.run_layout(cfg).uri}" in (
        written.summary
    )
    assert trainer.preflight(cfg).manifest.version == v1.version  # it can still resume
    v4 = shard_writer.make_shards(
        str(root), out, val_fraction=0.0, shard_size=2, progress=False, executor="local", keep_versions=2
    ).manifest
    assert not storage.list_files(f"{out}/versions/{v2.version}")  # not in use: pruned as before
    # once the run has finished its claim goes, and the next make_shards prunes v1
    manifest.release_version(held, trainer.run_layout(cfg).uri)
    written = shard_writer.make_shards(
        str(root), out, val_fraction=0.0, shard_size=2, progress=False, executor="local", keep_versions=2
    )
    assert "pruned 2 old version" in written.summary  # v1 and the one after v2
    assert not storage.list_files(f"{out}/versions/{v1.version}") and storage.list_files(f"{out}/versions/{v4.version}")
    with pytest.raises(trainer.JobError, match="which is gone"):
        trainer.preflight(cfg)
    # --prune-in-use prunes a claimed version anyway
    later = manifest.load_manifest(out)
    manifest.claim_version(later, "s3://runs/other")
    shard_writer.make_shards(str(root), out, val_fraction=0.0, shard_size=2, progress=False, executor="local")
    written = shard_writer.make_shards(
        str(root), out, val_fraction=0.0, shard_size=2, progress=False, executor="local", keep_versions=1,
        prune_in_use=True,
    )  # fmt: skip
    assert not storage.list_files(f"{out}/versions/{later.version}")


def test_version_ids_sort_in_creation_order():
    """Pruning keeps the newest versions by name: ids made within one second must still sort by time
    (they did not when they had whole seconds and a random suffix)."""
    ids = [shard_writer.new_version() for _ in range(200)]
    assert ids == sorted(ids) and len(set(ids)) == 200


def test_a_flipped_byte_is_an_error_naming_the_shard(ray_cluster, tmp_path, bucket):
    root = tmp_path / "tree"
    for i in range(6):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.png").write_bytes(_encode(_photo(40, 40, i), "PNG"))
    m = shard_writer.make_shards(
        str(root), f"{bucket}/s", val_fraction=0.0, shard_size=3, progress=False, executor="local"
    ).manifest
    name = m.splits["train"].shards[1].name
    data = bytearray(storage.read_bytes(f"{bucket}/s/{name}"))
    data[len(data) // 3] ^= 0x01
    storage.write_bytes(f"{bucket}/s/{name}", bytes(data))
    ds = patch_stream(f"{bucket}/s", "train", StreamConfig(ImageTransform(32, 4, train=False)))
    with pytest.raises(Exception, match=r"shard .*" + name.split("/")[-1] + r" does not match its manifest"):
        ds.take_all()


def test_flat_prefix_with_a_labels_file_on_s3(stack, bucket):
    rows = []
    for i in range(6):
        storage.write_bytes(f"{bucket}/raw/img {i}.png", _encode(_photo(40, 40, i), "PNG"))
        rows.append(f"img {i}.png,{'cat' if i % 2 else 'dog'}")
    storage.write_bytes(f"{bucket}/raw/extra.png", _encode(_photo(40, 40, 9), "PNG"))
    storage.write_bytes(f"{bucket}/labels.csv", ("path,label\n" + "\n".join(rows) + "\nmissing.png,cat\n").encode())
    m = shard_writer.make_shards(
        f"{bucket}/raw",
        f"{bucket}/out",
        labels=f"{bucket}/labels.csv",
        val_fraction=0.0,
        progress=False,
        executor="local",
    ).manifest
    assert m.classes == ["cat", "dog"] and m.splits["train"].per_class == {"cat": 3, "dog": 3}
    reasons = {s["path"].rsplit("/", 1)[1]: s["reason"] for s in m.skipped}
    assert "not in the labels file" in reasons["extra.png"] and "not under --source" in reasons["missing.png"]


def test_make_shards_job_exit_codes_and_progress(stack, bucket, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/make_shards.py"),
            "--source",
            str(tmp_path / "nope"),
            "--output",
            f"{bucket}/x",
            "--local",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "is not a folder" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/make_shards.py"),
            "--source",
            "digits",
            "--output",
            f"{bucket}/d",
            "--local",
            "--min-size",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--min-size must be at least 1" in r.stderr


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_the_tar_reader_reads_what_tarfile_reads(fmt, monkeypatch):
    """Shard tars are parsed directly when plain (what make_shards writes) and by tarfile otherwise; both
    give every regular file's name and bytes, and a truncated archive is an error, not fewer samples."""
    import tarfile

    names = [
        "k0.image",
        "k0.cls",
        "sub/k1.json",
        "d/" * 60 + "long.image",
    ]  # the last needs a ustar prefix or an extension
    if fmt != "ustar":
        names.append("x" * 150 + ".image")  # no slash to split at: a GNU or pax long name
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf,
        mode="w",
        format={"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt],
    ) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = os.urandom(100 * i + 1)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("adir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(shard_reader.tarfile, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    assert shard_reader._tar_files(data) == want and [n for n, _ in want] == names
    assert bool(opened) == (fmt != "ustar")  # the plain archive never reaches tarfile
    with pytest.raises(tarfile.ReadError):
        shard_reader._tar_files(data[: 3 * 512 + 50])  # the second member cut short


def test_the_manifest_record_round_trips_and_reads_older_and_foreign_manifests(tmp_path):
    """One reader and writer for manifest.json: what it writes it reads back equal; a version's own copy
    resolves shard names against the set's root; a layout-1 set (no versions) and a manifest written by
    another tool (no counts or digests) still read."""
    m = manifest.Manifest(
        format="webdataset",
        version="20261203T000000.000001Z-abcdef",
        classes=["a", "b"],
        splits={
            "train": manifest.Split(3, {"a": 2, "b": 1}, [manifest.ShardEntry("versions/v/train/s0.tar", 3, 10, "f0")]),
            "val": manifest.Split(0, {"a": 0, "b": 0}, []),
        },
        skipped=[{"path": "x.jpg", "reason": "does not decode"}],
        seed=0,
    )
    manifest.write_manifest(str(tmp_path), m)
    by_prefix = manifest.load_manifest(str(tmp_path))
    own_copy = manifest.load_manifest(f"{tmp_path}/versions/{m.version}/manifest.json")
    assert by_prefix == own_copy == m and by_prefix.base == own_copy.base == str(tmp_path)
    assert by_prefix.uri == f"{tmp_path}/versions/{m.version}/manifest.json"
    assert by_prefix.shard_uris("train") == [f"{tmp_path}/versions/v/train/s0.tar"]
    assert by_prefix.digests("train") == {f"{tmp_path}/versions/v/train/s0.tar": "f0"}
    assert "3 images (3 train, 0 val), 2 classes, 1 shards, 1 skipped" in by_prefix.summary()
    with pytest.raises(ValueError, match="no 'test' split"):
        by_prefix.shard_uris("test")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text(
        json.dumps(
            {"format": "webdataset", "classes": ["x"], "splits": {"train": {"count": 1, "shards": [{"name": "s.tar"}]}}}
        )
    )
    old = manifest.load_manifest(str(legacy))
    assert old.layout == 1 and old.version is None and old.uri == f"{legacy}/manifest.json"
    assert old.digests("train") == {f"{legacy}/s.tar": ""} and old.count("val") == 0
