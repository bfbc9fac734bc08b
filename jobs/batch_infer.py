"""Batch inference with Ray Data: predictions for images in object storage, published as Parquet.

  python jobs/batch_infer.py --model s3://bucket/runs/digits/model --input s3://bucket/incoming/ \\
      --output s3://bucket/predictions --since-last-run
Output: {output}/dt=YYYY-MM-DD/run=<run_id>/part-*.parquet + _SUCCESS (+ accuracy.json when labels
are known). Read only published runs: `pipeline.inference.read_published(output)`.
Scheduled: see cluster/README.md (RayCronJob, or cron + `ray job submit`); --since-last-run makes
re-runs and crashed runs safe.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import parse_job_args  # noqa: E402
from pipeline.inference import ALIASES, InferConfig  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(InferConfig, ALIASES, __doc__, argv)
    from pipeline import inference, storage

    try:
        result = inference.run(cfg)
    except (storage.StorageError, ValueError) as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 2
    inference.print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
