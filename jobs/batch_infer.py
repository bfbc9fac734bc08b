"""Batch inference with Ray Data: predictions for images in object storage, published as Parquet.

  python jobs/batch_infer.py --model s3://bucket/runs/digits/model --input s3://bucket/incoming/ \\
      --output s3://bucket/predictions --since-last-run
Output: {output}/dt=YYYY-MM-DD/run=<run_id>/part-*.parquet, then _SUCCESS (+ _accuracy.json when labels
are known). pandas, pyarrow, duckdb and Spark read the output as a Hive-partitioned table; see README.
Scheduled: see cluster/README.md. The job holds a lease on --output, so overlapping schedules are safe.

Exit codes: 0 published, or nothing new to predict; 2 bad arguments or input, nothing written;
3 more errors than --max-error-rate, nothing published; 75 another run holds the output's lease,
nothing touched (try again later); 1 anything else (a crashed commit is finished by the next run).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import parse_job_args  # noqa: E402
from pipeline.inference import ALIASES, InferConfig  # noqa: E402

EXIT_ERROR_RATE = 3


def main(argv=None) -> int:
    cfg = parse_job_args(InferConfig, ALIASES, __doc__, argv)
    from pipeline import inference, lease, storage

    try:
        result = inference.run(cfg)
    except lease.LeaseHeld as e:
        print(f"batch_infer: {e}", file=sys.stderr)
        return lease.EXIT_LEASE_HELD
    except inference.ErrorRateExceeded as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return EXIT_ERROR_RATE
    except (storage.StorageError, ValueError) as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 2
    inference.print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
