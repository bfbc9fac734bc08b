"""Everything between object storage and the model, in four rooms (see README "How it fits together").

    core/       the ground floor: storage, which Ray, config loading, exit codes, run folders, exported models
    data/       shard sets (written and read), the image steps from bytes to patches, the Ray Data streams
    training/   the pretraining driver, its config schema, the per-worker loop, sessions, checkpoints, mixing
    inference/  batch inference: its config schema, the predictor, publishing, the output lease; figures

A room imports `vit_model`, `core` and the rooms below it: data stands on core; training and inference
stand on data and core and never import each other. `jobs/` are the entry points that call them.
"""
