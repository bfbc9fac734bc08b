"""What a killed process leaves on local disk, and how the next one removes it: temporary folders named with
their owner's pid (removed once the owner is gone, never a live one's), and the `_tmp/` files of a killed
local writer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.core import storage


def owned_temp_dir(prefix: str) -> str:
    """A new temporary folder `{tmp}/{prefix}{pid}-XXXX`: the pid tells a later process whether its owner is
    gone (`remove_dead_owners`). The caller removes it when done; SIGKILL leaves it to the next job."""
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def remove_dead_owners(prefix: str) -> list[str]:
    """Remove `{tmp}/{prefix}<pid>-*` folders whose process is gone (never a live one's). Returns them."""
    removed = []
    for d in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            os.kill(int(d.name[len(prefix) :].split("-", 1)[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
        except (ValueError, PermissionError):  # not one of ours, or another user's live process
            continue
    return removed


def remove_local_tmp(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Remove what killed local writers left in `folder/_tmp/` (and, `recursive`, in every `_tmp/` below
    `folder`: the bookkeeping folders' own); returns how many files went."""
    loc = storage.parse_uri(folder)
    if loc.scheme != "file" or not Path(loc.path).is_dir():
        return 0
    if recursive:
        tmps = [Path(d) / storage.LOCAL_TMP for d, subdirs, _ in os.walk(loc.path) if storage.LOCAL_TMP in subdirs]
    else:
        tmps = [Path(loc.path) / storage.LOCAL_TMP]
    n = 0
    for tmp in tmps:
        if tmp.is_dir() and not tmp.is_symlink():
            n += sum(len(files) for _, _, files in os.walk(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
    return n
