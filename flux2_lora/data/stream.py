"""The data order: global batches that do not depend on the number of processes, read by random access.

One optimizer step trains one *global batch* of G = batch_size x processes x gradient_accumulation samples,
all from one bucket (for an editing dataset: one bucket and one set of reference sizes, a *group*). An epoch is `data.repeats` copies of every training sample; its global batches come
from (seed, epoch) alone:

  1. each bucket's copies are shuffled and cut into global batches of G; a bucket's last batch may be short;
  2. the epoch's batches (of every bucket) are shuffled together.

Inside a global batch the samples are dealt to its slots, slot = micro-batch x processes + rank, round-robin,
so every rank trains its slice of every global batch, in the same bucket at the same step, and slot sizes
differ by at most one (a short batch starts dealing at the slot where the previous short one stopped, so over
an epoch the ranks' sample counts differ by at most one too). Each sample's loss is weighted processes x accumulation / K (K the samples in the
global batch): after accelerate's division by the accumulation and the mean over processes, the gradient is
the mean over the global batch, the same as one process training it whole. A slot left empty by a short
batch trains one sample of the batch at weight 0 (DDP needs every rank in every step): zero-weight work
happens only in the short, last batch of a bucket, and only when it has fewer samples than slots.

So N processes x batch b gives the LoRA of 1 process x batch N*b (or of 1 process x batch b with
accumulation N), up to float summation order; the position of a run is its optimizer step, and a checkpoint
resumes on any number of processes with the same global batch.

Each rank reads only its own samples: the cache index records where every sample's tensors lie in its shard,
and a DataLoader worker reads each micro-batch with positioned reads (`os.pread`), never a whole shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import Dataset

from .buckets import MULTIPLE
from .cache import CacheCorrupt, CacheIndex


def auto_workers(device_type: str, local_processes: int = 1) -> int:
    """DataLoader workers for `data.num_workers: auto`.

    None on the CPU: the step itself uses every core, and reading a cached sample in-process is cheap
    (scripts/bench_data.py on 2 cores). On a GPU the workers keep the launching process free: up to 4 per
    process, leaving a core for each process.
    """
    if device_type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus // max(local_processes, 1) - 1))


@dataclass(frozen=True)
class Slot:
    """One sample of a micro-batch: its id in the index, its loss weight and its data pass (for its draws)."""

    sample: int
    weight: float
    data_pass: int


class GlobalBatches:
    """The global batches of every epoch, from (seed, epoch) and the global batch size alone."""

    def __init__(self, index: CacheIndex, global_batch: int, seed: int, repeats: int = 1):
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        self.global_batch, self.seed, self.repeats = global_batch, seed, repeats
        table = index.samples()
        self.buckets = {  # per group (bucket, reference sizes): its sample ids
            group: np.flatnonzero(table.group == g).astype(np.int64)
            for g, group in sorted(enumerate(table.groups), key=lambda x: x[1])
        }
        self.num_samples = sum(len(v) for v in self.buckets.values())
        self.steps_per_epoch = sum(-(-len(v) * repeats // global_batch) for v in self.buckets.values())
        self._cached: tuple[int, list[tuple[np.ndarray, int]]] | None = None

    def epoch(self, epoch: int) -> list[tuple[np.ndarray, int]]:
        """The epoch's global batches in order: an (n, 2) array of (sample id, copy), n <= global batch, and the
        slot its dealing starts at (counted in samples of the short batches before it; 0 for the first)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        for ids in self.buckets.values():
            copies = np.stack([np.tile(ids, self.repeats), np.repeat(np.arange(self.repeats), len(ids))], axis=1)
            copies = copies[rng.permutation(len(copies))]
            batches += [copies[i : i + self.global_batch] for i in range(0, len(copies), self.global_batch)]
        order = rng.permutation(len(batches))
        out, dealt = [], 0
        for i in order:  # short batches start dealing where the previous one stopped: ranks stay within one sample
            out.append((batches[i], dealt))
            dealt += len(batches[i]) if len(batches[i]) < self.global_batch else 0
        self._cached = (epoch, out)
        return out

    def rank_slots(
        self, batch: tuple[np.ndarray, int], epoch: int, rank: int, world: int, accumulation: int
    ) -> list[list[Slot]]:
        """This rank's `accumulation` micro-batches of one global batch (a zero-weight sample fills an empty one)."""
        samples, first = batch
        slots = world * accumulation
        weight = slots / len(samples)
        out = []
        for micro in range(accumulation):
            mine = samples[(micro * world + rank - first) % slots :: slots]
            if len(mine):
                out.append([Slot(int(s), weight, epoch * self.repeats + int(c)) for s, c in mine])
            else:  # a short global batch has no sample for this slot: train its first one at weight 0
                out.append([Slot(int(samples[0, 0]), 0.0, epoch * self.repeats + int(samples[0, 1]))])
        return out


class RankBatchSampler:
    """The micro-batches of one rank, from optimizer step `start` on, epoch after epoch (a batch sampler)."""

    def __init__(self, plan: GlobalBatches, rank: int, world: int, accumulation: int, start: int = 0):
        self.plan, self.rank, self.world, self.accumulation, self.start = plan, rank, world, accumulation, start

    def __iter__(self) -> Iterator[list[Slot]]:
        epoch, skip = divmod(self.start, self.plan.steps_per_epoch)
        while True:
            for batch in self.plan.epoch(epoch)[skip:]:
                yield from self.plan.rank_slots(batch, epoch, self.rank, self.world, self.accumulation)
            epoch, skip = epoch + 1, 0


class CachedSamples(Dataset):  # type: ignore[type-arg]
    """Cached samples by id, read with positioned reads at the offsets the index records (no shard is scanned).

    Items are `Slot`s (from RankBatchSampler); `collate` stacks them into a micro-batch."""

    def __init__(self, index: CacheIndex):
        self.index = index
        self.entries = index.samples()
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def _fd(self, url: str) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(url)
        if fd is None:
            fd = self._fds[url] = os.open(self.index.root / url, os.O_RDONLY)
        return fd

    def read(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        try:
            data = os.pread(self._fd(e.url), e.size, e.offset)  # only this sample's bytes
        except OSError as err:
            raise CacheCorrupt(self.index.root, e.url, f"cannot be read ({err.strerror or err})", e.key) from None
        try:
            if len(data) != e.size:
                raise ValueError(f"short read: {len(data)} of {e.size} bytes")
            tensors = load_safetensors(data)
        except Exception as err:  # noqa: BLE001 - a changed or truncated shard is a data error naming it
            why = f"cannot be read at its indexed offset ({err}): the shard changed after the cache was opened"
            raise CacheCorrupt(self.index.root, e.url, why, e.key) from None
        for name, (w, h) in [("latents", e.bucket), *((f"ref.{n}", r) for n, r in enumerate(e.references))]:
            lat = tensors.get(name)
            if lat is None or "prompt_embeds" not in tensors or tuple(lat.shape[1:]) != (h // MULTIPLE, w // MULTIPLE):
                what = "its latents" if name == "latents" else f"its reference {name[4:]}'s latents"
                found = (
                    f"{what} are {'x'.join(map(str, lat.shape))}" if lat is not None else f"it holds {sorted(tensors)}"
                )
                listed = f"{w}x{h}" if name == "latents" else f"a {w}x{h} reference {name[4:]}"
                why = f"index.json lists it as {listed}, but {found} (`flux2-lora data validate` checks every sample)"
                raise CacheCorrupt(self.index.root, e.url, why, e.key)
        refs = [tensors.pop(f"ref.{n}") for n in range(len(e.references))]
        flips = [tensors.pop(f"ref_flip.{n}") for n in range(len(e.references)) if f"ref_flip.{n}" in tensors]
        return {"key": e.key, "bucket": e.bucket, **tensors, "references": refs, "references_flip": flips}

    def __getitem__(self, slot: Slot) -> dict[str, Any]:
        return {**self.read(slot.sample), "weight": slot.weight, "data_pass": slot.data_pass}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A micro-batch: stacked tensors, per-sample keys, loss weights and data passes."""
    out: dict[str, Any] = {
        "keys": [s["key"] for s in samples],
        "latents": torch.stack([s["latents"] for s in samples]),
        "prompt_embeds": torch.stack([s["prompt_embeds"] for s in samples]),
        "weights": torch.tensor([float(s.get("weight", 1.0)) for s in samples]),
        "passes": [int(s.get("data_pass", 0)) for s in samples],
        "trained": sum(1 for s in samples if s.get("weight", 1.0) > 0),
    }
    if "latents_flip" in samples[0]:
        out["latents_flip"] = torch.stack([s["latents_flip"] for s in samples])
    # Reference i of every sample, stacked (one group per batch: the shapes agree); [] without references.
    for name in ("references", "references_flip"):
        refs = [s.get(name, []) for s in samples]
        if refs[0]:
            out[name] = [torch.stack([r[n] for r in refs]) for n in range(len(refs[0]))]
        elif name == "references":
            out[name] = []
    return out


def describe(plan: GlobalBatches, batch_size: int, world: int, accumulation: int) -> str:
    """One line on the division of the data, for the training log."""
    short = sum(1 for ids in plan.buckets.values() if len(ids) * plan.repeats % plan.global_batch)
    return (
        f"data  global batch {plan.global_batch} = batch {batch_size} x {world} process(es) x accumulation "
        f"{accumulation}; {plan.num_samples} samples x {plan.repeats} repeat(s) in {_groups(plan)}: "
        f"{plan.steps_per_epoch} steps per epoch"
        + (f", {short} of them short (a bucket's last batch)" if short else "")
    )


def _groups(plan: GlobalBatches) -> str:
    buckets = {b for b, _ in plan.buckets}
    text = f"{len(buckets)} bucket(s)"
    if any(refs for _, refs in plan.buckets):  # an editing dataset: groups of one bucket and one set of reference sizes
        text += f", {len(plan.buckets)} group(s) of bucket and reference sizes"
    return text


__all__ = ["CachedSamples", "GlobalBatches", "RankBatchSampler", "Slot", "auto_workers", "collate", "describe"]
