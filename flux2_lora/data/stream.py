"""Streaming batches from cached shards: split by rank and worker, shuffled, one bucket per batch.

Shards are dealt to (rank, worker) slots round-robin: slot = rank * workers + worker takes shards
slot, slot + ranks*workers, ... — every sample belongs to exactly one slot, so across ranks and workers
each sample is read exactly once per epoch (a slot may get no shard when there are fewer shards than
slots). Inside a slot, the shard order and a sample shuffle buffer are seeded from (seed, epoch, slot);
samples are grouped by bucket into batches, and at the end of the slot's stream the partial batches are
emitted too, so nothing is dropped. Everything depends only on (seed, epoch, rank, worker), so the
position of a run is the number of batches it consumed in the epoch, and a resume skips exactly those.

Because slots can hold different numbers of samples, ranks can have different numbers of batches in an
epoch. `batches_per_rank` computes them from the index without reading data; the loop runs every rank
for the largest count and pads the shorter ranks with zero-weight steps (DDP needs every rank in every
step; a zero-weight step adds no gradient).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .cache import CacheIndex, ShardInfo, read_cached_shard


def slot_shards(shards: list[ShardInfo], rank: int, world: int, worker: int, workers: int) -> list[ShardInfo]:
    slots = world * workers
    slot = rank * workers + worker
    return shards[slot::slots]


def _slot_batches(shards: list[ShardInfo], batch_size: int) -> int:
    counts: dict[tuple[int, int], int] = {}
    for s in shards:
        for _, w, h in s.samples:
            counts[(w, h)] = counts.get((w, h), 0) + 1
    return sum(math.ceil(n / batch_size) for n in counts.values())


def batches_per_rank(index: CacheIndex, batch_size: int, world: int, workers: int) -> list[int]:
    """Batches each rank yields per epoch (the same every epoch: the slot assignment is fixed)."""
    w = max(workers, 1)
    return [
        sum(_slot_batches(slot_shards(index.train, r, world, k, w), batch_size) for k in range(w)) for r in range(world)
    ]


def auto_workers(device_type: str, local_processes: int = 1) -> int:
    """DataLoader workers for `data.num_workers: auto`.

    None on the CPU: the step itself uses every core, and reading a cached sample in-process is cheap
    (scripts/bench_data.py on 2 cores: 1,667 samples/s in-process, 355 with 2 workers). On a GPU the
    workers keep the launching process free: up to 4 per process, leaving a core for each process.
    """
    if device_type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // max(local_processes, 1) - 1))


class CachedBatches(IterableDataset):  # type: ignore[type-arg]
    """Batches of cached samples for one rank; set_epoch() before each iteration.

    The epoch lives in shared memory, so persistent DataLoader workers (started once, not every epoch)
    see the new epoch when the next iteration starts.
    """

    def __init__(
        self, index: CacheIndex, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle_buffer: int = 256
    ):
        self.index, self.batch_size, self.seed = index, batch_size, seed
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self._epoch = multiprocessing.RawValue("q", 0)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = slot_shards(self.index.train, self.rank, self.world, worker, workers)
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker, workers)) & 0xFFFFFFFF)
        order = shards[:]
        rng.shuffle(order)
        pending: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for sample in self._shuffled(order, rng):
            group = pending.setdefault(sample["bucket"], [])
            group.append(sample)
            if len(group) == self.batch_size:
                yield collate(group)
                pending[sample["bucket"]] = []
        for bucket in sorted(pending):
            if pending[bucket]:
                yield collate(pending[bucket])

    def _shuffled(self, shards: list[ShardInfo], rng: random.Random) -> Iterator[dict[str, Any]]:
        buf: list[dict[str, Any]] = []
        for s in shards:
            for sample in read_cached_shard(str(self.index.root / s.url)):
                buf.append(sample)
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "latents": torch.stack([s["latents"] for s in samples]),
        "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),
    }
    if "latents_flip" in samples[0]:
        out["latents_flip"] = torch.stack([s["latents_flip"] for s in samples])
    return out
