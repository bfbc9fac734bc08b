"""Conditional operations: compare-and-swap on one object, what the output lease and the ledger stand on.

S3: `If-None-Match: *` (create only), `If-Match: <ETag>` (replace or delete only what was read); a
lost race is `PreconditionFailed`: 412, and AWS's 409 `ConditionalRequestConflict` for two conditional
writes in flight at once. Local folders: the same semantics under an flock, the tag a sha256.

`probe()`: a store that accepts the headers but does not honour them (SeaweedFS before about 3.97, a
gateway that drops them) would give two writers a 200 each; the probe asks it, on one scratch key, before
a job relies on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from pipeline.core.storage import StorageError, explain, parse_uri, s3_client, write_bytes


class PreconditionFailed(StorageError):
    """A conditional write or delete lost: the object exists already, or changed since it was read."""


@contextlib.contextmanager
def _local_lock(path: str):
    """An exclusive flock on a hidden sibling `.NAME.lock`: local conditional operations are atomic."""
    import fcntl

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.parent / f".{p.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _local_tag(path: str) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


class UnsafeStore(StorageError):
    """The store does not honour conditional writes: a lease on it would not keep a second writer out."""

    exit_code = 2  # nothing was written; the store (or --unsafe-no-lease) has to change


_WRONG_TAG = '"' + "0" * 32 + '"'  # no object has it
_LOST_RACE = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _is_precondition_failure(exc: BaseException) -> bool:
    """412 (the condition did not hold) or 409 (AWS: another conditional write to the key is in flight):
    either way this writer lost the race."""
    resp = getattr(exc, "response", None) or {}
    return resp.get("Error", {}).get("Code") in _LOST_RACE or resp.get("ResponseMetadata", {}).get(
        "HTTPStatusCode"
    ) in (409, 412)


def probe(prefix: str | os.PathLike, name: str) -> None:
    """Check, on the scratch key `{prefix}/_probe-{name}`, that the store refuses what a lease relies on it
    refusing: a second create-only PUT, a PUT and a DELETE with a wrong ETag. Raises UnsafeStore naming
    what was accepted; the scratch key is removed either way. Local folders always pass (O_EXCL + flock)."""
    loc = parse_uri(prefix)
    if loc.scheme == "file":
        return
    uri = loc.join(f"_probe-{name}").uri
    accepted = []
    try:
        tag = write_conditional(uri, b"first", if_absent=True)
        for what, attempt in (
            ("a second PUT with If-None-Match: *", lambda: write_conditional(uri, b"second", if_absent=True)),
            ("a PUT with If-Match on a wrong ETag", lambda: write_conditional(uri, b"third", if_match=_WRONG_TAG)),
            ("a DELETE with If-Match on a wrong ETag", lambda: delete_conditional(uri, _WRONG_TAG)),
        ):
            try:
                attempt()
                accepted.append(what)
            except PreconditionFailed:
                pass
        current = read_with_tag(uri)
        if not accepted and (current is None or current[1] != tag):
            accepted.append("nothing, yet the object changed")
    finally:
        scratch = parse_uri(uri)
        try:
            s3_client().delete_object(Bucket=scratch.bucket, Key=scratch.key)
        except Exception:  # noqa: BLE001 - a leftover scratch key is `_`-named, skipped by every reader
            pass
    if accepted:
        raise UnsafeStore(
            f"the store behind {loc.uri} accepted {', '.join(accepted)}: it ignores conditional writes, so the "
            "output's lease cannot keep a second run out (SeaweedFS before 4.17 and some gateways do this). "
            "Upgrade the store, or pass --unsafe-no-lease if only one run can ever write this output"
        )


def read_with_tag(uri: str | os.PathLike) -> tuple[bytes, str] | None:
    """(data, version tag) of one object, or None when it does not exist. The tag is the S3 ETag
    (the sha256 of a local file): pass it to `write_conditional(if_match=...)`."""
    loc = parse_uri(uri)
    try:
        if loc.scheme == "file":
            with _local_lock(loc.path):
                tag = _local_tag(loc.path)
                return None if tag is None else (Path(loc.path).read_bytes(), tag)
        obj = s3_client().get_object(Bucket=loc.bucket, Key=loc.key)
        return obj["Body"].read(), obj["ETag"]
    except Exception as e:
        if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise explain(e, loc, "read") from None


def write_conditional(
    uri: str | os.PathLike, data: bytes, *, if_absent: bool = False, if_match: str | None = None
) -> str:
    """Write one object only if it does not exist (`if_absent`: S3 If-None-Match: *, O_EXCL locally)
    or still carries the tag `if_match` (S3 If-Match). Returns the new tag; raises PreconditionFailed."""
    if if_absent == (if_match is not None):
        raise ValueError("write_conditional needs exactly one of if_absent=True or if_match=TAG")
    loc = parse_uri(uri)
    if loc.scheme == "file":
        with _local_lock(loc.path):
            if if_absent:
                try:
                    fd = os.open(loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    raise PreconditionFailed(f"{loc.uri} exists already") from None
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                if _local_tag(loc.path) != if_match:
                    raise PreconditionFailed(f"{loc.uri} changed since it was read")
                write_bytes(loc.uri, data)
        return hashlib.sha256(data).hexdigest()
    condition = {"IfNoneMatch": "*"} if if_absent else {"IfMatch": if_match}
    try:
        return s3_client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, **condition)["ETag"]
    except Exception as e:
        if _is_precondition_failure(e):
            raise PreconditionFailed(
                f"{loc.uri} {'exists already' if if_absent else 'changed since it was read'}"
            ) from None
        raise explain(e, loc, "write") from None


def delete_conditional(uri: str | os.PathLike, if_match: str) -> None:
    """Delete one object only if it still carries the tag `if_match`; raises PreconditionFailed."""
    loc = parse_uri(uri)
    if loc.scheme == "file":
        with _local_lock(loc.path):
            if _local_tag(loc.path) != if_match:
                raise PreconditionFailed(f"{loc.uri} changed since it was read")
            os.remove(loc.path)
        return
    try:
        s3_client().delete_object(Bucket=loc.bucket, Key=loc.key, IfMatch=if_match)
    except Exception as e:
        if _is_precondition_failure(e):
            raise PreconditionFailed(f"{loc.uri} changed since it was read") from None
        raise explain(e, loc, "delete") from None
