"""Conditional operations: compare-and-swap on one object, what the output lease and the ledger stand on.

S3: `If-None-Match: *` (create only), `If-Match: <ETag>` (replace only what was read); a
lost race is `PreconditionFailed`: 412, and AWS's 409 `ConditionalRequestConflict` for two conditional
writes in flight at once. Local folders: the same semantics under an flock, the tag a sha256.

`probe()`: a store that accepts the headers but does not honour them (SeaweedFS before about 3.97, a
gateway that drops them), or checks them apart from the write, would give two writers a 200 each; the
probe asks it, one request after another and several at once, before a job relies on it.
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
    """Check, on scratch keys `{prefix}/_probe-{name}*`, that the store refuses what a lease relies on it
    refusing: a second create-only PUT and a PUT with a wrong ETag, one after another, and of RACERS
    create-only PUTs (then RACERS If-Match PUTs on one tag) sent at once, exactly one wins; a store that
    checks, then writes, lets several through. Raises UnsafeStore naming what was accepted; the scratch
    keys are removed either way. Local folders: O_EXCL + flock, refused on a mount where flock is not
    known to lock (`check_local_locking`)."""
    loc = parse_uri(prefix)
    if loc.scheme == "file":
        check_local_locking(loc.path)
        return
    uri, race = loc.join(f"_probe-{name}").uri, loc.join(f"_probe-{name}-race").uri
    accepted = []
    try:
        tag = write_conditional(uri, b"first", if_absent=True)
        for what, attempt in (
            ("a second PUT with If-None-Match: *", lambda: write_conditional(uri, b"second", if_absent=True)),
            ("a PUT with If-Match on a wrong ETag", lambda: write_conditional(uri, b"third", if_match=_WRONG_TAG)),
        ):
            try:
                attempt()
                accepted.append(what)
            except PreconditionFailed:
                pass
        current = read_with_tag(uri)
        if not accepted and (current is None or current[1] != tag):
            accepted.append("nothing, yet the object changed")
        if not accepted:
            wins = _race(lambda i: write_conditional(race, b"%d" % i, if_absent=True))
            if wins != 1:
                accepted.append(f"{wins} of {RACERS} PUTs with If-None-Match: * sent at once")
            elif (raced := read_with_tag(race)) is not None:
                wins = _race(lambda i: write_conditional(race, b"m%d" % i, if_match=raced[1]))
                if wins != 1:
                    accepted.append(f"{wins} of {RACERS} PUTs with If-Match on one ETag sent at once")
    finally:
        for key in (uri, race):
            scratch = parse_uri(key)
            try:
                s3_client().delete_object(Bucket=scratch.bucket, Key=scratch.key)
            except Exception:  # noqa: BLE001 - a leftover scratch key is `_`-named, skipped by every reader
                pass
    if accepted:
        raise UnsafeStore(
            f"the store behind {loc.uri} accepted {', '.join(accepted)}: it ignores conditional writes (or checks "
            "them apart from the write), so the output's lease cannot keep a second run out (SeaweedFS before "
            "4.17 and some gateways do this). Upgrade the store, or pass --unsafe-no-lease if only one run can "
            "ever write this output"
        )


RACERS = 4  # conditional PUTs the probe sends at once


def _race(put) -> int:
    """How many of RACERS calls `put(i)`, started together, were not refused."""
    import threading

    start, wins, lock = threading.Barrier(RACERS), [], threading.Lock()

    def one(i):
        start.wait()
        try:
            put(i)
            with lock:
                wins.append(i)
        except PreconditionFailed:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(RACERS)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return len(wins)


# Filesystems on which flock() does not exclude a writer on another machine (or at all): FUSE object-store
# mounts, 9p/virtiofs shares, SMB, and NFS mounted with `nolock`/`local_lock`.
_NO_SHARED_FLOCK = ("fuse", "9p", "virtiofs", "vboxsf", "cifs", "smb3", "smbfs", "ceph-fuse")


def mount_of(path: str, mountinfo: str | None = None) -> tuple[str, str]:
    """(filesystem type, mount options) of the mount that holds `path`, from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return "", ""
    real, best = os.path.realpath(path), ("", "", "")
    for line in mountinfo.splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 6 or len(rest) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, rest[0], f"{fields[5]},{rest[2]}")
    return best[1], best[2]


def check_local_locking(path: str, mountinfo: str | None = None) -> None:
    """Refuse a local output on a mount whose flock does not lock across machines: two runs would both
    take the lease. NFS locks (NLM / NFSv4) unless mounted `nolock` or `local_lock=...`."""
    fstype, options = mount_of(path, mountinfo)
    opts = set(options.split(","))
    unsafe = fstype.split(".")[0] in _NO_SHARED_FLOCK or (
        fstype.startswith("nfs")
        and ("nolock" in opts or any(o.startswith("local_lock=") and o != "local_lock=none" for o in opts))
    )
    if unsafe:
        raise UnsafeStore(
            f"{path} is on a {fstype} mount ({options}), where a file lock does not keep a run on another "
            "machine out, so the output's lease cannot either. Write the output to S3 (conditional writes), "
            "to a local disk, or pass --unsafe-no-lease if only one run can ever write it"
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
