"""Process and socket helpers of the local stack: find a tool, tell a live process from a gone one, stop a
set of them (TERM, then KILL), and remove what stopped Ray processes leave in the temp folder."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        sys.exit(f"stack: `{name}` not found next to {sys.executable} or on PATH: run `make setup` first")
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def stop(pids: list[int], what: str) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if pids:
        print(f"{what}: stopped {len(pids)} process(es)")


def remove_dead_pymp(since: float) -> None:
    """Python's multiprocessing folders (`pymp-*`, a listener socket inside) that Ray's processes made and,
    being stopped, never removed: only those made since the head started whose sockets nobody answers."""
    for d in Path(tempfile.gettempdir()).glob("pymp-*"):
        try:
            if d.stat().st_mtime < since or not d.is_dir():
                continue
            entries = list(d.iterdir())
            if any(not e.is_socket() or socket_answers(e) for e in entries):
                continue
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False
