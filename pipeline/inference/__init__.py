"""Batch inference and what is drawn from a trained model.

- `infer_config`: the job's one schema; `batch`: the Ray Data job from images in storage to Parquet
  (typed `LoadedModel` and `Staged` records between its steps); `inputs`: what it reads (listing, GETs,
  shard rows); `predictor`: the model side (output schema, preprocessing, one replica's forward pass);
  `run_report`: stage timings, staged rows/errors/accuracy, the summary printed at the end.
- `publish`: staging, the commit `Intent` (a record) and the publish, so readers see committed runs only;
  `lease`: one writer per output prefix, renewed while the run lives.
- `figures`: PNG figures of a trained model (position-embedding similarity, attention distance,
  first-layer filters) from `vit_model.analysis`.
This room imports `pipeline.core`, `pipeline.data` and `vit_model`; never `pipeline.training`.
"""
