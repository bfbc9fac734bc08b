"""Exit codes of the jobs, one table for all: what a scheduler or a person can tell from the code alone.

    0   done (for batch inference also: nothing new to predict)
    1   anything unexpected (a traceback; a crashed batch-inference commit is finished by the next run)
    2   bad arguments or input, found before anything was written
    3   batch inference: more errors than --max-error-rate, nothing published
    4   batch inference: the output may hold part of a run (a commit or a recovery stopped midway); readers
        that honour `_SUCCESS` see nothing of it, and the next run finishes it or rolls it back
    75  another run holds the output's lease, nothing touched: try again later (sysexits EX_TEMPFAIL)
    143 stopped by SIGTERM (a scheduler's timeout or cancel), after unwinding like an exception

An exception says its own code with an `exit_code` attribute; a `ValueError` (bad value) counts as 2.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from collections.abc import Callable

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_ERROR_RATE, EXIT_PARTIAL, EXIT_TEMPFAIL = 0, 1, 2, 3, 4, 75


def exit_code(exc: BaseException) -> int | None:
    """The documented code for `exc`, or None for an unexpected error (let it raise)."""
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, ValueError):
        return EXIT_BAD_INPUT
    return None


def run_job(prog: str, body: Callable[[], int | None]) -> int:
    """Run a job's body; a known failure prints one line `prog: error: ...` and returns its code."""
    try:
        return body() or EXIT_OK
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"{prog}: {e}" if code == EXIT_TEMPFAIL else f"{prog}: error: {e}", file=sys.stderr)
        return code


def _stop(signum, frame):
    raise SystemExit(128 + signum)


# A job's other threads stop its main thread with this signal (a real one: it wakes a blocking wait).
INTERRUPT = signal.SIGUSR2


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def unwind_on_sigterm() -> None:
    """Make SIGTERM unwind the job like an exception (exit 143): `finally` blocks run, so a run removes what
    it staged and releases its lease; and let `interrupt_main` reach the main thread. Ray's driver installs
    its own SIGTERM handler (it dumps and dies) when it connects: call this again after `ray.init`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(INTERRUPT, _interrupted)


def in_job() -> bool:
    """Whether this process is a job's (its main called `unwind_on_sigterm`), not a library caller's."""
    return signal.getsignal(INTERRUPT) is _interrupted


def interrupt_main(unwound: threading.Event | None = None, grace_s: float = 120.0) -> None:
    """From another thread: raise KeyboardInterrupt in the main thread. In a job (`unwind_on_sigterm` was
    called) with a real signal, which also wakes a blocking wait; `_thread.interrupt_main` does nothing when
    SIGINT is ignored, as it is for a job a shell started in the background (cron, CI). In a job a main
    thread that has not set `unwound` within `grace_s` is stuck: the process ends with exit 75, so a hung
    run never holds its scheduler's slot for ever."""
    if not in_job():  # a library caller: its own main thread, its rules
        _thread.interrupt_main()
        return
    signal.pthread_kill(threading.main_thread().ident, INTERRUPT)
    if unwound is not None and not unwound.wait(grace_s):
        print(f"the main thread did not stop within {grace_s:.0f} s of being interrupted: exiting", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_TEMPFAIL)
