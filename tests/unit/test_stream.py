"""The global-batch data order (data/stream.py), on index entries alone: no model, no shard is read."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from flux2_lora.data.cache import CacheIndex, ShardInfo
from flux2_lora.data.stream import GlobalBatches, RankBatchSampler, Slot


def _index(buckets: dict[tuple[int, int], int], shard_size: int = 5) -> CacheIndex:
    """A cache index of sum(buckets) samples (offsets made up: nothing is read)."""
    samples = [(f"s{i:03d}", w, h) for i, (w, h) in enumerate(b for b, n in buckets.items() for _ in range(n))]
    shards = [
        ShardInfo(f"train-{j:06d}.tar", samples[k : k + shard_size], [(512 * (i + 1), 100) for i in range(shard_size)])
        for j, k in enumerate(range(0, len(samples), shard_size))
    ]
    for s in shards:
        s.offsets = s.offsets[: len(s.samples)] if s.offsets else None
    return CacheIndex(root=Path("/nonexistent"), settings={}, train=shards, val=[])


def _steps(plan: GlobalBatches, world: int, accum: int, steps: int, start: int = 0) -> list[list[list[list[Slot]]]]:
    """[step][rank][micro] -> the slots each rank trains, for `steps` optimizer steps from `start`."""
    per_rank = [
        list(itertools.islice(iter(RankBatchSampler(plan, r, world, accum, start)), steps * accum))
        for r in range(world)
    ]
    return [[per_rank[r][s * accum : (s + 1) * accum] for r in range(world)] for s in range(steps)]


CASES = [
    # buckets (sizes), batch, world, accumulation, repeats
    ({(64, 64): 8}, 1, 2, 1, 1),  # 8 photos, one bucket: the users' case
    ({(64, 64): 4, (80, 48): 3, (48, 80): 3}, 1, 2, 1, 1),  # 10 photos in three buckets: short batches
    ({(64, 64): 5, (80, 48): 7}, 2, 4, 1, 2),
    ({(64, 64): 9, (80, 48): 2, (48, 80): 1}, 1, 3, 2, 3),
    ({(64, 64): 3}, 2, 4, 1, 1),  # fewer samples than slots: zero-weight slots
]


@pytest.mark.parametrize(("buckets", "batch", "world", "accum", "repeats"), CASES)
def test_every_rank_trains_its_slice_of_the_same_global_batches(
    buckets: dict[tuple[int, int], int], batch: int, world: int, accum: int, repeats: int
) -> None:
    index = _index(buckets)
    g = batch * world * accum
    plan = GlobalBatches(index, g, seed=7, repeats=repeats)
    entries = index.samples()
    one = _steps(plan, 1, 1, plan.steps_per_epoch * 2)  # one process trains each global batch whole
    many = _steps(plan, world, accum, plan.steps_per_epoch * 2)
    slots = world * accum
    for epoch in range(2):
        seen: Counter[tuple[int, int]] = Counter()
        per_rank = [0] * world
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            real = [s for rank in many[step] for micro in rank for s in micro if s.weight > 0]
            whole = one[step][0][0]
            # The same global batch as one process, whatever the number of processes...
            assert sorted((s.sample, s.data_pass) for s in real) == sorted((s.sample, s.data_pass) for s in whole)
            # ...from one bucket, on every rank at this step...
            assert len({entries[s.sample].bucket for rank in many[step] for micro in rank for s in micro}) == 1
            # ...weighted so that the mean over processes and micro-batches is the global batch's mean.
            assert all(s.weight == pytest.approx(slots / len(whole)) for s in real)
            pads = [s for rank in many[step] for micro in rank for s in micro if s.weight == 0]
            assert not pads or len(whole) < slots  # zero-weight work only fills a short batch
            assert all(len(micro) > 0 for rank in many[step] for micro in rank)
            sizes = [len(micro) for rank in many[step] for micro in rank if micro[0].weight > 0]
            assert max(sizes) - min(sizes) <= 1
            for r in range(world):
                per_rank[r] += sum(1 for micro in many[step][r] for s in micro if s.weight > 0)
            seen.update((s.sample, s.data_pass) for s in real)
        # Every sample `repeats` times per epoch (each copy with its own data pass), and a fair division.
        assert sorted(seen) == sorted((i, epoch * repeats + c) for i in range(len(entries)) for c in range(repeats))
        assert set(seen.values()) == {1}
        assert sum(per_rank) == len(entries) * repeats
        assert max(per_rank) - min(per_rank) <= 1


def test_the_order_comes_from_the_seed_and_the_epoch() -> None:
    index = _index({(64, 64): 6, (80, 48): 6})
    a, b = GlobalBatches(index, 2, seed=1), GlobalBatches(index, 2, seed=1)
    assert [x.tolist() for x, _ in a.epoch(0)] == [x.tolist() for x, _ in b.epoch(0)]
    assert [x.tolist() for x, _ in a.epoch(0)] != [x.tolist() for x, _ in a.epoch(1)]
    assert [x.tolist() for x, _ in a.epoch(0)] != [x.tolist() for x, _ in GlobalBatches(index, 2, seed=2).epoch(0)]


def test_a_sampler_started_at_a_step_continues_the_same_stream() -> None:
    plan = GlobalBatches(_index({(64, 64): 5, (80, 48): 4}), 4, seed=3, repeats=2)
    for world, accum in ((1, 1), (2, 2), (4, 1)):
        full = list(itertools.islice(iter(RankBatchSampler(plan, 1 % world, world, accum)), 40 * accum))
        for start in (1, plan.steps_per_epoch, plan.steps_per_epoch + 3):
            tail = list(itertools.islice(iter(RankBatchSampler(plan, 1 % world, world, accum, start)), 10 * accum))
            assert tail == full[start * accum : (start + 10) * accum]


def test_steps_per_epoch_counts_the_short_batches() -> None:
    plan = GlobalBatches(_index({(64, 64): 4, (80, 48): 3, (48, 80): 3}), 2, seed=0)
    assert plan.steps_per_epoch == 2 + 2 + 2
    assert len(plan.epoch(0)) == plan.steps_per_epoch
    assert GlobalBatches(_index({(64, 64): 8}), 16, seed=0).steps_per_epoch == 1
