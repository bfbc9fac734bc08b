"""The storage module against the real SeaweedFS server, and the same API on local paths."""

import os

import pyarrow.fs as pafs
import pytest

from pipeline.core import ray_runtime, storage


def _roundtrip(base: str, tmp_path):
    big = os.urandom(17 << 20)  # over 16 MB: multipart on S3
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    storage.upload_file(src, f"{base}/data/big.bin")
    storage.write_bytes(f"{base}/data/small.txt", b"hello")
    listed = [i.path for i in storage.list_files(f"{base}/data")]
    assert [p.rsplit("/", 1)[1] for p in listed] == ["big.bin", "small.txt"]
    fs, path = storage.resolve(f"{base}/data/big.bin")
    assert fs.get_file_info(path).size == len(big)
    with fs.open_input_file(path) as f:  # ranged read
        f.seek(5 << 20)
        assert f.read(1000) == big[5 << 20 : (5 << 20) + 1000]
    assert storage.read_bytes(f"{base}/data/small.txt") == b"hello"
    storage.delete(f"{base}/data/big.bin")
    assert not storage.exists(f"{base}/data/big.bin")
    assert storage.exists(f"{base}/data/small.txt")


def test_s3_roundtrip(bucket, tmp_path):
    _roundtrip(bucket, tmp_path)


def test_local_roundtrip(tmp_path):
    _roundtrip(str(tmp_path / "store"), tmp_path)
    _roundtrip("file://" + str(tmp_path / "store2"), tmp_path)


def test_parse_uri_and_ray_storage_path(tmp_path):
    loc = storage.parse_uri("s3://b/some/key/")
    assert (loc.bucket, loc.key, loc.path) == ("b", "some/key", "b/some/key")
    assert loc.join("x.json").uri == "s3://b/some/key/x.json"
    path, fs = ray_runtime.train_storage_path("s3://b/runs")
    assert path == "b/runs" and isinstance(fs, pafs.S3FileSystem)  # no scheme with a filesystem
    path, fs = ray_runtime.train_storage_path(f"file://{tmp_path}/runs")
    assert path == f"{tmp_path}/runs" and isinstance(fs, pafs.LocalFileSystem)
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.parse_uri("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.parse_uri("s3:///x")


def test_missing_bucket_is_explained(stack):
    with pytest.raises(storage.StorageError) as e:
        storage.check_bucket("s3://no-such-bucket-vitray/x")
    assert "does not exist" in str(e.value) and "no-such-bucket-vitray" in str(e.value)
    assert stack["AWS_ENDPOINT_URL"] in str(e.value)
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes("s3://no-such-bucket-vitray/x")


def test_wrong_credentials_are_explained_without_the_secret(stack, bucket, monkeypatch):
    wrong_secret = "WRONG-secret-value-that-must-not-leak"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrongkeyid")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    for call in (
        lambda: storage.check_bucket(bucket),
        lambda: storage.read_bytes(f"{bucket}/x"),
        lambda: storage.write_bytes(f"{bucket}/x", b"1"),
    ):
        with pytest.raises(storage.StorageError) as e:
            call()
        msg = str(e.value)
        assert "credentials were refused" in msg and "AWS_ACCESS_KEY_ID" in msg, msg
        assert wrong_secret not in msg and stack["AWS_SECRET_ACCESS_KEY"] not in msg


def test_endpoint_down_is_explained(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(storage.StorageError, match="does not answer|cannot open"):
        storage.check_bucket("s3://b")


def test_ray_task_and_ray_data_read_from_s3(ray_cluster, bucket):
    import ray

    @ray.remote
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    storage.write_bytes(f"{bucket}/rows/a.csv", b"x,y\n1,2\n3,4\n")
    fs, path = storage.resolve(f"{bucket}/rows")
    ds = ray.data.read_csv(path, filesystem=fs)
    assert sorted(r["x"] for r in ds.take_all()) == [1, 3]


def test_error_messages_never_carry_credentials_written_into_the_endpoint(monkeypatch):
    """An endpoint variable with user info or a signed query (some gateways take them) is named without them:
    the text reaches logs and the published `error` column."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://user:hunter2@s3.example.test:9000/base?X-Amz-Signature=sekrit")
    where = storage._where(storage.parse_uri("s3://b/k"))
    assert "s3.example.test:9000/base" in where and "hunter2" not in where and "sekrit" not in where, where
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "AWS S3" in storage._where(storage.parse_uri("s3://b/k"))


def test_the_stack_creates_its_secret_files_0600(tmp_path, monkeypatch):
    """Written 0600 from creation, not chmod-ed after a world-readable moment (and an old 0644 file is narrowed)."""
    import importlib.util
    import stat
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "stack_under_test", Path(__file__).parents[1] / "cluster/local/stack.py"
    )
    stack_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack_mod)
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: pytest.fail("chmod after writing leaves a window"))
    old = tmp_path / "old"
    old.write_text("x")
    os.chmod(old, 0o644)
    for p in (tmp_path / "new", old):
        stack_mod.write_private(p, "secret")
        assert stat.S_IMODE(p.stat().st_mode) == 0o600 and p.read_text() == "secret"
