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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch.utils.data import Dataset

from ..draws import choose_caption_variant, sample_seed
from .buckets import MULTIPLE
from .cache import CacheCorrupt, CacheIndex
from .captions import read_variant
from .mix import DataMix


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


def num_workers(setting: int | str, device_type: str, processes: int) -> int:
    """data.num_workers, with `auto` sized to the machine (`auto_workers`; LOCAL_WORLD_SIZE from torchrun)."""
    if setting != "auto":
        return int(setting)
    return auto_workers(device_type, int(os.environ.get("LOCAL_WORLD_SIZE", processes)))


@dataclass(frozen=True)
class Slot:
    """One sample of a micro-batch: its id in the index, its loss weight and its data pass (for its draws)."""

    sample: int
    weight: float
    data_pass: int


class GlobalBatches:
    """The global batches of every epoch, from (seed, epoch) and the global batch size alone."""

    def __init__(self, data: DataMix | CacheIndex, global_batch: int, seed: int, repeats: int = 1):
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        mix = data if isinstance(data, DataMix) else DataMix.single(data, repeats)
        self.global_batch, self.seed = global_batch, seed
        table = mix.samples()
        self.repeats = table.repeats  # per sample: its source's data.repeats
        self.buckets = {  # per group (bucket, reference sizes): its sample ids
            group: np.flatnonzero(table.group == g).astype(np.int64)
            for g, group in sorted(enumerate(table.groups), key=lambda x: x[1])
        }
        self.num_samples = sum(len(v) for v in self.buckets.values())
        self.epoch_samples = int(self.repeats.sum())  # sample copies per epoch
        self.steps_per_epoch = sum(-(-int(self.repeats[v].sum()) // global_batch) for v in self.buckets.values())
        self._cached: tuple[int, list[tuple[np.ndarray, int]]] | None = None

    def epoch(self, epoch: int) -> list[tuple[np.ndarray, int]]:
        """The epoch's global batches in order: an (n, 2) array of (sample id, copy), n <= global batch, and the
        slot its dealing starts at (counted in samples of the short batches before it; 0 for the first)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[np.ndarray] = []
        for ids in self.buckets.values():
            # copy c of every sample with more than c repeats (with one repeats for all: ids, ids, ...)
            reps = self.repeats[ids]
            copies = np.concatenate(
                [np.stack([ids[reps > c], np.full(int((reps > c).sum()), c)], axis=1) for c in range(int(reps.max()))]
            )
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
                out.append([Slot(int(s), weight, self._pass(epoch, s, c)) for s, c in mine])
            else:  # a short global batch has no sample for this slot: train its first one at weight 0
                s, c = samples[0]
                out.append([Slot(int(s), 0.0, self._pass(epoch, s, c))])
        return out

    def _pass(self, epoch: int, sample: int, copy: int) -> int:
        """The data pass of a sample's copy: its draws' key (epoch x its repeats + copy)."""
        return epoch * int(self.repeats[sample]) + int(copy)


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

    Items are `Slot`s (from RankBatchSampler); `collate` stacks them into a micro-batch. A cache with K > 1 caption
    variants (data/captions.py) gives each sample the variant drawn from (seed, its data pass, its draw key), as
    `prompt_embeds`, and only that variant's bytes are read."""

    def __init__(self, data: DataMix | CacheIndex, seed: int = 0):
        self.mix = data if isinstance(data, DataMix) else DataMix.single(data)
        self.seed = seed  # training.seed: the caption variant draws
        self.entries = self.mix.samples()
        self._fds: dict[Path, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.entries)

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # a forked DataLoader worker opens its own descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, i: int, data_pass: int = 0) -> dict[str, Any]:
        e = self.entries[i]
        entry = self.mix.entries[int(self.entries.entry[i])]
        root = entry.index.root
        variants = int(entry.index.settings.get("caption_variants", 1))
        try:
            if variants > 1:  # the drawn caption variant's embedding, not the K - 1 others (data/captions.py)
                seed = sample_seed(self.seed, data_pass, self.entries.draw_key(i) + "#caption")
                k = choose_caption_variant(variants, seed)
                tensors = read_variant(self._fd(root / e.url), e.offset, e.size, k)
            else:
                data = os.pread(self._fd(root / e.url), e.size, e.offset)  # only this sample's bytes
                if len(data) != e.size:
                    raise ValueError(f"short read: {len(data)} of {e.size} bytes")
                tensors = load_safetensors(data)
        except OSError as err:
            raise CacheCorrupt(root, e.url, f"cannot be read ({err.strerror or err})", e.key) from None
        except Exception as err:  # noqa: BLE001 - a changed or truncated shard is a data error naming it
            why = f"cannot be read at its indexed offset ({err}): the shard changed after the cache was opened"
            raise CacheCorrupt(root, e.url, why, e.key) from None
        for name, (w, h) in [("latents", e.bucket), *((f"ref.{n}", r) for n, r in enumerate(e.references))]:
            lat = tensors.get(name)
            if lat is None or "prompt_embeds" not in tensors or tuple(lat.shape[1:]) != (h // MULTIPLE, w // MULTIPLE):
                what = "its latents" if name == "latents" else f"its reference {name[4:]}'s latents"
                found = (
                    f"{what} are {'x'.join(map(str, lat.shape))}" if lat is not None else f"it holds {sorted(tensors)}"
                )
                listed = f"{w}x{h}" if name == "latents" else f"a {w}x{h} reference {name[4:]}"
                why = f"index.json lists it as {listed}, but {found} (`flux2-lora data validate` checks every sample)"
                raise CacheCorrupt(root, e.url, why, e.key)
        w, h = e.bucket
        for name in [n for n in ("mask", "mask_flip") if n in tensors]:  # a loss mask: one weight per latent token
            if tuple(tensors[name].shape) != (h // MULTIPLE, w // MULTIPLE):
                found = "x".join(map(str, tensors[name].shape))
                why = f"index.json lists it as {w}x{h}, but its {name} is {found}, not {h // MULTIPLE}x{w // MULTIPLE}"
                raise CacheCorrupt(root, e.url, why + " (`flux2-lora data validate` checks every sample)", e.key)
        refs = [tensors.pop(f"ref.{n}") for n in range(len(e.references))]
        flips = [tensors.pop(f"ref_flip.{n}") for n in range(len(e.references)) if f"ref_flip.{n}" in tensors]
        source = entry.source
        return {
            "key": self.entries.draw_key(i),
            "bucket": e.bucket,
            **tensors,
            "references": refs,
            "references_flip": flips,
            "source": entry.number,
            "regularisation": source.regularisation,
            "caption_dropout": source.caption_dropout,
        }

    def __getitem__(self, slot: Slot) -> dict[str, Any]:
        return {**self.read(slot.sample, slot.data_pass), "weight": slot.weight, "data_pass": slot.data_pass}

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
        # per sample: its source's number, whether it is a regularisation sample, its caption dropout
        "sources": [int(s.get("source", 0)) for s in samples],
        "regularisation": torch.tensor([bool(s.get("regularisation", False)) for s in samples]),
        "caption_dropout": [s.get("caption_dropout") for s in samples],
    }
    if "latents_flip" in samples[0]:
        out["latents_flip"] = torch.stack([s["latents_flip"] for s in samples])
    if any("mask" in s for s in samples):  # loss masks (data/masks.py): ones for a sample without one
        ones = [torch.ones(s["latents"].shape[-2:]) for s in samples]
        out["mask"] = torch.stack([s.get("mask", o) for s, o in zip(samples, ones, strict=True)])
        out["mask_flip"] = torch.stack(
            [s.get("mask_flip", s["mask"].flip(-1) if "mask" in s else o) for s, o in zip(samples, ones, strict=True)]
        )
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
    short = sum(1 for ids in plan.buckets.values() if int(plan.repeats[ids].sum()) % plan.global_batch)
    reps = sorted({int(r) for r in plan.repeats})
    copies = (
        f"{plan.num_samples} samples x {reps[0]} repeat(s)"
        if len(reps) == 1
        else f"{plan.num_samples} samples, {plan.epoch_samples} with repeats"
    )
    return (
        f"data  global batch {plan.global_batch} = batch {batch_size} x {world} process(es) x accumulation "
        f"{accumulation}; {copies} in {_groups(plan)}: "
        f"{plan.steps_per_epoch} steps per epoch"
        + (f", {short} of them short (a bucket's last batch)" if short else "")
    )


def division_record(step: int, epoch: int, gathered: list[list[int]], complete: bool) -> dict[str, Any]:
    """metrics.jsonl's record of an epoch's division: `gathered` holds each rank's [samples trained, then per
    source]; with several sources the record also has the samples trained per source (summed over ranks)."""
    record: dict[str, Any] = {"step": step, "epoch": epoch, "samples_per_rank": [row[0] for row in gathered]}
    if len(gathered[0]) > 2:
        record["samples_per_source"] = [sum(row[k] for row in gathered) for k in range(1, len(gathered[0]))]
    record["epoch_complete"] = complete
    return record


def division_line(record: dict[str, Any], total: int, since_resume: bool) -> str:
    """The log line of an epoch's division (`division_record`); `total`: the sample copies of an epoch."""
    counts, per_source = record["samples_per_rank"], record.get("samples_per_source")
    note = (", counted since the resume" if since_resume else "") + (
        "" if record["epoch_complete"] else ", epoch not finished"
    )
    ranks = f"per rank {', '.join(map(str, counts))}" if len(counts) > 1 else "on 1 process"
    sources = f"; per source {', '.join(map(str, per_source))}" if per_source else ""
    return f"epoch {record['epoch']}: samples trained {ranks} ({sum(counts)} of {total}{note}){sources}"


def _groups(plan: GlobalBatches) -> str:
    buckets = {b for b, _ in plan.buckets}
    text = f"{len(buckets)} bucket(s)"
    if any(refs for _, refs in plan.buckets):  # an editing dataset: groups of one bucket and one set of reference sizes
        text += f", {len(plan.buckets)} group(s) of bucket and reference sizes"
    return text


__all__ = [
    "CachedSamples",
    "GlobalBatches",
    "RankBatchSampler",
    "Slot",
    "auto_workers",
    "collate",
    "describe",
    "division_line",
    "division_record",
    "num_workers",
]
