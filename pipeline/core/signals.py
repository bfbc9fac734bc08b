"""How a job stops: SIGTERM unwinds it like an exception (so its `finally` blocks clean up), and another thread
(a lost lease, a stall) can interrupt its main thread even where SIGINT is ignored (cron, CI)."""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading

from pipeline.core.exits import EXIT_TEMPFAIL


def _stop(signum, frame):
    raise SystemExit(128 + signum)


# A job's other threads stop its main thread with this signal (a real one: it wakes a blocking wait).
INTERRUPT = signal.SIGUSR2


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _deliver_swallowed(unraisable) -> None:
    """sys.unraisablehook in a job: a KeyboardInterrupt that landed where Python ignores exceptions (a weakref
    callback, a `__del__`: "Exception ignored in ...") would leave the main thread running and its interrupter
    waiting; it is delivered again, at the next point where it can unwind the run."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        main = threading.main_thread().ident  # from another thread: sent from here it would land in this hook
        threading.Timer(0.05, signal.pthread_kill, (main, INTERRUPT)).start()
        return
    sys.__unraisablehook__(unraisable)


def unwind_on_sigterm() -> None:
    """Make SIGTERM unwind the job like an exception (exit 143): `finally` blocks run, so a run removes what
    it staged and releases its lease; and let `interrupt_main` reach the main thread. Ray's driver installs
    its own SIGTERM handler (it dumps and dies) when it connects: call this again after `ray.init`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(INTERRUPT, _interrupted)
        sys.unraisablehook = _deliver_swallowed


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
