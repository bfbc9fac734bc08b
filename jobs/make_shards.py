"""Pack images into an immutable version of WebDataset (or Parquet) shards with a manifest, as a Ray Data job.

  python jobs/make_shards.py --source digits --output s3://vitray/digits
  python jobs/make_shards.py --source s3://raw/imagenet/train --output s3://data/in1k --shard-size 1024
  python jobs/make_shards.py --source s3://raw/photos --labels s3://raw/labels.csv --output s3://data/photos

Runs on the Ray cluster at RAY_ADDRESS (`ray job submit -- python jobs/make_shards.py ...`), or on a
private local Ray. Each run writes `versions/<version>/` and then points `<output>/manifest.json` at it;
jobs holding an older manifest keep reading their version. Exit codes: 0 done, 2 bad arguments or input
(a source with nothing usable, or a split left empty, is bad input: nothing is published).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core.exits import run_job  # noqa: E402
from pipeline.data import images  # noqa: E402
from pipeline.data.shard_writer import make_shards  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--source",
        required=True,
        help="local folder or s3:// prefix of class folders (<class>/<img>, or train|val/<class>/<img>), "
        "a flat prefix with --labels, a flat prefix without labels (an unlabeled set), or 'digits' (the "
        "embedded data set)",
    )
    ap.add_argument(
        "--unlabeled",
        action="store_true",
        help="every image under --source is an unlabeled sample, whatever its folders (default for a flat prefix)",
    )
    ap.add_argument("--labels", help='CSV (path,label) or JSON lines ({"path", "label"}); paths relative to --source')
    ap.add_argument("--output", required=True, help="s3://bucket/prefix or a local folder")
    ap.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="held-out fraction per class (ignored when the source has train/ and val/)",
    )
    ap.add_argument("--seed", type=int, default=0, help="fixes the split and the shard of every sample")
    ap.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    ap.add_argument("--format", choices=["webdataset", "parquet"], default="webdataset")
    ap.add_argument(
        "--min-size",
        type=int,
        default=images.DEFAULT_MIN_SIDE,
        help="shorter side in px an image must have (default 16: MNIST's 28 px and every standard set pass)",
    )
    ap.add_argument(
        "--max-aspect",
        type=float,
        default=images.DEFAULT_MAX_ASPECT,
        help="longer side at most this many times the shorter (default 20)",
    )
    ap.add_argument(
        "--max-object-mb",
        type=float,
        default=images.DEFAULT_MAX_OBJECT_MB,
        help="larger objects are skipped by their listed size, never read (default 64; a task holds --reads x this)",
    )
    ap.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="store each image with its longer side at most N px (aspect kept, antialiased; JPEG re-encoded at "
        f"quality {images.JPEG_QUALITY}, others as lossless PNG); default: as they came",
    )
    ap.add_argument("--reads", type=int, default=8, help="concurrent reads within one shard task")
    ap.add_argument(
        "--keep-versions",
        type=int,
        default=None,
        help="after writing, keep only the newest N versions (default: keep all; jobs may still read old ones)",
    )
    ap.add_argument("--local", action="store_true", help="no Ray: write the shards one after another in this process")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        if not args.local:
            from pipeline.core.ray_runtime import connect

            connect(log_to_driver=False)
        written = make_shards(
            args.source,
            args.output,
            labels=args.labels,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_size=args.shard_size,
            fmt=args.format,
            rules=images.DecodeRules(args.min_size, args.max_aspect, args.max_object_mb),
            unlabeled=args.unlabeled,
            max_side=args.max_side,
            reads=args.reads,
            executor="local" if args.local else "ray",
            keep_versions=args.keep_versions,
        )
        print(written.summary)

    return run_job("make_shards", body)


if __name__ == "__main__":
    sys.exit(main())
