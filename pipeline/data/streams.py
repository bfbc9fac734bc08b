"""Ray Data streams: a shard set in object storage -> patchified uint8 batches.

    ordered_stream (training, evaluation): one task per (window of shards, range of positions) reads its
      shards (`shard_reader.read_shard`, sha256-checked), permutes the window (`order`) and yields the range
      -> decode_patchify: decode -> crop -> resize (+ flip) -> RandAugment -> patchify, each sample from its
         own seed (fused into the same task, order preserved)
      -> {"patches": (B, N, P*P*C) uint8, "label": (B,) int64, "valid": (B,) bool, "key": (B,) str}
    sample_stream (batch inference over shards, tests): one task per shard file, rows {key, image, label,
      format, shard}; patch_stream adds decode_patchify to it

A sample that fails to decode keeps its row with `valid=False` (its key logged on the worker), so the
training loop can count and drop it instead of losing the epoch. Nothing is materialised: memory is bounded
by Ray Data's streaming executor (object store budget, see `configure_ray_data`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

import numpy as np

from pipeline.core import storage
from pipeline.data import order
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.shard_reader import ShardIntegrityError, read_shard
from pipeline.data.transforms import Augment, ImageTransform, decode_to_patches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """A patch stream: the preprocessing spec (`ImageTransform`) and how Ray Data runs it."""

    transform: ImageTransform
    num_cpus: float = 1.0  # per read + decode task (Ray fuses them: no encoded bytes through the object store)

    def under_rules_of(self, manifest: Manifest) -> StreamConfig:
        """The decode rules a shard set was written with: its own rules, not today's defaults."""
        return dataclasses.replace(self, transform=dataclasses.replace(self.transform, rules=manifest.decode_rules()))

    @classmethod
    def for_model(cls, mcfg, train: bool, augment: Augment | None = None, **kwargs) -> StreamConfig:
        """The stream a model of ViTConfig `mcfg` expects (`ImageTransform.for_model`)."""
        return cls(ImageTransform.for_model(mcfg, train, augment), **kwargs)


def configure_ray_data(object_store_fraction: float | None = None, progress: bool | None = None) -> None:
    """Ray Data settings this project relies on; call on the driver before building datasets."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # S3-compatible stores throttle with SLOW_DOWN / 503: retry those reads instead of failing the epoch.
    for err in (
        "AWS Error SLOW_DOWN",
        "AWS Error INTERNAL_FAILURE",
        "AWS Error SERVICE_UNAVAILABLE",
        "AWS Error NETWORK_CONNECTION",
    ):
        if err not in ctx.retried_io_errors:
            ctx.retried_io_errors.append(err)
    if progress is not None:
        ctx.enable_progress_bars = progress
    if object_store_fraction:
        import ray

        total = ray.cluster_resources().get("object_store_memory", 0)
        if total:
            ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
                object_store_memory=total * object_store_fraction
            )


def decode_patchify(batch: dict, cfg: StreamConfig, seed: int | None = None, epoch: int = 0) -> dict:
    """map_batches step: rows {key, image, label, ...} -> patches. Bad samples: valid=False and a logged key.
    Rows with a `position` (the epoch's order) and a `seed` are augmented from their own seeds (seed, epoch,
    position), the same whichever task decodes them; others from fresh randomness."""
    if seed is not None and "position" in batch:
        rng = [np.random.default_rng(order.sample_seed(seed, epoch, int(p))) for p in batch["position"]]
    else:
        rng = np.random.default_rng()
    patches, valid, _ = decode_to_patches(list(batch["image"]), batch["key"], cfg.transform, rng)
    return {
        "patches": patches,
        "label": np.asarray(batch["label"], dtype=np.int64),
        "valid": valid,
        "key": np.asarray(batch["key"], dtype=object),
    }


def read_window(batch: dict, seed: int, epoch: int, digests: dict[str, str], fmt: str, rows: int = 256):
    """map_batches step on read items (`order.reads`): each item's window read (its shards checked against
    the manifest) and permuted, and its positions lo..hi yielded in order, `rows` at a time (the decode
    that follows works block by block), as {key, image, label, format, position}."""
    for spec in batch["item"]:
        r = json.loads(spec)
        samples = []
        for uri, count in zip(r["shards"], r["counts"]):
            got = read_shard(uri, digests.get(storage.parse_uri(uri).path), fmt)
            if len(got) != count:
                raise ShardIntegrityError(f"shard {uri} holds {len(got)} samples, its manifest says {count}")
            samples += got
        w = order.Window(r["window"], r["start"], tuple(r["shards"]), tuple(r["counts"]))
        perm = order.permutation(w, seed, epoch)
        for lo in range(r["lo"], r["hi"], rows):
            positions = np.arange(lo, min(lo + rows, r["hi"]), dtype=np.int64)
            picked = [samples[perm[p - w.start]] for p in positions]
            yield {
                "key": np.asarray([s[0] for s in picked], dtype=object),
                "image": np.asarray([s[1] for s in picked], dtype=object),
                "label": np.asarray([s[2] for s in picked], dtype=np.int64),
                "format": np.asarray([s[3] for s in picked], dtype=object),
                "position": positions,
            }


def ordered_stream(manifest: Manifest, split: str, cfg: StreamConfig, *, seed, epoch, ranges, window_shards: int):
    """One rank's part of an epoch (`ranges` of positions, `order.split`) as a Ray Data stream in exactly
    that order: one task per (window, range) reads and decodes, and the output keeps the items' order."""
    import ray.data
    from ray.data import DataContext

    sp = manifest.split(split)
    shards = [(u, e.count) for u, e in zip(manifest.shard_uris(split), sp.shards)]
    items = order.reads(ranges, order.windows(shards, seed, epoch, window_shards))
    if not items:
        raise ValueError(f"no positions to read in the {split!r} split for this worker")
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # this process's streams: the order is the point
    cfg = cfg.under_rules_of(manifest)
    ds = ray.data.from_items([{"item": json.dumps(i)} for i in items], override_num_blocks=len(items))
    ds = ds.map_batches(
        read_window,
        fn_kwargs={"seed": seed, "epoch": epoch, "digests": manifest.digests(split), "fmt": manifest.format},
        batch_size=None,
        batch_format="numpy",
        num_cpus=cfg.num_cpus,
    )
    return ds.map_batches(
        decode_patchify,
        fn_kwargs={"cfg": cfg, "seed": seed, "epoch": epoch},
        batch_size=None,
        batch_format="numpy",
        num_cpus=cfg.num_cpus,
    )


def read_shards(batch: dict, digests: dict[str, str], fmt: str) -> dict:
    """map_batches step: shard URIs -> one row per sample {key, image, label, format, shard} (`read_shard`)."""
    rows = [(s, uri) for uri in batch["shard"] for s in read_shard(uri, digests.get(storage.parse_uri(uri).path), fmt)]
    return {
        "key": np.asarray([s.key for s, _ in rows], dtype=object),
        "image": np.asarray([s.image for s, _ in rows], dtype=object),
        "label": np.asarray([s.label for s, _ in rows], dtype=np.int64),
        "format": np.asarray([s.format for s, _ in rows], dtype=object),
        "shard": np.asarray([u for _, u in rows], dtype=object),
    }


def sample_stream(manifest: Manifest, split: str, *, num_cpus: float = 1.0):
    """The raw split, in shard order: one row per sample {key, image, label, format, shard}, from exactly the
    shard files the manifest names, each checked against its sha256 before a sample is used. One task per
    shard, which fuses with a decode step of the same `num_cpus` that follows."""
    import ray.data

    uris = manifest.shard_uris(split)
    if not uris:
        raise ValueError(f"the {split!r} split of {manifest.base} has no shards (0 samples)")
    ds = ray.data.from_items([{"shard": u} for u in uris], override_num_blocks=len(uris))
    return ds.map_batches(
        read_shards,
        fn_kwargs={"digests": manifest.digests(split), "fmt": manifest.format},
        batch_size=None,  # one block per shard: the whole shard in one task
        batch_format="numpy",
        num_cpus=num_cpus,
    )


def patch_stream(manifest_uri: str | Manifest, split: str, cfg: StreamConfig):
    """A split (manifest URI, or one already loaded) as patches, unordered: `sample_stream` + `decode_patchify`
    under the shard set's own decode rules (decided when it was written, not today's defaults)."""
    manifest = manifest_uri if isinstance(manifest_uri, Manifest) else load_manifest(manifest_uri)
    cfg = cfg.under_rules_of(manifest)
    ds = sample_stream(manifest, split, num_cpus=cfg.num_cpus)
    return ds.map_batches(
        decode_patchify, fn_kwargs={"cfg": cfg}, batch_size=None, batch_format="numpy", num_cpus=cfg.num_cpus
    )
