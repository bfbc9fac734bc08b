"""Helper for test_stream_memory.py, run in its own process: a fresh local Ray with a tiny object store.

    python tests/small_store_stream.py MANIFEST_URI OBJECT_STORE_BYTES
Streams two epochs of the manifest's train split and prints one JSON line: rows and unique keys per
epoch, the patch bytes that went through, and whether Ray Data reports spilling to disk.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):  # a new cluster, not the stack's
    os.environ.pop(var, None)

import ray  # noqa: E402

from pipeline.data.streams import StreamConfig, configure_ray_data, patch_stream  # noqa: E402
from pipeline.data.transforms import ImageTransform  # noqa: E402


def main():
    manifest, store = sys.argv[1], int(sys.argv[2])
    session_dir = tempfile.mkdtemp(prefix="vitray-test-ray-")  # not /tmp/ray: nothing is left behind
    ray.init(num_cpus=2, object_store_memory=store, include_dashboard=False, log_to_driver=False, _temp_dir=session_dir)
    try:
        configure_ray_data(progress=False)
        ds = patch_stream(manifest, "train", StreamConfig(ImageTransform(224, 16, train=True)))
        epochs, patch_bytes = [], 0
        for _ in range(2):
            keys = []
            for b in ds.iter_batches(batch_size=32, batch_format="numpy"):
                keys += b["key"].tolist()
                patch_bytes += b["patches"].nbytes
            epochs.append({"rows": len(keys), "unique": len(set(keys))})
        stats = ds.stats()
        print(
            json.dumps(
                {
                    "epochs": epochs,
                    "patch_bytes": patch_bytes,
                    "store_bytes": store,
                    "spilled": "Spilled to disk" in stats,
                }
            )
        )
    finally:
        ray.shutdown()
        shutil.rmtree(session_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
