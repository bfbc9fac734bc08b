"""The jobs' exit codes come from one table (`pipeline.core.exits`)."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import exits, storage
from pipeline.core.lease import LeaseHeld
from pipeline.inference.batch import ErrorRateExceeded
from pipeline.training.trainer import JobError

ROOT = Path(__file__).resolve().parents[1]


def _raise(e):
    def body():
        raise e

    return body


def test_known_failures_map_to_their_codes_and_one_line(capsys):
    assert exits.run_job("job", lambda: None) == exits.EXIT_OK
    assert exits.run_job("job", _raise(ValueError("bad --epochs"))) == exits.EXIT_BAD_INPUT
    assert capsys.readouterr().err == "job: error: bad --epochs\n"
    assert exits.run_job("job", _raise(storage.StorageError("no bucket"))) == exits.EXIT_BAD_INPUT
    assert exits.run_job("job", _raise(JobError("no val split"))) == exits.EXIT_BAD_INPUT
    assert exits.run_job("job", _raise(ErrorRateExceeded("too many"))) == exits.EXIT_ERROR_RATE == 3
    capsys.readouterr()
    held = LeaseHeld("s3://b/out", {"run_id": "r1", "holder": "h", "expires_at": 0})
    assert exits.run_job("job", _raise(held)) == exits.EXIT_TEMPFAIL == 75
    assert "error:" not in capsys.readouterr().err  # "try again later" is not a failure


def test_an_unexpected_error_keeps_its_traceback():
    with pytest.raises(KeyError):
        exits.run_job("job", _raise(KeyError("x")))


def test_an_interrupt_swallowed_where_exceptions_are_ignored_is_delivered_again():
    """A lease's interrupt that lands in a weakref callback or a `__del__` was printed ("Exception ignored")
    and lost: the main thread ran on and the job exited 75 only after its 120 s grace, with a traceback."""
    code = (
        "import time\n"
        "from pipeline.core.signals import unwind_on_sigterm\n"
        "unwind_on_sigterm()\n"
        "class Dies:\n"
        "    def __del__(self):\n"
        "        raise KeyboardInterrupt\n"
        "try:\n"
        "    d = Dies(); del d\n"
        "    time.sleep(5)\n"
        "    print('ran on')\n"
        "except KeyboardInterrupt:\n"
        "    print('unwound')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "unwound" and "Traceback" not in r.stderr, r.stdout + r.stderr
