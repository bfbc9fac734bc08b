"""The local stack (`cluster/local/stack.py`, a script rather than a package) for benchmarks that need S3 + Ray.

Loaded from its file, so no benchmark edits `sys.path`; `env()` puts its AWS_* and RAY_* variables in
the environment (before `ray` is imported: its auth mode is read at import) and returns them.
"""

import importlib.util
import os
from pathlib import Path

STACK_SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "local" / "stack.py"


def module():
    spec = importlib.util.spec_from_file_location("vitray_local_stack", STACK_SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def env() -> dict[str, str]:
    variables = module().env_vars()
    os.environ.update(variables)
    return variables
