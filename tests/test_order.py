"""The exact epoch order (pipeline/data/order.py): every position maps to one sample, ranks get equal
contiguous parts, and an epoch stopped and resumed any number of times, on any number of workers, reads
each sample once. Pure functions: no Ray, no storage."""

import random

import pytest

from pipeline.data import order

SHARDS = [(f"s3://b/set/train/shard-{i:05d}.tar", n) for i, n in enumerate([256, 256, 256, 256, 256, 256, 58])]


def _sample_at(wins, seed, epoch):
    """position -> (shard uri, index in shard), as the read task resolves it."""
    out = {}
    for w in wins:
        members = [(u, j) for u, c in zip(w.shards, w.counts) for j in range(c)]
        for i, k in enumerate(order.permutation(w, seed, epoch)):
            out[w.start + i] = members[k]
    return out


def test_an_epoch_is_a_permutation_of_the_split_and_differs_by_epoch_and_seed():
    total = sum(n for _, n in SHARDS)
    orders = {}
    for seed, epoch in [(0, 0), (0, 1), (1, 0)]:
        wins = order.windows(SHARDS, seed, epoch, window_shards=3)
        at = _sample_at(wins, seed, epoch)
        assert sorted(at) == list(range(total))  # every position once
        assert len(set(at.values())) == total  # every sample once
        orders[seed, epoch] = [at[p] for p in range(total)]
        assert _sample_at(order.windows(SHARDS, seed, epoch, 3), seed, epoch) == at  # a pure function
    assert orders[0, 0] != orders[0, 1] and orders[0, 0] != orders[1, 0]
    # within a window the samples of its shards are mixed, not read shard after shard
    first = orders[0, 0][:256]
    assert len({u for u, _ in first}) > 1


def test_parts_are_equal_contiguous_and_in_order():
    todo = [[0, 100], [150, 170], [200, 260]]
    for world in (1, 2, 3, 4, 6):
        parts = order.split(todo, world)
        assert len(parts) == world and {order.total(p) for p in parts} == {180 // world}
        flat = [x for p in parts for a, b in p for x in range(a, b)]
        assert flat == [x for a, b in todo for x in range(a, b)]
    with pytest.raises(ValueError, match="do not split evenly over 7"):
        order.split(todo, 7)


@pytest.mark.parametrize("worlds", [(2, 2, 2), (2, 4, 1), (4, 2, 2, 1)])
def test_an_epoch_killed_and_resumed_reads_every_position_once(worlds):
    """Each attempt reads some steps' worth on every rank, then dies right after a checkpoint; the next
    attempt (maybe on another number of workers) continues from the checkpoint's `todo`."""
    rng = random.Random(sum(worlds))
    batch, steps = 8, 40
    todo, read, step = [[0, steps * batch]], [], 0
    for i, world in enumerate(worlds):
        last = i == len(worlds) - 1
        n = steps - step if last else rng.randint(1, (steps - step) // 2)
        per_rank = batch // world
        for part in order.split(todo, world):
            read += [x for a, b in order.skip(part, 0) for x in range(a, b)][: n * per_rank]
        todo, step = order.advance(todo, world, n * per_rank), step + n
    assert sorted(read) == list(range(steps * batch)) and todo == []


def test_same_workers_resume_reads_what_the_uninterrupted_run_reads():
    todo, world, per_rank = [[0, 64]], 2, 4
    whole = [[x for a, b in p for x in range(a, b)] for p in order.split(todo, world)]
    after = order.advance(todo, world, 3 * per_rank)  # killed after 3 steps
    resumed = [[x for a, b in p for x in range(a, b)] for p in order.split(after, world)]
    assert [w[3 * per_rank :] for w in whole] == resumed


def test_reads_cut_ranges_at_window_edges():
    wins = order.windows(SHARDS, 0, 0, window_shards=2)
    ranges = [[100, 700], [900, 1000]]
    items = order.reads(ranges, wins)
    assert [x for i in items for x in range(i["lo"], i["hi"])] == [x for a, b in ranges for x in range(a, b)]
    for i in items:  # each item lies inside its window
        w = wins[i["window"]]
        assert w.start <= i["lo"] < i["hi"] <= w.start + w.size and i["shards"] == w.shards


def test_a_resume_with_another_batch_size_is_refused_by_name():
    from types import SimpleNamespace

    from pipeline.training.step import TrainState, epoch_todo

    def run(batch, world):
        cfg = SimpleNamespace(train=SimpleNamespace(batch_size=batch))
        session = SimpleNamespace(world_size=world)
        return SimpleNamespace(cfg=cfg, steps_per_epoch=50, session=session, per_rank=batch // world)

    saved = TrainState(step=20, step_in_epoch=20, todo=order.advance([[0, 50 * 32]], 2, 20 * 16))
    assert order.total(epoch_todo(run(32, 4), saved)) == 30 * 32  # other workers: the same rest
    with pytest.raises(ValueError, match="train.batch_size 64"):
        epoch_todo(run(64, 2), saved)
    assert epoch_todo(run(32, 2), TrainState()) == [[0, 50 * 32]]
