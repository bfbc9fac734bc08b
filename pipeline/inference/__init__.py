"""Batch inference: images in storage -> predictions published as Parquet runs.

- `infer_config`: the job's one schema; `preflight`: what is checked and read before anything is written
  (the `LoadedModel`); `batch`: the Ray Data job from images in storage to Parquet (`Staged` files);
  `inputs`: what it reads (listing, GETs, shard rows, preprocessing); `rows`: the one column list of a
  prediction row (listing, pass-through, output and ledger schemas); `predictor`: the model side (one
  replica's forward pass); `run_report`: stage timings, staged rows/errors/accuracy, the summary printed.
- `publish`: staging, the commit `Intent` (a record) and the publish, so readers see committed runs only;
  `outputs`: what lies where under `--output`, and the readers of committed runs; `ledger`: per model, the
  latest result of each input (`--since-last-run`). One writer per output: `pipeline.core.lease`.
- `iceberg/`: the other output, an Iceberg table (`--table`): catalog, snapshots and the validated commit,
  the job, maintenance.
This room imports `pipeline.core`, `pipeline.data` and `vit_model`; never `pipeline.training`.
"""
