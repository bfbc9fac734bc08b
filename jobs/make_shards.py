"""Pack images into an immutable version of WebDataset (or Parquet) shards with a manifest, as a Ray Data job.

  python jobs/make_shards.py --source digits --output s3://vitray/digits
  python jobs/make_shards.py --source s3://raw/imagenet/train --output s3://data/in1k --shard-size 1024
  python jobs/make_shards.py --source s3://raw/photos --labels s3://raw/labels.csv --output s3://data/photos
  python jobs/make_shards.py --source s3://raw/unlabeled --labels-from s3://preds/teacher \
      --labelled s3://data/photos/manifest.json --min-confidence 0.6 --per-class-max 500 --output s3://data/pseudo

Runs on the Ray cluster at RAY_ADDRESS (`ray job submit -- python jobs/make_shards.py ...`), or on a
private local Ray. Each run writes `versions/<version>/` and then points `<output>/manifest.json` at it;
jobs holding an older manifest keep reading their version. Exit codes: 0 done, 2 bad arguments or input
(a source with nothing usable, or a split left empty, is bad input: nothing is published).
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.core.config import parse_job_args  # noqa: E402
from pipeline.core.exits import run_job  # noqa: E402
from pipeline.data.shard_writer import make_shards  # noqa: E402
from pipeline.data.shards_config import SHARDS_ALIASES, ShardsConfig  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_job_args(ShardsConfig, SHARDS_ALIASES, __doc__, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def body() -> None:
        for name in ("source", "output"):
            if not getattr(cfg, name):
                raise ValueError(f"--{name} is required")
        if not cfg.local:
            from pipeline.core.ray_runtime import connect

            connect(log_to_driver=False)
        pseudo = _pseudo_labels(cfg) if cfg.labels_from else None
        written = make_shards(
            cfg.source,
            cfg.output,
            labels=pseudo[0] if pseudo else cfg.labels,
            provenance=pseudo[1].provenance if pseudo else None,
            label_skips={x["path"]: x["reason"] for x in pseudo[1].skipped} if pseudo else None,
            val_fraction=0.0 if pseudo else cfg.val_fraction,  # the student is judged on the labelled val
            seed=cfg.seed,
            shard_size=cfg.shard_size,
            fmt=cfg.format,
            rules=cfg.rules,
            unlabeled=cfg.unlabeled,
            max_side=cfg.max_side,
            reads=cfg.reads,
            executor="local" if cfg.local else "ray",
            keep_versions=cfg.keep_versions,
            prune_in_use=cfg.prune_in_use,
        )
        print(written.summary)

    return run_job("make_shards", body)


def _pseudo_labels(cfg: ShardsConfig):
    """(a labels file of the chosen pseudo-labels, the selection), kept beside the new set's versions."""
    from pipeline.core import storage
    from pipeline.data.manifest import load_manifest
    from pipeline.selftrain import pseudo

    chosen = pseudo.select(
        cfg.labels_from,
        cfg.source,
        labelled=load_manifest(cfg.labelled),
        min_confidence=cfg.min_confidence,
        per_class_max=cfg.per_class_max,
        model_sha256=cfg.teacher_sha256,
        run_id=cfg.teacher_run,
    )
    print(chosen.summary(), flush=True)
    uri = storage.parse_uri(cfg.output).join("_pseudo", f"labels-{chosen.provenance['model_sha256'][:16]}.jsonl").uri
    storage.write_bytes(uri, pseudo.labels_jsonl(chosen))
    return uri, chosen


if __name__ == "__main__":
    sys.exit(main())
