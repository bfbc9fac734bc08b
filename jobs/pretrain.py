"""Pretrain a ViT with Ray Train, data-parallel across the GPUs (or CPUs) of a Ray cluster.

  ray job submit --working-dir . -- python jobs/pretrain.py --config configs/vit_b16_in1k.yaml \\
      --data s3://bucket/shards/manifest.json --output s3://bucket/runs --name b16-in1k
Re-submitting with the same --output and --name resumes from the latest checkpoint.
The cluster comes from RAY_ADDRESS (none: a local Ray); storage from the standard AWS variables.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core.config import parse_job_args  # noqa: E402
from pipeline.core.exits import run_job  # noqa: E402
from pipeline.training.train_config import ALIASES, PretrainConfig  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(PretrainConfig, ALIASES, __doc__, argv)
    from pipeline.training import trainer

    return run_job("pretrain", lambda: trainer.print_summary(trainer.run(cfg)))


if __name__ == "__main__":
    sys.exit(main())
