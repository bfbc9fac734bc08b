"""The local single-node stack: a SeaweedFS S3 server and a Ray head node, both on 127.0.0.1.

    python cluster/local/stack.py up       # start both (harmless when already up), wait until they answer
    python cluster/local/stack.py status   # what runs
    python cluster/local/stack.py down     # stop exactly what `up` started
    python cluster/local/stack.py node     # a second Ray node on this machine, in the foreground (Ctrl-C stops it)

State lives in `.state/` at the repository root (git-ignored; `VITRAY_STATE_DIR` moves it):
  s3.json       SeaweedFS identities, credentials generated on first `up` (mode 0600)
  s3-data/      the object data
  ray_token     Ray's auth token (token auth, which `ray job submit` needs in Ray 2.60)
  env           `source .state/env` sets AWS_* and RAY_ADDRESS for jobs, tests and your shell
  catalog.db    the embedded Iceberg catalog (SQLite) of `batch_infer --table`; its tables' files in s3://vitray
  weed.pid, ray.sid   what `down` stops (the S3 server's pid, the Ray head's process session)
Ports: S3 on VITRAY_S3_PORT (8333), SeaweedFS internals on the next four ports and their gRPC ports
on +20000 (clear of Ray's worker range 10002-19999), Ray GCS on VITRAY_RAY_PORT (6379), dashboard
on VITRAY_DASHBOARD_PORT (8265).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script, or loaded by path (tests)
import processes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("VITRAY_STATE_DIR", ROOT / ".state")).absolute()
BIN = processes.BIN
S3_PORT = int(os.environ.get("VITRAY_S3_PORT", 8333))
RAY_PORT = int(os.environ.get("VITRAY_RAY_PORT", 6379))
DASHBOARD_PORT = int(os.environ.get("VITRAY_DASHBOARD_PORT", 8265))
# Ray CPUs are scheduling slots. Twice the cores (at least 4) leaves slots for Ray Data's CPU tasks
# next to the training workers, which otherwise starve it on small machines (the 2-core deadlock).
RAY_CPUS = int(os.environ.get("VITRAY_RAY_CPUS", max(4, 2 * (os.cpu_count() or 1))))
WAIT_S = float(os.environ.get("VITRAY_STACK_WAIT_S", 90))


# ---- credentials and env file ------------------------------------------------------------------
def write_private(path: Path, text: str) -> None:
    """Write a secret to `path`, a file that is 0600 from its creation (never readable by others for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _credentials() -> tuple[str, str]:
    cfg = STATE / "s3.json"
    if not cfg.exists():
        key, secret = "vitray" + secrets.token_hex(6), secrets.token_urlsafe(30)
        ident = {
            "name": "admin",
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        write_private(cfg, json.dumps({"identities": [ident]}, indent=2))
    cred = json.loads(cfg.read_text())["identities"][0]["credentials"][0]
    return cred["accessKey"], cred["secretKey"]


def _ray_token() -> Path:
    path = STATE / "ray_token"
    if not path.exists():
        write_private(path, secrets.token_hex(32))
    return path


def env_vars() -> dict[str, str]:
    key, secret = _credentials()
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_ray_token()),
        "VITRAY_DASHBOARD": f"http://127.0.0.1:{DASHBOARD_PORT}",
        # Ray's single-machine mode, for the head and every client of it: Ray 2.60 otherwise moves a head started
        # on 127.0.0.1 to the machine's address (GCS, raylet, agents and the metrics exporter listen beyond
        # loopback), and a client resolves RAY_ADDRESS 127.0.0.1 to that address (with the head on loopback, it
        # never connects). Read when `ray` is imported.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # `batch_infer --table`'s embedded default: pyiceberg's SqlCatalog on SQLite here, files in the stack's S3
        "VITRAY_CATALOG": f"sqlite:///{STATE / 'catalog.db'}",
        "VITRAY_WAREHOUSE": "s3://vitray/warehouse",
    }


def _write_env() -> Path:
    path = STATE / "env"
    lines = [f"export {k}={v}" for k, v in env_vars().items()]
    write_private(
        path,
        "# written by cluster/local/stack.py; `source` it. Holds local-only credentials.\n" + "\n".join(lines) + "\n",
    )
    return path


# ---- SeaweedFS ---------------------------------------------------------------------------------
def _s3_answers() -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{S3_PORT}/", timeout=2)
    except urllib.error.HTTPError:
        return True  # 403 for an anonymous request: the gateway is up and checking credentials
    except OSError:
        return False
    return True


def _weed_up() -> None:
    pid = processes.read_pid(STATE / "weed.pid")
    if pid and _s3_answers():
        print(f"s3: already running (pid {pid}) on 127.0.0.1:{S3_PORT}")
        return
    if processes.port_open(S3_PORT):
        sys.exit(f"stack: port {S3_PORT} is taken by another program; set VITRAY_S3_PORT to a free port")
    data = STATE / "s3-data"
    data.mkdir(parents=True, exist_ok=True)
    _credentials()
    p = S3_PORT
    args = [
        processes.tool("weed"),
        "-logtostderr",  # into weed.log below, not glog files in /tmp
        "mini",
        f"-dir={data}",
        f"-s3.localSocket={_s3_socket()}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={p}",
        f"-s3.port.grpc={p + 20000}",
        f"-s3.config={STATE / 's3.json'}",
        f"-master.port={p + 1}",
        f"-master.port.grpc={p + 20001}",
        f"-volume.port={p + 2}",
        f"-volume.port.grpc={p + 20002}",
        f"-filer.port={p + 3}",
        f"-filer.port.grpc={p + 20003}",
        f"-admin.port={p + 4}",
        f"-admin.port.grpc={p + 20004}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    log = open(STATE / "weed.log", "ab")
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=STATE, start_new_session=True
    )
    (STATE / "weed.pid").write_text(str(proc.pid))
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"stack: the S3 server exited with code {proc.returncode}; see {STATE / 'weed.log'}")
        if _s3_answers() and _bucket_api_ready():
            print(f"s3: started (pid {proc.pid}) on 127.0.0.1:{S3_PORT}")
            return
        time.sleep(0.5)
    sys.exit(
        f"stack: the S3 server did not answer on 127.0.0.1:{S3_PORT} within {WAIT_S:.0f}s; see {STATE / 'weed.log'}"
    )


def _s3_socket() -> Path:
    """The gateway's local socket: in the state folder (not /tmp) while the path fits a socket address."""
    mine = STATE / "s3.sock"
    return mine if len(str(mine)) < 100 else Path(tempfile.gettempdir()) / f"seaweedfs-s3-{S3_PORT}.sock"


def _s3_client():
    import boto3
    from botocore.config import Config

    env = env_vars()
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )


def _bucket_api_ready() -> bool:
    """The gateway answers before the filer behind it can list buckets; wait for a real S3 call."""
    try:
        _s3_client().list_buckets()
        return True
    except ImportError:
        return True
    except Exception:
        return False


def _warehouse_bucket() -> None:
    """The bucket of the embedded Iceberg warehouse (VITRAY_WAREHOUSE), so `batch_infer --table` needs no step."""
    bucket = env_vars()["VITRAY_WAREHOUSE"].split("/")[2]
    client = _s3_client()
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)


# ---- Ray head ----------------------------------------------------------------------------------
def _ray_tmpdir() -> Path:
    # Ray's unix sockets live under it: keep the path short (108-byte socket path limit).
    return Path(f"/tmp/vitray-ray-{RAY_PORT}")


def _ray_pids() -> list[int]:
    """Every process of the Ray cluster this stack started.

    `ray start` runs in a session of its own (start_new_session), and every daemon it spawns, and
    every worker those spawn, stays in that session; its id is kept in `ray.sid`.
    """
    try:
        sid = int((STATE / "ray.sid").read_text())
    except (OSError, ValueError):
        return []
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            pids.append(int(proc.name))
    return pids


def _ray_env() -> dict[str, str]:
    env = {**os.environ, **env_vars()}
    env.pop("RAY_ADDRESS", None)
    # Job entrypoints say `python ...`: on this cluster that must be the project's venv.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 among them: the single-machine mode the job-local Ray has


def _ray_up() -> None:
    if _ray_pids() and processes.port_open(RAY_PORT):
        print(f"ray: already running on 127.0.0.1:{RAY_PORT} (dashboard http://127.0.0.1:{DASHBOARD_PORT})")
        return
    if processes.port_open(RAY_PORT):
        sys.exit(f"stack: port {RAY_PORT} is taken by another program (another Ray?); set VITRAY_RAY_PORT")
    args = [
        processes.tool("ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={RAY_PORT}",
        f"--num-cpus={RAY_CPUS}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD_PORT}",
        f"--temp-dir={_ray_tmpdir()}",
        "--disable-usage-stats",
        f"--ray-client-server-port={RAY_PORT + 1000}",
    ]
    log = open(STATE / "ray-start.log", "ab")
    proc = subprocess.Popen(
        args, env=_ray_env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    (STATE / "ray.sid").write_text(str(proc.pid))  # the new session's id is the leader's pid
    try:
        if proc.wait(timeout=WAIT_S) != 0:
            sys.exit(f"stack: `ray start` failed with code {proc.returncode}; see {STATE / 'ray-start.log'}")
    except subprocess.TimeoutExpired:
        sys.exit(f"stack: `ray start` did not return within {WAIT_S:.0f}s; see {STATE / 'ray-start.log'}")
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        if processes.port_open(RAY_PORT) and processes.port_open(DASHBOARD_PORT):
            print(
                f"ray: started on 127.0.0.1:{RAY_PORT} with {RAY_CPUS} CPU slots (dashboard http://127.0.0.1:{DASHBOARD_PORT})"
            )
            return
        time.sleep(0.5)
    sys.exit(
        f"stack: the Ray head did not answer on 127.0.0.1:{RAY_PORT} within {WAIT_S:.0f}s; see "
        f"{STATE / 'ray-start.log'}"
    )


# ---- a second node -----------------------------------------------------------------------------
# `ray start` refuses a joining node in single-machine mode (it guards laptops against multi-machine
# clusters); a second node on the head's own machine is what the multi-node tests need, so the CLI's check is
# lifted and its node address kept on loopback; the node's own processes run in single-machine mode, as the
# head's do, so every socket stays on loopback.
_JOIN = (
    "import sys, ray._private.ray_constants as c, ray._private.services as s; c.ENABLE_RAY_CLUSTER = True; "
    "s.node_ip_address_from_perspective = lambda *a, **k: '127.0.0.1'; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def node_command(num_cpus: int, resources: str = "{}") -> list[str]:
    """`ray start --block` of a second node joining this stack's head on 127.0.0.1 (tests, `stack.py node`)."""
    return [sys.executable, "-c", _JOIN, "start", f"--address=127.0.0.1:{RAY_PORT}", f"--num-cpus={num_cpus}"] + [
        f"--resources={resources}",
        "--node-ip-address=127.0.0.1",
        "--block",
        "--disable-usage-stats",
    ]


# ---- commands ----------------------------------------------------------------------------------
def up() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    STATE.chmod(0o700)
    _weed_up()
    _warehouse_bucket()
    _ray_up()
    path = _write_env()
    print(f"env: source {path}")


def down() -> None:
    ray_pids = _ray_pids()
    processes.stop(ray_pids, "ray")
    if not ray_pids:
        print("ray: not running")
    deadline = time.time() + 10  # the GCS may still hold its port a moment after its process is gone
    while time.time() < deadline and (_ray_pids() or processes.port_open(RAY_PORT)):
        time.sleep(0.2)
    if not _ray_pids() and (STATE / "ray.sid").exists():
        processes.remove_dead_pymp(since=(STATE / "ray.sid").stat().st_mtime)
    if not _ray_pids() and not processes.port_open(RAY_PORT) and _ray_tmpdir().exists():
        # Ray's session files (logs, sockets, spilled objects) of the runs this stack served: hundreds of MB
        # after a day of runs. Copy what you need from /tmp/vitray-ray-<port>/session_latest/logs first.
        shutil.rmtree(_ray_tmpdir(), ignore_errors=True)
        print(f"ray: removed its session files ({_ray_tmpdir()})")
    pid = processes.read_pid(STATE / "weed.pid")
    if pid:
        # weed mini runs as one process group we created (start_new_session): stop the group.
        processes.stop([pid], "s3")
    else:
        print("s3: not running")
    (STATE / "weed.pid").unlink(missing_ok=True)
    _s3_socket().unlink(missing_ok=True)


def status() -> int:
    pid = processes.read_pid(STATE / "weed.pid")
    s3_ok = bool(pid) and _s3_answers()
    print(f"s3: running (pid {pid}) on http://127.0.0.1:{S3_PORT}" if s3_ok else "s3: not running")
    ray_pids = _ray_pids()
    ray_ok = bool(ray_pids) and processes.port_open(RAY_PORT)
    if ray_ok:
        print(
            f"ray: running on 127.0.0.1:{RAY_PORT}, {len(ray_pids)} processes, dashboard http://127.0.0.1:{DASHBOARD_PORT}"
        )
    else:
        print("ray: not running")
    if (STATE / "env").exists():
        print(f"env: {STATE / 'env'}")
    return 0 if s3_ok and ray_ok else 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status", "env", "node"])
    ap.add_argument("--num-cpus", type=int, default=2, help="node: its CPU slots")
    ap.add_argument("--resources", default='{"worker_node": 1}', help="node: its custom resources (JSON)")
    args = ap.parse_args()
    cmd = args.command
    if cmd == "node":  # in the foreground: Ctrl-C stops it
        os.execve(sys.executable, node_command(args.num_cpus, args.resources), _ray_env())
    if cmd == "up":
        up()
    elif cmd == "down":
        down()
    elif cmd == "env":
        print(_write_env())
    else:
        sys.exit(status())


if __name__ == "__main__":
    main()
