"""Images as data: shard sets written and read, the steps from image bytes to uint8 patches, the streams.

- `sources`: what goes into a shard set (class folders, a labels file, the digits), listed and split
  into `Sample`s; `shard_writer`: the Ray Data job that packs them into a versioned, immutable shard set;
  `manifest`: the `Manifest` record, the one reader and writer of manifest.json;
  `shard_reader`: the samples of one shard file, checked against the sha256 the manifest recorded.
- `images`: what counts as an image (`DecodeRules`: formats, size cap, minimum side, aspect) and the
  decode itself, the same for make_shards and batch inference; `shrink` for shard-time resizing.
- `transforms`: crop, flip, resize, RandAugment, patchify on CPU workers (uint8 throughout);
  `ImageTransform.for_model(model_cfg, train, Augment)` is the one preprocessing spec that training,
  evaluation, batch inference and the figures use.
- `streams`: the Ray Data streams that turn shards (or a class-folder tree) into patch batches.
This room imports `pipeline.core` and `vit_model` only; training and inference import it.
"""
