"""Pack images into WebDataset (or Parquet) shards with a manifest, locally or in S3.

  python jobs/make_shards.py --source digits --output s3://vitray/digits
  python jobs/make_shards.py --source s3://raw/imagenet --output s3://data/in1k --shard-size 1024
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.shards import make_shards  # noqa: E402
from pipeline.storage import StorageError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True,
                    help="class-folder tree (local path or s3:// prefix; <class>/<img> or train|val/<class>/<img>), or 'digits'")
    ap.add_argument("--output", required=True, help="s3://bucket/prefix or a local folder")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction per class (ignored when the source has train/ and val/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    ap.add_argument("--format", choices=["webdataset", "parquet"], default="webdataset")
    ap.add_argument("--workers", type=int, default=8, help="parallel reads and uploads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        m = make_shards(args.source, args.output, val_fraction=args.val_fraction, seed=args.seed,
                        shard_size=args.shard_size, fmt=args.format, workers=args.workers)
    except (StorageError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(m["_summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
