"""Pretraining: the driver that builds the TorchTrainer, and the loop every worker runs.

- `train_config`: the job's one schema (`configs/*.yaml` are instances); `trainer`: the driver.
- `loop`: the per-worker loop (resume, epochs, reports, the monitor, exports), a plain function that runs
  under Ray Train or in-process; `step`: one optimizer step and what it carries (state, progress, EMA,
  schedule); `sessions`: where batches come from (each worker's own Ray Data streams) and where reports and
  checkpoints go (Ray Train or local).
- `objectives/`: what differs between objectives (supervised, MAE), behind one interface.
- `checkpoints`: safetensors + JSON checkpoints, verified on resume; `mixing`: Mixup, CutMix and random
  erasing on the device, on the patches the model takes; `knn`: the k-NN monitor of an encoder's features.
This room imports `pipeline.core`, `pipeline.data` and `vit_model`; never `pipeline.inference`.
"""
