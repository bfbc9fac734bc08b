"""Self-training (Noisy Student): a teacher's batch-inference predictions become the labels of a new shard
set, which a student learns from beside the labelled set. This room owns choosing those pseudo-labels:
which predictions (one model, one run), the confidence threshold and per-class budget, the checks that keep
a wrong label off the wrong bytes (changed or gone inputs, another model's classes, an image of the
labelled set) and the provenance the set records. It imports core, data and inference (the predictions'
readers); the shards are written by data, the student trained by training.
"""
