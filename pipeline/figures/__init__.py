"""What is drawn from a trained model: the paper's figures and MAE's reconstructions, as PNGs.

- `plots`: learned position-embedding similarity (does it recover the patch grid), mean attention distance
  per head and layer, the first layer's filters, attention maps, the training curves from the run's
  `metrics/` and an MAE's reconstructions; arrays from `vit_model.analysis`, drawn with matplotlib (headless),
  written to a folder or an S3 prefix. `jobs/visualize.py` is its entry point.
This room imports `pipeline.core`, `pipeline.data` (the shard reader, the eval transform) and `vit_model`;
never `pipeline.training` or `pipeline.inference`.
"""
