"""Which Ray a job runs on, and whether the job can ever fit on it.

`connect()`: the cluster at RAY_ADDRESS (`ray job submit` sets it), or, with none, a Ray of the job's
own: node address 127.0.0.1, no dashboard, token auth with a token file that only this user can read
(mode 0600, in a private temporary folder with Ray's session files, removed at exit), and as many CPU
slots as the local stack gives (2 x cores, so Ray Data decodes beside the training workers). The folder
holds `owner.lock`, locked by the job's process for as long as it lives: a job killed with SIGKILL
cannot remove its folder, so the next job that starts a private Ray removes every folder whose lock
nobody holds (`remove_stale_local_rays`), never one whose owner is alive. Every server of it listens on
loopback only: Ray 2.60 turns a node address of 127.0.0.1 into the machine's own (its metrics exporter
then listens on 0.0.0.0 without authentication, its agents on the external address) unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's single-machine mode, which the job sets for its own Ray.

`capacity()` and `check_fits()`: the job's CPU and GPU needs against what the cluster can grow to (the autoscaler's
node types times their max workers, as Ray reports them), not what runs now, so a cluster that
autoscales from zero is accepted; only what can never be scheduled is refused, naming both numbers.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.core import storage

log = logging.getLogger(__name__)
LOCAL_RAY_PREFIX = "vitray-local-ray-"
OWNER_LOCK = "owner.lock"
_owner_fds: list[int] = []  # the locks this process holds: open until it exits, however it exits


def local_cpu_slots() -> int:
    """CPU slots of a job's own Ray: as `cluster/local/stack.py` sizes the local head."""
    return int(os.environ.get("VITRAY_RAY_CPUS", max(4, 2 * (os.cpu_count() or 1))))


def connect(log_to_driver: bool = True) -> None:
    """Connect to RAY_ADDRESS, or start a private, token-protected local Ray. Call before `import ray`
    anywhere else in the process: Ray reads its auth settings when it is imported."""
    if os.environ.get("RAY_ADDRESS"):
        host = os.environ["RAY_ADDRESS"].split("://")[-1].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost", "[::1]"):
            # a cluster on this machine's loopback (`make up`): Ray's single-machine mode, as its head has it, or
            # the client resolves 127.0.0.1 to the machine's address and never reaches the head
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=log_to_driver)
        return
    if "ray" in __import__("sys").modules and __import__("ray").is_initialized():
        return
    remove_stale_local_rays()
    folder = make_owned_folder()  # 0700: the token and Ray's session files
    atexit.register(shutil.rmtree, folder, True)  # registered before ray.init: runs after Ray's own shutdown
    token = os.path.join(folder, "auth_token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    # read when ray is imported: a single-machine Ray resolves its node address to loopback, so the metrics
    # exporter, the agents and the gRPC servers bind 127.0.0.1 (tests/test_cluster_runtime.py lists them)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    import ray

    print(
        f"no RAY_ADDRESS: starting a local Ray on 127.0.0.1 with {local_cpu_slots()} CPU slots (token auth)", flush=True
    )
    ray.init(
        num_cpus=local_cpu_slots(),
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=log_to_driver,
        configure_logging=False,
        _temp_dir=os.path.join(folder, "ray"),
    )


def make_owned_folder(parent: str | None = None) -> str:
    """A new private folder `{tmp}/vitray-local-ray-XXXX` whose `owner.lock` this process holds (flock) until
    it exits. Locked under a hidden name first, then renamed: no other job ever sees it unlocked."""
    staging = tempfile.mkdtemp(prefix="." + LOCAL_RAY_PREFIX, dir=parent)
    fd = os.open(os.path.join(staging, OWNER_LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())  # for a person looking; the lock is what tells
    _owner_fds.append(fd)
    folder = os.path.join(os.path.dirname(staging), os.path.basename(staging)[1:])
    os.rename(staging, folder)
    return folder


def _named_by_a_process(folder: Path) -> bool:
    """A folder of a job from before owner locks: alive while any process's command line names it (Ray's
    raylet and GCS carry their temp dir). Where /proc cannot tell, it counts as alive."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    needle = str(folder).encode()
    for p in proc.iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def remove_stale_local_rays(parent: str | None = None) -> list[str]:
    """Remove the private-Ray folders of jobs that are gone (their `owner.lock` is free; an old folder without
    one only if no process names it). A folder whose owner lives is left alone. Returns what was removed."""
    removed = []
    for d in sorted(Path(parent or tempfile.gettempdir()).glob(LOCAL_RAY_PREFIX + "*")):
        if d.is_symlink() or not d.is_dir():
            continue
        lock = d / OWNER_LOCK
        if lock.exists():
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue  # not ours to judge (another user's, or gone meanwhile)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its owner is alive
            finally:
                os.close(fd)
        elif _named_by_a_process(d):
            continue
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed %s: the job that made it is gone", d)
        removed.append(str(d))
    return removed


def capacity() -> dict[str, tuple[float, float | None]]:
    """{"CPU": (now, max), "GPU": (now, max)}; max is None when Ray reports no autoscaling config."""
    import ray

    now = ray.cluster_resources()
    try:
        from ray._private.state import state  # what Ray Data's own autoscaler reads (not a public API)

        grow = state.get_max_resources_from_cluster_config() or {}
    except Exception as e:  # an older or newer Ray without it: judge by what is up now
        log.debug("no autoscaling config from Ray: %s", e)
        grow = {}
    return {k: (now.get(k, 0.0), float(grow[k]) if grow.get(k) else None) for k in ("CPU", "GPU")}


def check_fits(
    need: dict[str, float],
    have: dict[str, tuple[float, float | None]],
    max_override: dict[str, float | None] | None = None,
) -> str | None:
    """Why `need` can never be scheduled, or None. A ceiling comes from the autoscaler's node types or
    from `max_override` (a job flag); without either, a need above what runs now is logged, not
    refused: the cluster may still grow."""
    for res, amount in need.items():
        now, grow = have.get(res, (0.0, None))
        if max_override and max_override.get(res) is not None:
            grow = max_override[res]
        if amount <= now or (grow is not None and amount <= grow):
            continue
        if grow is None:
            log.warning(
                "the job needs %g %s slots and the cluster has %g now; waiting for the autoscaler to add "
                "nodes (set train.max_cluster_cpus / max_cluster_gpus to have this checked up front)",
                amount,
                res,
                now,
            )
            continue
        return f"the job needs {amount:g} {res} slots; the cluster has {now:g} now and can grow to {grow:g}"
    return None


def train_storage_path(uri: str | os.PathLike) -> tuple[str, pafs.FileSystem]:
    """(storage_path, storage_filesystem) for `ray.train.RunConfig`.

    Ray Train V2 refuses `s3://bucket/key` together with an explicit filesystem (ArrowInvalid):
    it wants `bucket/key`. Local paths are made absolute.
    """
    loc = storage.parse_uri(uri)
    if loc.scheme == "file":
        Path(loc.path).mkdir(parents=True, exist_ok=True)
    return loc.path, loc.filesystem
