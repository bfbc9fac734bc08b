"""The one place that opens storage: URIs (`s3://bucket/key`, `file:///path`, `/path`) to filesystems.

Credentials and the endpoint come from the standard AWS chain (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_PROFILE`, ~/.aws, instance profiles; `AWS_ENDPOINT_URL[_S3]` for SeaweedFS, MinIO).
Nothing here prints or logs a credential; errors name the endpoint (no user info or query), bucket, key.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import re
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage failure with what to check; never carries a credential. `transient`: the store did not
    answer or failed on its side (timeouts, 5xx, a reset connection): worth a retry; a missing object,
    a missing bucket or refused credentials are not."""

    exit_code = 2  # EXIT_BAD_INPUT of `exits` (not imported: storage imports nothing of the project)

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is "s3" or "file"; `path` is what the filesystem takes."""

    uri: str
    scheme: str
    bucket: str | None
    key: str
    path: str  # "bucket/key" for S3 (no scheme), absolute path for files

    def join(self, *parts: str) -> Location:
        if self.scheme == "s3":
            key = posixpath.join(self.key, *parts) if self.key else posixpath.join(*parts)
            return parse_uri(f"s3://{self.bucket}/{key}")
        return parse_uri(os.path.join(self.path, *parts))

    @property
    def filesystem(self) -> pafs.FileSystem:
        return s3_filesystem() if self.scheme == "s3" else pafs.LocalFileSystem()

    def __str__(self) -> str:
        return self.uri


def parse_uri(uri: str | os.PathLike) -> Location:
    """Split a URI without URL-decoding: every legal S3 key (`#`, `?`, `%`, spaces, unicode) is kept verbatim."""
    uri = str(uri)
    for prefix in ("s3://", "s3a://"):
        if uri.startswith(prefix):
            bucket, _, key = uri[len(prefix) :].partition("/")
            if not bucket:
                raise StorageError(f"{uri!r} names no bucket: write s3://BUCKET/KEY")
            key = key.lstrip("/").rstrip("/")
            return Location(
                f"s3://{bucket}/{key}" if key else f"s3://{bucket}", "s3", bucket, key, f"{bucket}/{key}".rstrip("/")
            )
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", uri) and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use s3://, file:// or a local path")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    path = str(Path(path).expanduser().absolute())
    return Location(path, "file", None, path, path)


def endpoint_url() -> str | None:
    """The S3 endpoint (e.g. http://127.0.0.1:8333) or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def redacted(url: str) -> str:
    """`url` without user info or query: what an error (and so a published `error` column) may say of it."""
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.netloc.rsplit("@", 1)[-1], p.path, "", ""))


def _where(loc: Location) -> str:
    return f"bucket {loc.bucket!r} at endpoint {redacted(endpoint_url() or '') or 'AWS S3 (no AWS_ENDPOINT_URL set)'}"


@functools.lru_cache(maxsize=8)
def _s3_filesystem(
    endpoint: str | None, region: str, key_id: str | None, profile: str | None, _secret_digest: str
) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region}
    if endpoint:
        u = urlparse(endpoint)
        kwargs.update(endpoint_override=u.netloc or u.path, scheme=u.scheme or "https")
    if key_id and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(
            access_key=key_id,
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    # Otherwise pyarrow's AWS SDK walks the default chain: profile files, instance metadata, ...
    return pafs.S3FileSystem(
        **kwargs, connect_timeout=10, request_timeout=60, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=5)
    )


def _settings() -> tuple:
    """Cache key of the current settings: a changed environment gives a new client. The secret
    enters only as a digest, so it never sits in a cache key or a repr."""
    secret = (os.environ.get("AWS_SECRET_ACCESS_KEY") or "") + (os.environ.get("AWS_SESSION_TOKEN") or "")
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return endpoint_url(), _region(), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"), digest


def s3_filesystem() -> pafs.S3FileSystem:
    return _s3_filesystem(*_settings())


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path). The path has no scheme, as Ray Data and Ray Train want it."""
    loc = parse_uri(uri)
    return loc.filesystem, loc.path


@functools.lru_cache(maxsize=4)
def _boto3_client(endpoint: str | None, region: str, key_id: str | None, profile: str | None, _secret_digest: str):
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=profile) if profile and not key_id else boto3.session.Session()
    cfg = Config(
        region_name=region,
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=10,
        read_timeout=60,
    )
    return session.client("s3", endpoint_url=endpoint, config=cfg)


def s3_client():
    """A boto3 S3 client for the configured endpoint (path-style when an endpoint is set)."""
    return _boto3_client(*_settings())


# what pyarrow's and boto3's messages say when the credentials are refused / the endpoint does not answer
_REFUSED = ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "forbidden", "403", "invalidtoken")
_REFUSED += ("expiredtoken",)
_UNREACHABLE = ("Could not connect", "Connection refused", "curlCode: 7", "EndpointConnectionError")
_UNREACHABLE += ("Could not resolve", "Connect timeout")


def explain(exc: BaseException, loc: Location, action: str) -> StorageError:
    """Turn a pyarrow/boto3 failure into a StorageError that says what to check."""
    text = str(exc)
    code = ""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = resp.get("Error", {}).get("Code", "")
    blob = f"{code} {text}"
    flat = blob.replace("_", "").lower()  # pyarrow writes INVALID_ACCESS_KEY_ID, boto3 InvalidAccessKeyId
    target = f"{loc.uri}" if loc.scheme == "file" else f"{loc.uri} ({_where(loc)})"
    if loc.scheme == "s3":
        if any(s in flat for s in _REFUSED):
            return StorageError(
                f"cannot {action} {target}: the credentials were refused. Check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and that they may access this bucket"
            )
        if "nosuchbucket" in flat or "bucket does not exist" in flat:
            return StorageError(f"cannot {action} {target}: the bucket does not exist. Create it or fix the URI")
        if any(s in blob for s in _UNREACHABLE):
            return StorageError(
                f"cannot {action} {target}: the endpoint does not answer. Check AWS_ENDPOINT_URL and that the "
                "S3 server runs (locally: `make up`)",
                transient=True,
            )
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in blob or "Not Found" in blob or "404" in blob:
        if loc.scheme == "s3":
            try:  # pyarrow says "not found" for a missing bucket too: tell the two apart
                check_bucket(loc.uri)
            except StorageError as bucket_error:
                return bucket_error
        return StorageError(f"cannot {action} {target}: no such object or file")
    # Unknown (a 5xx, SlowDown, a timeout, a reset connection): keep the first line of the original message
    # (pyarrow/boto3 never include secrets); worth a retry.
    return StorageError(
        f"cannot {action} {target}: {text.splitlines()[0] if text else type(exc).__name__}", transient=True
    )


def check_bucket(uri: str | os.PathLike) -> None:
    """Fail fast, before any cluster work, if the bucket is missing or the credentials are refused."""
    loc = parse_uri(uri)
    if loc.scheme != "s3":
        return
    try:
        s3_client().head_bucket(Bucket=loc.bucket)
    except Exception as e:  # botocore ClientError, EndpointConnectionError, NoCredentialsError
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
        if code in ("404", "NoSuchBucket"):
            raise StorageError(
                f"cannot open {loc.uri} ({_where(loc)}): the bucket does not exist. Create it or fix the URI"
            ) from None
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise StorageError(
                f"cannot open {loc.uri} ({_where(loc)}): no credentials found. Set AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (locally: `source .state/env`)"
            ) from None
        raise explain(e, loc, "open") from None


# ---- small whole-object operations, all through the same filesystems --------------------------
def _odd_key(loc: Location) -> bool:
    """A legal S3 key that pyarrow's filesystem cannot address ("Empty path component": `a//b`, or a
    trailing `/.` or `/..`): such objects go through boto3 by their exact key."""
    return loc.scheme == "s3" and ("//" in loc.key or any(p in (".", "..") for p in loc.key.split("/")))


def read_bytes(uri: str | os.PathLike, large: bool = False, limit: int | None = None) -> bytes:
    """The whole object, or its first `limit` bytes at most (a ranged GET: an object whose size is not known
    is never read past a cap). `large` (weights, shards: megabytes and up): one GET of the size a HEAD
    returned, about 5x faster from S3 than pyarrow's buffered stream (100 MB: 0.2 against 1.2 s);
    small objects (images, JSON) skip the HEAD. Keys are read exactly as given (`a//b.jpg` too)."""
    loc = parse_uri(uri)
    try:
        if _odd_key(loc) or (limit is not None and loc.scheme == "s3"):
            ranged = {} if limit is None else {"Range": f"bytes=0-{max(limit - 1, 0)}"}
            return s3_client().get_object(Bucket=loc.bucket, Key=loc.key, **ranged)["Body"].read()
        with (loc.filesystem.open_input_file if large else loc.filesystem.open_input_stream)(loc.path) as f:
            return f.read() if limit is None else f.read(limit)
    except Exception as e:
        raise explain(e, loc, "read") from None


LIST_PAGE = 1000  # keys per listing request (S3's maximum)
LOCAL_TMP = "_tmp"  # beside a local file being written: `_`-named, so no reader (pyarrow, pandas, Spark) looks in


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a whole object. S3 PUTs are atomic; a local file is written in the `_tmp/` folder beside it
    and renamed into place, so a reader of the folder never meets a half-written file, even when the
    writer is killed (what a kill leaves in `_tmp/` is skipped by readers and removed by `scratch.remove_local_tmp`)."""
    loc = parse_uri(uri)
    try:
        if loc.scheme == "file":
            target = Path(loc.path)
            tmp_dir = target.parent / LOCAL_TMP
            tmp = tmp_dir / f"{target.name}.{uuid.uuid4().hex[:8]}"
            for attempt in range(5):  # a concurrent writer may remove the (then empty) folder in between
                try:
                    tmp_dir.mkdir(parents=True, exist_ok=True)
                    tmp.write_bytes(data)
                    break
                except (FileNotFoundError, FileExistsError):
                    if attempt == 4:
                        raise
            os.replace(tmp, target)
            with contextlib.suppress(OSError):  # not empty: another writer's file is in it
                tmp_dir.rmdir()
        elif _odd_key(loc):
            s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        else:
            with loc.filesystem.open_output_stream(loc.path) as f:
                f.write(data)
    except Exception as e:
        raise explain(e, loc, "write") from None


def exists(uri: str | os.PathLike) -> bool:
    loc = parse_uri(uri)
    try:
        return loc.filesystem.get_file_info(loc.path).type != pafs.FileType.NotFound
    except Exception as e:
        raise explain(e, loc, "look up") from None


def list_files(uri: str | os.PathLike, recursive: bool = True, start_after: str | None = None, progress=None):
    """Files under a prefix/folder, sorted by path; empty if it does not exist. On S3 (recursive) the keys
    come from the listing itself, exactly as stored: pyarrow's listing folds `a//b.jpg` into `a/b.jpg`, a
    key that does not exist. `progress(n)`: called as each page of n keys arrives (a long listing is
    progress, not a stall)."""
    loc = parse_uri(uri)
    try:
        if loc.scheme == "s3" and recursive:
            return _list_s3(loc, start_after, progress)
        infos = loc.filesystem.get_file_info(pafs.FileSelector(loc.path, recursive=recursive, allow_not_found=True))
    except Exception as e:
        raise explain(e, loc, "list") from None
    after = parse_uri(start_after).path if start_after else ""
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.path > after), key=lambda i: i.path)


def _list_s3(loc: Location, start_after: str | None = None, progress=None) -> list[pafs.FileInfo]:
    """`start_after`: a URI; only keys after it (S3 lists in key order, so the store skips the rest)."""
    prefix = f"{loc.key.rstrip('/')}/" if loc.key else ""
    out = []
    extra = {"StartAfter": parse_uri(start_after).key} if start_after else {}
    paginator = s3_client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=loc.bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE}, **extra):
        if progress:  # (n) -> None, as each page arrives
            progress(len(page.get("Contents", [])))
        for o in page.get("Contents", []):
            if o["Key"].endswith("/"):  # a console-made "folder" marker, not a file
                continue
            path = f"{loc.bucket}/{o['Key']}"
            out.append(pafs.FileInfo(path, pafs.FileType.File, size=o["Size"], mtime=o["LastModified"]))
    return sorted(out, key=lambda i: i.path)


def to_uri(loc_like: Location, fs_path: str) -> str:
    """A filesystem path from `list_files` back to a URI of the same scheme."""
    return f"s3://{fs_path}" if loc_like.scheme == "s3" else fs_path


def copy(src: str, dst: str, missing_ok: bool = False) -> bool:
    """Copy one object (server-side on S3: one CopyObject up to 5 GB, a multipart copy above). With
    `missing_ok`, a missing source returns False instead of raising."""
    s, d = parse_uri(src), parse_uri(dst)
    try:
        if s.scheme == d.scheme == "s3":
            try:
                s3_client().copy_object(CopySource={"Bucket": s.bucket, "Key": s.key}, Bucket=d.bucket, Key=d.key)
            except Exception as e:
                code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404"):
                    if missing_ok:
                        return False
                    raise
                if code not in ("InvalidRequest", "EntityTooLarge"):
                    raise
                s3_client().copy({"Bucket": s.bucket, "Key": s.key}, d.bucket, d.key)  # over 5 GB: multipart
        else:
            if missing_ok and not exists(src):
                return False
            write_bytes(dst, read_bytes(src))
        return True
    except StorageError:
        raise
    except Exception as e:
        raise explain(e, s, "copy") from None


def delete(uri: str | os.PathLike, recursive: bool = False) -> None:
    loc = parse_uri(uri)
    fs = loc.filesystem
    try:
        info = fs.get_file_info(loc.path)
        if info.type == pafs.FileType.Directory or (recursive and info.type == pafs.FileType.NotFound):
            if recursive:
                for f in list_files(loc.uri):
                    fs.delete_file(f.path)
                if loc.scheme == "file" and Path(loc.path).exists():
                    fs.delete_dir(loc.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(loc.path)
    except Exception as e:
        raise explain(e, loc, "delete") from None


def upload_file(local_path: str | os.PathLike, uri: str) -> None:
    """Upload a local file; to S3 as a parallel multipart upload with retries (boto3's transfer)."""
    loc = parse_uri(uri)
    try:
        if loc.scheme == "file":
            write_bytes(uri, Path(local_path).read_bytes())
            return
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=4)
        s3_client().upload_file(str(local_path), loc.bucket, loc.key, Config=cfg)
    except StorageError:
        raise
    except Exception as e:
        raise explain(e, loc, "upload to") from None


def download_folder(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy every object under a prefix (or files under a folder) into `local_dir`, streaming."""
    loc = parse_uri(uri)
    try:
        pafs.copy_files(
            loc.path, str(local_dir), source_filesystem=loc.filesystem, destination_filesystem=pafs.LocalFileSystem()
        )
    except Exception as e:
        raise explain(e, loc, "download") from None
