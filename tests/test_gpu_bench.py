"""bench/gpu.py, the one script for a GPU machine, practised here in its smoke mode (tiny sizes, CPU):
every part runs and the JSON it writes has the numbers the closing note will quote."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_every_part_in_smoke_mode(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as on the GPU machine, where nothing is installed
    r = subprocess.run(
        [sys.executable, "bench/gpu.py", "--device", "cpu", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["torch"] and report["command"].startswith("gpu.py")
    for part in report["train"] + report["infer"]:
        assert "error" not in part and part["img_s"] > 0, part
    assert {p["compiled"] for p in report["train"]} == {False}  # compile is for the GPU run
    assert report["attn"]["backends"]["math"]["ms"] > 0 and "default" in report["attn"]["backends"]
    assert report["data"]["cpu_img_s_per_core"] > 0
    assert report["mae"] is None and "bench/mae.py" in report["mae_note"]
