"""The order of a training epoch, a pure function of (seed, epoch, shard set, workers), and a position in it.

    the split's shards, permuted by (seed, epoch)
      -> windows of `window_shards` consecutive shards; each window's samples permuted by (seed, epoch, window)
      -> the epoch sequence: positions 0 .. S-1, S = steps per epoch x global batch (the rest of the split
         sits out this epoch: a different rest every epoch)
    what is still to do (`todo`: ranges of positions; all of them when an epoch starts)
      -> cut into `world_size` equal contiguous parts: rank r reads part r in order, one Ray Data task per
         (window, range) and order preserved, decoding each sample with its own seed (seed, epoch, position)

A checkpoint stores `todo` as it is after the steps it holds (`advance`): a resume continues at the next
sample of every rank, on any number of workers, and an epoch killed and resumed any number of times reads
each of its samples once. With the same number of workers the resumed ranks read exactly what the
uninterrupted run's ranks would have read. This follows MosaicML Streaming (sample space partitioned by
rank, shuffled in blocks, resumed by samples seen) and big_vision (order a function of the seed and step),
with Ray Data kept for the reads and decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Ranges = list[list[int]]  # [[start, end), ...] of epoch positions, in order


@dataclass(frozen=True)
class Window:
    index: int  # in this epoch's sequence
    start: int  # position of its first sample
    shards: tuple[str, ...]  # uris, in the order their samples are concatenated before the permutation
    counts: tuple[int, ...]

    @property
    def size(self) -> int:
        return sum(self.counts)


def _rng(*ints: int) -> np.random.Generator:
    return np.random.default_rng([int(i) & (2**63 - 1) for i in ints])


def windows(shards: list[tuple[str, int]], seed: int, epoch: int, window_shards: int) -> list[Window]:
    """This epoch's windows: the shards (uri, samples) permuted by (seed, epoch), grouped `window_shards` at a time."""
    order = _rng(seed, epoch, 1).permutation(len(shards))
    out, start = [], 0
    for i, j in enumerate(range(0, len(order), window_shards)):
        group = [shards[k] for k in order[j : j + window_shards]]
        w = Window(i, start, tuple(u for u, _ in group), tuple(c for _, c in group))
        out.append(w)
        start += w.size
    return out


def permutation(window: Window, seed: int, epoch: int) -> np.ndarray:
    """Position `window.start + i` holds the window's concatenated sample `permutation(...)[i]`."""
    return _rng(seed, epoch, 2, window.index).permutation(window.size)


def sample_seed(seed: int, epoch: int, position: int) -> list[int]:
    """A sample's augmentation seed: the same whichever rank, task or attempt decodes it."""
    return [seed & (2**63 - 1), epoch, position, 3]


def total(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def split(todo: Ranges, world_size: int) -> list[Ranges]:
    """`todo` cut into `world_size` contiguous parts of equal length, in order (rank r takes part r)."""
    n = total(todo)
    if n % world_size:
        raise ValueError(f"{n} positions do not split evenly over {world_size} workers")
    per, parts, cur, left = n // world_size, [], [], n // world_size
    for a, b in todo:
        while a < b:
            take = min(b - a, left)
            cur.append([a, a + take])
            a, left = a + take, left - take
            if left == 0:
                parts.append(cur)
                cur, left = [], per
    return parts if per else [[] for _ in range(world_size)]


def share(count: int, world_size: int, rank: int) -> Ranges:
    """Rank `rank`'s contiguous share of positions 0 .. count-1 when the parts need not be equal (evaluation)."""
    lo, hi = count * rank // world_size, count * (rank + 1) // world_size
    return [[lo, hi]] if hi > lo else []


def skip(ranges: Ranges, n: int) -> Ranges:
    """`ranges` without their first `n` positions."""
    out = []
    for a, b in ranges:
        drop = min(n, b - a)
        n -= drop
        if a + drop < b:
            out.append([a + drop, b])
    return out


def advance(todo: Ranges, world_size: int, done_per_rank: int) -> Ranges:
    """What is still to do once every rank has read the first `done_per_rank` positions of its part."""
    return [r for part in split(todo, world_size) for r in skip(part, done_per_rank)]


def reads(ranges: Ranges, wins: list[Window]) -> list[dict]:
    """One read per (window, piece of a range inside it), in position order: the items of a rank's stream."""
    starts = [w.start for w in wins]
    out = []
    for a, b in ranges:
        while a < b:
            i = int(np.searchsorted(starts, a, side="right")) - 1
            w = wins[i]
            hi = min(b, w.start + w.size)
            out.append({"window": w.index, "start": w.start, "lo": a, "hi": hi, "shards": w.shards, "counts": w.counts})
            a = hi
    return out
