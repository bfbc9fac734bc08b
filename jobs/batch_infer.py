"""Batch inference with Ray Data: predictions for images in object storage, published as Parquet.

  python jobs/batch_infer.py --model s3://bucket/runs/digits/model --input s3://bucket/incoming/ \\
      --output s3://bucket/predictions --since-last-run
Output: {output}/dt=YYYY-MM-DD/run=<run_id>/part-*.parquet, then _SUCCESS (+ _accuracy.json when labels
are known); or, with --table <namespace>.<name> --catalog ..., one Iceberg snapshot per run
(jobs/table.py shows and maintains it). pandas, pyarrow, duckdb and Spark read the prefix as a Hive-partitioned
table, and every Iceberg engine the table; see README.
Scheduled: see cluster/README.md. The job holds a lease on --output, so overlapping schedules are safe.

Exit codes: 0 published, or nothing new to predict; 2 bad arguments or input, nothing written;
3 more errors than --max-error-rate, nothing published; 4 a commit or recovery stopped midway (glob
readers may see part of a run until the next run finishes or rolls it back); 75 another run holds the
output's lease, or this run lost it, nothing of this run published (try again later); 143 stopped by
SIGTERM (a scheduler's timeout or cancel: staging removed, lease released); 1 anything else.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core.config import parse_job_args  # noqa: E402
from pipeline.core.exits import run_job  # noqa: E402
from pipeline.core.signals import unwind_on_sigterm  # noqa: E402
from pipeline.inference.infer_config import ALIASES, InferConfig  # noqa: E402


def main(argv=None) -> int:
    unwind_on_sigterm()
    cfg = parse_job_args(InferConfig, ALIASES, __doc__, argv)
    from pipeline.inference import batch, run_report

    if cfg.table:
        from pipeline.inference.iceberg import table_run

        return run_job("batch_infer", lambda: run_report.print_summary(table_run.run(cfg)))
    return run_job("batch_infer", lambda: run_report.print_summary(batch.run(cfg)))


if __name__ == "__main__":
    sys.exit(main())
