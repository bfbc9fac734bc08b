"""Pretraining: the driver that builds the streams and the TorchTrainer, and the loop every worker runs.

- `train_config`: the job's one schema (`configs/*.yaml` are instances); `trainer`: the driver.
- `loop`: the per-worker loop (resume, epochs, reports, evaluation, exports), a plain function that runs
  under Ray Train or in-process; `step`: one optimizer step and what it carries (state, EMA, schedule);
  `sessions`: where batches come from and where reports and checkpoints go (Ray Train or local).
- `checkpoints`: safetensors + JSON checkpoints, verified on resume; `mixing`: Mixup, CutMix and
  random erasing on the device, on the patches the model takes; `selfsup`: MAE pretraining's part of the
  loop (per-rank masks, the k-NN monitor).
This room imports `pipeline.core`, `pipeline.data` and `vit_model`; never `pipeline.inference`.
"""
