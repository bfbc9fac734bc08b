"""The cluster files and entry points run, not just parse: the launcher's own start commands form a
token-protected two-node cluster here; the preflight judges an autoscaling cluster by what it can
grow to; a job without RAY_ADDRESS starts a private Ray sized for this machine."""

import importlib.util
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from pipeline.training import trainer
from pipeline.training.train_config import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


# ---- the preflight against the autoscaler's node types, as Ray's GCS reports them ------------------
@pytest.fixture
def autoscaling_config(ray_cluster):
    """Put a cluster config into the GCS where Ray's autoscaler (v2, KubeRay) publishes its node types."""
    import ray._raylet as raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    def publish(groups):
        cfg = autoscaler_pb2.ClusterConfig()
        for name, cpus, max_count in groups:
            g = cfg.node_group_configs.add()
            g.name, g.max_count = name, max_count
            g.resources["CPU"] = cpus
        internal_kv._internal_kv_put(
            raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY,
            cfg.SerializeToString(),
            overwrite=True,
            namespace=raylet.GCS_AUTOSCALER_STATE_NAMESPACE,
        )

    yield publish
    internal_kv._internal_kv_del(
        raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, namespace=raylet.GCS_AUTOSCALER_STATE_NAMESPACE
    )


def _job(workers, **train):
    return PretrainConfig.model_validate({"train": {"num_workers": workers, "batch_size": 64 * workers, **train}})


def test_preflight_accepts_a_cluster_that_can_grow_and_refuses_one_that_cannot(autoscaling_config, caplog):
    import ray

    now = ray.cluster_resources()["CPU"]
    autoscaling_config([("head", 0, 1), ("cpu-data", 32, 4)])  # KubeRay: 0 to 4 pods of 32 slots
    trainer.check_cluster_fits(_job(64))  # 65 slots needed, 4 up now, 128 possible: accepted
    autoscaling_config([("head", 0, 1), ("cpu-data", 8, 1)])
    with pytest.raises(trainer.JobError, match=rf"needs 65 CPU slots; the cluster has {now:g} now and can grow to 8"):
        trainer.check_cluster_fits(_job(64))


def test_preflight_without_node_types_waits_for_the_autoscaler_unless_given_a_ceiling(ray_cluster, caplog):
    trainer.check_cluster_fits(_job(64))  # nothing reported: it may still grow, so not refused
    assert "waiting for the autoscaler" in caplog.text
    with pytest.raises(trainer.JobError, match="needs 65 CPU slots.*can grow to 16"):
        trainer.check_cluster_fits(_job(64, max_cluster_cpus=16))
    with pytest.raises(trainer.JobError, match="needs 2 GPU slots.*can grow to 0"):
        trainer.check_cluster_fits(_job(2, use_gpu=True, max_cluster_gpus=0))


# ---- a job without RAY_ADDRESS --------------------------------------------------------------------
_OWNER = (
    "import sys, time; from pipeline.core import ray_runtime; "
    "print(ray_runtime.make_owned_folder(sys.argv[1] if len(sys.argv) > 1 else None), flush=True); time.sleep(600)"
)


def _owner(parent: str | None = None) -> tuple[subprocess.Popen, Path]:
    """A process that made a private-Ray folder the way a job does and still holds it."""
    p = subprocess.Popen(
        [sys.executable, "-c", _OWNER, *([parent] if parent else [])], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    return p, Path(p.stdout.readline().strip())


def _killed_owner(parent: str | None = None) -> Path:
    """The folder of a job killed with SIGKILL: it never ran its clean-up."""
    p, folder = _owner(parent)
    p.kill()
    p.wait()
    assert folder.is_dir() and (folder / "owner.lock").read_text().strip() == str(p.pid)
    return folder


def test_stale_private_ray_folders_are_removed_and_live_ones_kept(tmp_path):
    from pipeline.core.ray_runtime import remove_stale_local_rays

    dead = _killed_owner(str(tmp_path))
    live, live_folder = _owner(str(tmp_path))
    legacy_dead = tmp_path / "vitray-local-ray-legacy1"  # made before owner locks, its Ray gone
    legacy_live = tmp_path / "vitray-local-ray-legacy2"  # ... its Ray still running (named on a command line)
    for d in (legacy_dead, legacy_live):
        (d / "ray").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", f"--temp_dir={legacy_live}/ray"])
    try:
        removed = remove_stale_local_rays(str(tmp_path))
        assert sorted(removed) == sorted([str(dead), str(legacy_dead)])
        assert not dead.exists() and not legacy_dead.exists()
        assert live_folder.is_dir() and legacy_live.is_dir()
        assert remove_stale_local_rays(str(tmp_path)) == []  # nothing more to do, the live ones still kept
    finally:
        for p in (live, holder):
            p.kill()
            p.wait()
    assert sorted(remove_stale_local_rays(str(tmp_path))) == sorted([str(live_folder), str(legacy_live)])  # now gone


def test_a_job_without_ray_address_runs_the_smoke_config_on_a_private_ray(stack, digits_shards, bucket):
    """Two training workers on this 2-core machine (the local stack's sizing); the job's own Ray serves no
    dashboard, listens on loopback only (metrics exporter, agents, GCS, raylet, workers: every socket of
    its process tree) and reads a token file only its user can read; nothing of it is left afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    stale = _killed_owner()  # an earlier job on this machine, killed with SIGKILL: its folder is in the temp dir
    live, live_folder = _owner()  # a job that is still running
    try:
        log = tempfile.TemporaryFile(mode="w+")  # not a pipe: Ray Data's progress bars would fill it and block the job
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "jobs/pretrain.py"),
                "--config",
                str(ROOT / "configs/smoke.yaml"),
                "--data",
                digits_shards,
                "--output",
                f"{bucket}/runs",
                "--name",
                "private",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seen, token_modes, token_path, deadline, listening = {}, set(), None, time.time() + 300, set()
        while proc.poll() is None and time.time() < deadline:
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if not token_modes and p.environ().get("RAY_AUTH_TOKEN_PATH"):
                        token_path = Path(p.environ()["RAY_AUTH_TOKEN_PATH"])
                        token_modes.add(stat.S_IMODE(os.stat(token_path).st_mode))
                    cmd = " ".join(p.cmdline())
                    if "raylet" in p.name():
                        seen["raylet"] = cmd
                    for c in p.net_connections(kind="inet"):
                        if c.status == "LISTEN":
                            listening.add((c.laddr.ip, c.laddr.port, p.name()))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.5)
        proc.wait(timeout=60)
        log.seek(0)
        out = log.read()
        log.close()
        assert proc.returncode == 0, out[-3000:]
        assert "starting a local Ray on 127.0.0.1" in out and "best val top-1" in out
        assert "raylet" in seen and "--temp_dir" not in seen["raylet"] or "vitray-local-ray-" in seen["raylet"], seen
        assert token_modes == {0o600}, token_modes
        # Ray's own servers: GCS, raylet, the dashboard agent (its metrics exporter too) and the runtime-env agent.
        # (Train workers run torch's TCPStore, the DDP rendezvous, which binds every interface: torch 2.13 has no
        # option to narrow it, and the README says so; their process titles change with the method they run.)
        ray_own = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
        own_listening = {x for x in listening if x[2] in ray_own}
        assert {x[2] for x in own_listening} == set(ray_own), listening
        exposed = {x for x in own_listening if x[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert not [x for x in listening if x[1] == 8265], "a dashboard listens"
        own = token_path.parent
        assert own.name.startswith("vitray-local-ray-") and own != live_folder
        assert not own.exists()  # its token and session files removed at exit
        assert not stale.exists()  # the killed job's folder removed when this job started its Ray
        assert live_folder.is_dir()  # the running job's left alone
    finally:
        for p in (live, *([proc] if "proc" in locals() and proc.poll() is None else [])):
            p.kill()
            p.wait()
        shutil.rmtree(live_folder, ignore_errors=True)


# ---- the launcher's own start commands, run on this machine ----------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _localise(cmd: str, head_port: int, dash_port: int, client_port: int, temp_dir: str) -> list[str]:
    """A start command of cluster/aws/cluster.yaml for this machine: loopback and free ports instead of
    the cluster's, no autoscaler (it would call AWS), a temp dir of its own."""
    env_part, _, rest = cmd.partition("ray start")
    argv = shlex.split("ray start" + rest)
    out = []
    for a in argv[2:]:
        if a.startswith(("--autoscaling-config", "--dashboard-host", "--port")):
            continue
        out.append(a.replace("$RAY_HEAD_IP:6379", f"127.0.0.1:{head_port}"))
    extra = [
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--num-cpus=1",  # agents off the stack's ports
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]
    if "--head" in out:
        extra += [
            f"--port={head_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={client_port}",
        ]
    return [str(BIN / "ray"), "start", *out, *extra, "--block"], dict(
        shlex.split(x)[0].split("=", 1) for x in shlex.split(env_part)
    )


def test_the_launchers_start_commands_form_a_token_protected_two_node_cluster(tmp_path):
    config = yaml.safe_load((ROOT / "cluster/aws/cluster.yaml").read_text())
    home = tmp_path / "home"
    home.mkdir()
    # file_mounts materialised: the token that `ray get-auth-token --generate` made on the user's machine
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no token of the local stack
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        env={**clean, "HOME": str(home)},
        check=True,
        capture_output=True,
    )
    for remote, local in config["file_mounts"].items():
        assert Path(local.replace("~", str(home))).exists() and remote.startswith("~/.ray/")
    token = (home / ".ray" / "auth_token").read_text().strip()
    head_port, dash_port, client_port = _free_port(), _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="vr-", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    base_env = {**clean, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs = []
    try:
        for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
            start = [c for c in cmds if "ray start" in c]  # `ray stop` would stop every Ray of this user: skipped here
            assert len(start) == 1 and len(cmds) == 2
            argv, env = _localise(start[0], head_port, dash_port, client_port, ray_tmp)
            env = {k: v.replace("~", str(home)) for k, v in env.items()}
            assert env["RAY_AUTH_MODE"] == "token"
            log = open(tmp_path / f"node{len(procs)}.log", "w")
            procs.append(
                subprocess.Popen(
                    argv, env={**base_env, **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
            time.sleep(8 if len(procs) == 1 else 0)
        submit_env = {**base_env, "RAY_AUTH_MODE": "token"}  # the client: the same token file, under ~/.ray
        deadline = time.time() + 90
        nodes = 0
        while time.time() < deadline and nodes < 2:
            r = subprocess.run(
                [
                    str(BIN / "ray"),
                    "job",
                    "submit",
                    "--address",
                    f"http://127.0.0.1:{dash_port}",
                    "--",
                    "python",
                    "-c",
                    "import ray; ray.init(); print('nodes', len([n for n in ray.nodes() if n['Alive']]))",
                ],
                env=submit_env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            m = re.search(r"nodes (\d+)", r.stdout)
            nodes = int(m.group(1)) if m else 0
            time.sleep(2)
        logs = "".join((tmp_path / f"node{i}.log").read_text()[-1500:] for i in range(2))
        assert r.returncode == 0 and nodes == 2, r.stdout[-2000:] + r.stderr[-2000:] + logs
        # without the token: the job API refuses
        req = urllib.request.Request(f"http://127.0.0.1:{dash_port}/api/jobs/")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code in (401, 403)
        req.add_header("Authorization", f"Bearer {token}")
        assert urllib.request.urlopen(req, timeout=10).status == 200
    finally:  # every process of this cluster, found by its own temp dir (a `ray stop` would stop the stack's too)
        for p in procs:
            p.kill()
        for p in psutil.process_iter(["cmdline"]):
            if ray_tmp in " ".join(p.info["cmdline"] or []):
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_every_socket_of_the_local_stack_listens_on_loopback_only(stack, ray_cluster):
    """`make up`'s Ray head and S3 server: every listening socket of every process they started (Ray 2.60 moves a
    head started with --node-ip-address=127.0.0.1 to the machine's address, its metrics exporter to 0.0.0.0,
    unless the single-machine setting is given, as the job-local Ray has it)."""
    spec = importlib.util.spec_from_file_location("stack_sockets", ROOT / "cluster/local/stack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ray_cluster.get(ray_cluster.remote(lambda: 1).remote())  # a worker is up too
    pids = mod._ray_pids() + [mod.processes.read_pid(mod.STATE / "weed.pid")]
    listening = set()
    for pid in filter(None, pids):
        try:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == "LISTEN":
                    listening.add((c.laddr.ip, c.laddr.port, psutil.Process(pid).name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    names = {x[2] for x in listening}
    assert {"gcs_server", "raylet", "weed"} <= names, listening
    exposed = {x for x in listening if x[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")}
    assert not exposed, f"listening beyond loopback: {exposed}"
