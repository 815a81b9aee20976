"""The training mix: every cache entry of a recipe (one per source and resolution) as one table of samples.

A recipe's sources (`data.datasets`, or `data.dataset` alone) each become one cache per resolution, built on its own
(`train.Trainer._prepare_cache`). `DataMix` puts those caches side by side: sample ids run over all of them, each
sample knows its entry (source, role, repeats, caption dropout) and its *draw key*, the name its random draws are
keyed by. With one entry the draw key is the sample's key, so a one-source run draws exactly as before sources
existed; with several, the key is prefixed by the source's number (`1:photo`) and suffixed by the resolution when
a source has several (`photo@512`), so the same image in two entries draws independently.

Groups (a bucket and, for editing samples, the reference sizes) are shared across entries: samples of one size
from two sources can share a global batch, which is what makes the mix a draw in proportion to repeats x size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..sources import Source, resolve_sources
from .cache_index import CacheIndex, SampleEntry, Size


@dataclass(frozen=True)
class Entry:
    """One cache of the mix: a source at one resolution."""

    source: Source
    number: int  # the source's position in the recipe
    resolution: int
    index: CacheIndex


class MixTable:
    """Every training sample of the mix as compact arrays: entry, id within the entry's cache, group, repeats."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        self.tables = [e.index.samples() for e in entries]
        self.groups: list[tuple[Size, tuple[Size, ...]]] = []
        group_ids: dict[tuple[Size, tuple[Size, ...]], int] = {}
        entry, local, group, repeats = [], [], [], []
        for k, (e, table) in enumerate(zip(entries, self.tables, strict=True)):
            remap = []
            for g in table.groups:
                if g not in group_ids:
                    group_ids[g] = len(self.groups)
                    self.groups.append(g)
                remap.append(group_ids[g])
            n = len(table)
            entry.append(np.full(n, k, dtype=np.int32))
            local.append(np.arange(n, dtype=np.int64))
            group.append(np.asarray(remap, dtype=np.int32)[table.group] if n else np.zeros(0, np.int32))
            repeats.append(np.full(n, e.source.repeats, dtype=np.int32))
        self.entry = np.concatenate(entry) if entry else np.zeros(0, np.int32)
        self.local = np.concatenate(local) if local else np.zeros(0, np.int64)
        self.group = np.concatenate(group) if group else np.zeros(0, np.int32)
        self.repeats = np.concatenate(repeats) if repeats else np.zeros(0, np.int32)
        sources = {e.number for e in entries}
        self._prefix = [f"{e.number}:" if len(sources) > 1 else "" for e in entries]
        self._suffix = [f"@{e.resolution}" if len(e.source.resolutions) > 1 else "" for e in entries]

    def __len__(self) -> int:
        return len(self.entry)

    def __getitem__(self, i: int) -> SampleEntry:
        return self.tables[self.entry[i]][int(self.local[i])]

    def __iter__(self) -> Iterator[SampleEntry]:
        return (self[i] for i in range(len(self)))

    def draw_key(self, i: int) -> str:
        k = int(self.entry[i])
        return f"{self._prefix[k]}{self.tables[k].keys[int(self.local[i])]}{self._suffix[k]}"


class DataMix:
    """The caches of one run, read as one dataset (see the module docstring)."""

    def __init__(self, entries: list[Entry]):
        if not entries:
            raise ValueError("a data mix needs at least one cache")
        self.entries = entries
        self._table: MixTable | None = None

    @classmethod
    def single(cls, index: CacheIndex, repeats: int = 1, caption_dropout: float = 0.0) -> DataMix:
        """One cache as a mix (tools and tests that read a cache folder directly)."""
        res = int(index.settings.get("resolution", 0))
        source = Source("data.dataset", str(index.root), "train", repeats, None, None, caption_dropout, (res,), None, 0)
        return cls([Entry(source, 0, res, index)])

    @property
    def index(self) -> CacheIndex:
        """The first entry's cache: where sample-prompt embeddings and the empty prompt are kept."""
        return self.entries[0].index

    @property
    def num_train(self) -> int:
        return sum(e.index.num_train for e in self.entries)

    @property
    def has_regularisation(self) -> bool:
        return any(e.source.regularisation for e in self.entries)

    @property
    def sources(self) -> list[Source]:
        """The distinct sources, in recipe order."""
        seen: dict[int, Source] = {}
        for e in self.entries:
            seen.setdefault(e.number, e.source)
        return [seen[n] for n in sorted(seen)]

    def samples(self) -> MixTable:
        if self._table is None:
            self._table = MixTable(self.entries)
        return self._table

    def extra(self) -> dict[str, Any]:
        return self.index.extra()

    def val_samples(self) -> list[dict[str, Any]]:
        """The held-out samples of every training source (regularisation images are never validated on)."""
        out: list[dict[str, Any]] = []
        for e in self.entries:
            if not e.source.regularisation:
                out += e.index.val_samples()
        return out

    def cached_sources(self) -> list[dict[str, Any]]:
        """`data.datasets` entries that train from these caches as they are: one per cache, with its source's
        settings (for a sweep's trial recipe and `data cache`'s advice)."""
        return [
            {
                "path": str(e.index.root),
                "role": e.source.role,
                "repeats": e.source.repeats,
                "trigger": e.source.trigger or "",
                "caption_dropout": e.source.caption_dropout,
                "resolution": e.resolution,
                "holdout": e.source.holdout,
            }
            for e in self.entries
        ]

    def describe(self) -> list[str]:
        """One line per cache entry, for the training log."""
        lines = []
        for e in self.entries:
            s = e.source
            what = s.path + (f" at {e.resolution}" if len(self.entries) > 1 else "")
            role = " (regularisation)" if s.regularisation else ""
            repeats = f", repeats {s.repeats}" if len(self.entries) > 1 else ""
            val = "" if s.regularisation else f", {len(e.index.val)} validation shard(s)"
            lines.append(f"{what}{role}: {e.index.num_train} training samples{repeats}{val} (cache {e.index.root})")
        return lines


def prepare_mix(
    recipe: Any,
    src: Any,
    cache_root: Path,
    device: Any,
    text_dtype: Any,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    shard_size: int = 1000,
) -> DataMix:
    """The caches of every source at every resolution, one each: a source that is a cache folder is checked
    against the recipe, any other is built under `cache_root/<settings digest>` (by the main process; `barrier`
    waits for it) or reused when its settings and files are unchanged. A source's cache does not depend on the
    other sources, so adding one rebuilds nothing."""
    from .cache import build_cache, check_settings, dataset_source, read_index, settings_for

    entries = []
    for number, source in enumerate(resolve_sources(recipe.data)):
        for resolution in source.resolutions:
            settings = settings_for(src, recipe, source, resolution)
            spec = source.path
            if spec != "builtin:sample" and (Path(spec).expanduser() / "index.json").exists():
                index = read_index(Path(spec).expanduser())
                check_settings(index, settings)
                entries.append(Entry(source, number, resolution, index))
                continue
            samples, source_id = dataset_source(spec, source.instance_prompt, source.mask_dir)
            cache_dir = cache_root / settings.digest(source_id)
            if is_main:
                m = recipe.model
                build_cache(
                    cache_dir, settings, samples, device, text_dtype, shard_size, force_cpu_loading=m.force_cpu_loading,
                    text_encoder_device=m.text_encoder_device,
                )  # fmt: skip
            barrier()
            entries.append(Entry(source, number, resolution, read_index(cache_dir)))
    return DataMix(entries)


__all__ = ["DataMix", "Entry", "MixTable", "prepare_mix"]
