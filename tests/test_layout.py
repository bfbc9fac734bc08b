"""The layout's rules, checked on the source tree: who may import whom, how big a room gets, lint.

The rules (README "How it fits together"):
- no import cycle between project modules;
- `vit_model` imports nothing of the project outside itself (it must run where Ray is absent);
- the storage module imports no other project module (everything else stands on it);
- `pipeline.core` (the ground floor) imports no other room; data, training and inference import the
  ground floor and `vit_model`, training and inference may import data, never each other;
- only `jobs/` imports `jobs/`;
- no module over 450 lines, no folder of more than 10 modules (`jobs/`, `bench/`, `tests/` aside);
- no two modules share a name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vit_model", "pipeline")
MAX_LINES, MAX_MODULES = 400, 10


def _parse(path: Path) -> ast.Module:
    """`ast.parse`, again on CPython 3.11's spurious "AST constructor recursion depth mismatch" (gh-106905: the
    recursion counter is shared by the process's threads, and Ray's and the leases' threads from earlier tests
    still run here); a real syntax error is raised as usual."""
    for _ in range(4):
        try:
            return ast.parse(path.read_text())
        except SystemError:
            time.sleep(0.05)
    return ast.parse(path.read_text())


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every absolute module name a file imports, at the top or inside functions (relative ones resolved)."""
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pipeline.core import storage`
    return out


def _project_graph() -> dict[str, set[str]]:
    files = _sources(*PACKAGES)
    names = {_module_name(p) for p in files}
    return {_module_name(p): {m for m in _imports(p) if m in names and m != _module_name(p)} for p in files}


def test_the_import_graph_checker_sees_relative_and_from_imports(tmp_path, monkeypatch):
    """The checker itself: a relative import and a `from package import module` are both edges."""
    pkg = tmp_path / "pipeline" / "room"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom pipeline.core import storage\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert {"pipeline.room.b", "pipeline.core.storage"} <= _imports(pkg / "a.py")


def test_no_import_cycle():
    graph = _project_graph()
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            assert state.get(m) != 1, f"import cycle: {' -> '.join(path + [m])}"
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_rooms_import_only_downwards():
    graph = _project_graph()
    for mod, deps in graph.items():
        if mod.startswith("vit_model"):
            assert all(d.startswith("vit_model") for d in deps), f"{mod} imports {deps}: vit_model stands alone"
        room = mod.split(".")[1] if mod.startswith("pipeline.") else None
        rooms = {d.split(".")[1] for d in deps if d.startswith("pipeline.") and d.count(".") >= 1}
        if mod == "pipeline.core.storage":
            assert not {d for d in deps if d.startswith("pipeline")}, f"storage imports {deps}"
        allowed = {
            "core": {"core"},
            "data": {"core", "data"},
            "training": {"core", "data", "training"},
            "inference": {"core", "data", "inference"},
            "figures": {"core", "data", "figures"},
            "selftrain": {"core", "data", "inference", "selftrain"},
        }.get(room)
        if allowed is not None:
            assert rooms <= allowed, f"{mod} reaches into {rooms - allowed}"
    # the project's packages never import jobs/, bench/ or tests/
    for p in _sources(*PACKAGES):
        bad = {m for m in _imports(p) if m.split(".")[0] in ("jobs", "bench", "tests")}
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}"


def test_vit_model_imports_without_ray_or_the_pipeline():
    code = (
        "import sys, vit_model, vit_model.formats, vit_model.interop, vit_model.analysis; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pipeline', 'jobs', 'pyarrow')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_only_jobs_import_jobs():
    for p in _sources("pipeline", "vit_model", "bench", "cluster"):
        bad = {m for m in _imports(p) if m == "jobs" or m.startswith("jobs.")}
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}"


def test_rooms_stay_small_and_names_unique():
    files = _sources(*PACKAGES)
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    per_folder = Counter(p.parent for p in files if p.name != "__init__.py")
    crowded = {str(f.relative_to(ROOT)): n for f, n in per_folder.items() if n > MAX_MODULES}
    assert not crowded, f"folders of more than {MAX_MODULES} modules: {crowded}"
    stems = Counter(p.stem for p in files + _sources("jobs") if p.name != "__init__.py")
    assert not [s for s, n in stems.items() if n > 1], (
        f"module names used twice: {[s for s, n in stems.items() if n > 1]}"
    )


def test_every_room_says_what_it_owns():
    for init in sorted((ROOT / "pipeline").glob("*/__init__.py")):
        doc = ast.get_docstring(_parse(init)) or ""
        assert len(doc.split()) >= 30 and "import" in doc, (
            f"{init.relative_to(ROOT)}: say what the room owns and imports"
        )


def test_no_objective_branch_outside_the_objectives_room():
    """What differs between objectives lives in `pipeline/training/objectives/`: nowhere else compares a name
    of an objective or asks whether a module is MAE's."""
    names = {"supervised", "mae"}
    bad = []
    for p in _sources("pipeline", "jobs"):
        if "objectives" in p.relative_to(ROOT).parts:
            continue
        for node in ast.walk(_parse(p)):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if names & {v for v in consts if isinstance(v, str)}:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                if "MaskedAutoencoder" in ast.unparse(node):
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not bad, f"objective branches outside pipeline/training/objectives/: {bad}"


def test_one_shard_reader():
    """Shard files are read in one place (`shard_reader.read_shard`): training, evaluation, batch inference
    and the figures call it; only the writer and the reader know the tar layout."""
    tar_users = {str(p.relative_to(ROOT)) for p in _sources(*PACKAGES, "jobs") if "tarfile" in _imports(p)}
    assert tar_users == {"pipeline/data/shard_reader.py", "pipeline/data/shard_writer.py"}, tar_users
    for p in _sources(*PACKAGES, "jobs"):
        if p.name == "shard_reader.py":
            continue
        used = {n.attr for n in ast.walk(_parse(p)) if isinstance(n, ast.Attribute)}
        used |= {a.name for n in ast.walk(_parse(p)) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not used & {"_samples_of", "_tar_files"}, f"{p.relative_to(ROOT)} reads shards itself"
