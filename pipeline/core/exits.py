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
How SIGTERM becomes 143 and how a thread stops the main one: `signals`.
"""

from __future__ import annotations

import sys
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
