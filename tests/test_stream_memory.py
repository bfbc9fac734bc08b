"""The patch stream never materialises the data set: more patch bytes than the whole object store flow through."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import shard_writer

HERE = Path(__file__).resolve().parent


def test_stream_larger_than_the_object_store(stack, bucket, tmp_path):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    n = 600
    for i in range(n):  # 256 px JPEGs of smooth blocks: small files, 150 KB of patches each at 224 px
        path = tmp_path / "tree" / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.kron(np.roll(blocks, i, axis=0), np.ones((16, 16, 1), np.uint8))).save(path, quality=80)
    shard_writer.make_shards(
        str(tmp_path / "tree"), f"{bucket}/big", val_fraction=0.0, shard_size=50, progress=False, executor="local"
    )
    store = 80 * 2**20  # Ray's minimum is 75 MiB
    proc = subprocess.run(
        [sys.executable, str(HERE / "small_store_stream.py"), f"{bucket}/big", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epochs"] == [{"rows": n, "unique": n}] * 2
    assert result["patch_bytes"] > 2 * store  # 2 x 600 x 196 x 768 bytes through an 80 MiB store
    assert not result["spilled"]  # streamed under Ray Data's budget, not parked on disk
