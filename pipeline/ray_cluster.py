"""Which Ray a job runs on, and whether the job can ever fit on it.

`connect()`: the cluster at RAY_ADDRESS (`ray job submit` sets it), or, with none, a Ray of the job's
own: node address 127.0.0.1, no dashboard, token auth with a token file that only this user can read
(mode 0600, in a private temporary folder with Ray's session files, removed at exit), and as many CPU
slots as the local stack gives (2 x cores, so Ray Data decodes beside the training workers). Ray 2.60's
gRPC servers (GCS, raylet, workers) still listen on every interface whatever the node address: the
token is what guards them.

`capacity()` and `check_fits()`: the job's CPU and GPU needs against what the cluster can grow to (the autoscaler's
node types times their max workers, as Ray reports them), not what runs now, so a cluster that
autoscales from zero is accepted; only what can never be scheduled is refused, naming both numbers.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile

log = logging.getLogger(__name__)


def local_cpu_slots() -> int:
    """CPU slots of a job's own Ray: as `cluster/local/stack.py` sizes the local head."""
    return int(os.environ.get("VITRAY_RAY_CPUS", max(4, 2 * (os.cpu_count() or 1))))


def connect(log_to_driver: bool = True) -> None:
    """Connect to RAY_ADDRESS, or start a private, token-protected local Ray. Call before `import ray`
    anywhere else in the process: Ray reads its auth settings when it is imported."""
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            ray.init(log_to_driver=log_to_driver)
        return
    if "ray" in __import__("sys").modules and __import__("ray").is_initialized():
        return
    folder = tempfile.mkdtemp(prefix="vitray-local-ray-")  # 0700: the token and Ray's session files
    atexit.register(shutil.rmtree, folder, True)  # registered before ray.init: runs after Ray's own shutdown
    token = os.path.join(folder, "auth_token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    import ray

    print(f"no RAY_ADDRESS: starting a local Ray on 127.0.0.1 with {local_cpu_slots()} CPU slots (token auth)", flush=True)
    ray.init(num_cpus=local_cpu_slots(), _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=log_to_driver, configure_logging=False, _temp_dir=os.path.join(folder, "ray"))


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


def check_fits(need: dict[str, float], have: dict[str, tuple[float, float | None]],
               max_override: dict[str, float | None] | None = None) -> str | None:
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
            log.warning("the job needs %g %s slots and the cluster has %g now; waiting for the autoscaler to add "
                        "nodes (set train.max_cluster_cpus / max_cluster_gpus to have this checked up front)", amount, res, now)
            continue
        return f"the job needs {amount:g} {res} slots; the cluster has {now:g} now and can grow to {grow:g}"
    return None
