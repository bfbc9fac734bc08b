"""Ray Data streams: shards (or a class-folder tree) in object storage -> patchified uint8 batches.

    read (one task per shard, file order shuffled per epoch)
      -> ImageTransform: decode -> crop -> resize (+ flip) -> RandAugment -> patchify   (map_batches, CPU tasks)
      -> {"patches": (B, N, P*P*C) uint8, "label": (B,) int64, "valid": (B,) bool}

A sample that fails to decode keeps its row with `valid=False` (its key logged on the worker),
so the training loop can count and drop it instead of losing the epoch. Nothing is materialised:
memory is bounded by Ray Data's streaming executor (object store budget, see `configure_ray_data`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from pipeline.core import storage
from pipeline.data import order
from pipeline.data.manifest import Manifest, load_manifest
from pipeline.data.shard_reader import ShardIntegrityError, read_shard, unpack_shards
from pipeline.data.transforms import Augment, ImageTransform, decode_to_patches

log = logging.getLogger(__name__)
_IMAGE_COLUMNS = ("image", "img", "bytes")


@dataclass(frozen=True)
class StreamConfig:
    """A patch stream: the preprocessing spec (`ImageTransform`) and how Ray Data runs it."""

    transform: ImageTransform
    # Rows per decode task (not the training batch). None: a task decodes the block its read produced,
    # and Ray fuses read + decode into one task (no encoded bytes through the object store; measured
    # 1.3-1.5x the stream rate of a separate decode stage here). A number re-batches the encoded rows
    # first, for shards too large for one task's memory.
    batch_size: int | None = None
    num_cpus: float = 1.0  # per decode task

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


def image_column(batch: dict) -> list:
    """The encoded image of each row, whatever extension column it came in (jpg, png, gif, ...)."""
    n = len(batch["label"])
    out = [None] * n
    for col in _IMAGE_COLUMNS:
        if col in batch:
            values = batch[col]
            for i in range(n):
                # missing members come back as None or NaN depending on the block's schema
                if out[i] is None and isinstance(values[i], (bytes, bytearray, np.bytes_)):
                    out[i] = values[i]
    return out


def labels_of(batch: dict) -> np.ndarray:
    raw = batch["label"] if "label" in batch else batch["cls"]
    return np.array([int(v.decode() if isinstance(v, (bytes, bytearray)) else v) for v in raw], dtype=np.int64)


def decode_patchify(batch: dict, cfg: StreamConfig, seed: int | None = None, epoch: int = 0) -> dict:
    """map_batches step: encoded images -> patches. Bad samples: valid=False and a logged key. Rows with a
    `position` (the exact order) and a `seed` are augmented from their own seeds (seed, epoch, position),
    the same whichever task decodes them; others from fresh randomness."""
    transform = cfg.transform
    if seed is not None and "position" in batch:
        rng = [np.random.default_rng(order.sample_seed(seed, epoch, int(p))) for p in batch["position"]]
    else:
        rng = np.random.default_rng()  # fresh crops every epoch; the seed fixes the file order
    if "label" not in batch:
        batch["label"] = batch["cls"]
    keys = batch.get("__key__", batch.get("key"))
    patches, valid, _ = decode_to_patches(image_column(batch), keys, transform, rng)
    return {
        "patches": patches,
        "label": labels_of(batch),
        "valid": valid,
        "key": np.asarray(keys if keys is not None else [""] * len(valid), dtype=object),
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


def shuffled_batches(source, batch_size: int, size: int, initial: int, rng: np.random.Generator, drop_last: bool):
    """Batches of `batch_size` rows drawn at random from a buffer that fills as the stream arrives
    (webdataset's `shuffle(size, initial)`): the first batch leaves once `initial` rows are in (not a
    full buffer, which would hold every epoch's first step until `size` rows were decoded), and the
    buffer then grows by half of what arrives until it holds `size` rows. `source` yields dicts of
    equal-length arrays; memory is the buffer, allocated once."""
    buf, n, seen = None, 0, 0

    def take(k: int) -> dict:
        nonlocal n
        idx = rng.choice(n, k, replace=False)
        out = {c: a[idx] for c, a in buf.items()}  # fancy indexing copies
        tail = np.setdiff1d(np.arange(n - k, n), idx)  # rows at the end still in the buffer ...
        holes = idx[idx < n - k]  # ... move into the slots just taken
        for a in buf.values():
            a[holes] = a[tail]
        n -= k
        return out

    for batch in source:
        rows = len(next(iter(batch.values())))
        if buf is None:
            cap = max(size, initial) + 2 * max(batch_size, rows)
            buf = {c: np.empty((cap, *np.shape(v)[1:]), dtype=np.asarray(v).dtype) for c, v in batch.items()}
        if n + rows > len(buf[next(iter(buf))]):  # a source batch larger than the last one: grow once
            buf = {c: np.concatenate([a[:n], np.empty((n + rows, *a.shape[1:]), a.dtype)]) for c, a in buf.items()}
        for c, v in batch.items():
            buf[c][n : n + rows] = v
        n, seen = n + rows, seen + rows
        want = min(size, max(initial, seen // 2))
        while n - batch_size >= want:
            yield take(batch_size)
    while n >= batch_size:
        yield take(batch_size)
    if n and not drop_last:
        yield take(n)


def _paths(uris: list[str]) -> tuple[list[str], object]:
    fs, _ = storage.resolve(uris[0])
    return [storage.parse_uri(u).path for u in uris], fs


def read_encoded(manifest: Manifest, split: str, *, shuffle_seed: int | None = None, num_cpus: float = 1.0):
    """The raw split: one row per sample {key, image, label, format, __url__}, from exactly the shard
    files the manifest names, each checked against its sha256 before a sample is used.

    One read task per shard file, which fuses with the unpacking and with a decode step of the same
    `num_cpus` (no encoded bytes through the object store).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    uris = manifest.shard_uris(split)
    if not uris:
        raise ValueError(f"the {split!r} split of {manifest.base} has no shards (0 samples)")
    paths, fs = _paths(uris)
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    ds = ray.data.read_datasource(
        _shard_files()(paths, filesystem=fs, include_paths=True, shuffle=shuffle),
        override_num_blocks=len(paths),
        num_cpus=num_cpus,
    )
    return ds.map_batches(
        unpack_shards,
        fn_kwargs={"digests": manifest.digests(split), "fmt": manifest.format},
        batch_size=None,
        batch_format="numpy",
        num_cpus=num_cpus,
    )


@functools.cache
def _shard_files():
    """Ray Data source of whole shard files as rows {bytes, path}: `read_binary_files` with one GET of
    the known size per file (pyarrow's random-access file) instead of a buffered stream, which cost
    3x the CPU per byte from S3 (measured: 19 against 6 ms per 6 MB shard)."""
    from ray.data.datasource import FileBasedDatasource

    class ShardFiles(FileBasedDatasource):
        def _open_input_source(self, filesystem, path, **open_args):
            return filesystem.open_input_file(path)

        def _read_stream(self, f, path):
            import pyarrow as pa

            yield pa.table({"bytes": pa.array([f.readall()], pa.binary())})

        def _rows_per_file(self):
            return 1

    return ShardFiles


def read_class_tree(uri: str, classes: list[str] | None = None):
    """A plain `<class>/<image>` tree (local or S3) as rows {image, label, key}; labels from folder names."""
    import ray.data

    loc = storage.parse_uri(uri)
    names = classes or sorted({os.path.basename(os.path.dirname(f.path)) for f in storage.list_files(loc.uri)})
    index = {c: i for i, c in enumerate(names)}
    fs, path = storage.resolve(loc.uri)

    def label(batch):
        batch["label"] = np.array(
            [index.get(os.path.basename(os.path.dirname(p)), -1) for p in batch["path"]], np.int64
        )
        batch["key"] = batch["path"]
        batch["image"] = batch.pop("bytes")
        return batch

    return ray.data.read_binary_files(path, filesystem=fs, include_paths=True).map_batches(
        label, batch_format="numpy"
    ), names


def patch_stream(ds, cfg: StreamConfig):
    """Attach decode -> augment -> patchify to a dataset of encoded rows."""
    # Stateless CPU tasks (not actors): Ray Data scales them to the free CPU slots.
    return ds.map_batches(
        decode_patchify, fn_kwargs={"cfg": cfg}, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.num_cpus
    )


def split_stream(manifest_uri: str | Manifest, split: str, cfg: StreamConfig, *, shuffle_seed: int | None = None):
    """Manifest (URI, or one already loaded: a run keeps the version it started on) -> (patch dataset,
    manifest). The one entry point training and evaluation use."""
    manifest = manifest_uri if isinstance(manifest_uri, Manifest) else load_manifest(manifest_uri)
    # the set was decided when it was written: its own rules, not today's defaults
    cfg = cfg.under_rules_of(manifest)
    return patch_stream(read_encoded(manifest, split, shuffle_seed=shuffle_seed, num_cpus=cfg.num_cpus), cfg), manifest
