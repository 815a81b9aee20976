"""What a cache folder is, and its index.json read: the data model and the parser, no checks against the shards.

A cache (made by `cache.build_cache`) is a folder of webdataset shards that training reads as its one data path:

  index.json              settings the cache was made with + every shard's samples (key, bucket, and the byte
                          offset and size of the sample's tensors in its shard: training reads by position)
  train-NNNNNN.tar        samples: <key>.safetensors (latents, [latents_flip], prompt_embeds, and for an editing
                          sample ref.0, ref.1, ... [ref_flip.0, ...]: its references' latents) + <key>.json;
                          with settings.caption_variants K > 1, prompt_embeds.0 .. prompt_embeds.{K-1} instead of
                          prompt_embeds (data/captions.py); in a dataset with loss masks, mask [mask_flip]:
                          float weights at the latent grid (h/16 x w/16, data/masks.py; ones if unmasked)
  val-NNNNNN.tar          the held-out samples for the fixed-seed validation loss
  extra.safetensors       the empty-prompt embedding (caption dropout, negative prompt)
  prompts-<hash>.safetensors  sample-prompt embeddings for one list of validation prompts

Here: the settings (`CacheSettings`, stored and compared on use: `check_settings`), the index (`CacheIndex`, its
shards `ShardInfo` and samples `SampleTable`/`SampleEntry`), `read_index_json` (index.json parsed with every key and
type checked), `member_offsets` (sample offsets from the tar headers, for caches made before they were recorded),
reading cached samples (`read_cached_shard`), and `CacheCorrupt`, the one-line error for a damaged cache.
Checking the index against the files it lists is `cache_check` (which builds on this module, never the reverse);
`cache_check.read_index` is the checked open.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from .buckets import MULTIPLE
from .folder import DataError
from .shards import CACHE_MEMBERS, iter_tar

CACHE_VERSION = 1
# Settings added after version 1, with the value that caches made before them were made with. A setting at its
# default is left out of index.json, so those caches keep their digest and stay valid.
SETTING_DEFAULTS: dict[str, Any] = {
    "text_encoder_quantize": "none",
    "max_reference_pixels": 1024 * 1024,
    "caption_shuffle": False,
    "keep_tokens": 0,
    "tag_dropout": 0.0,
    "caption_variants": 1,
}
Size = tuple[int, int]


@dataclass(frozen=True)
class CacheSettings:
    """Everything that changes what is in the cache. Stored in index.json and compared on use."""

    model: str
    family: str
    text_layers: tuple[int, ...]
    max_sequence_length: int
    resolution: int
    buckets: tuple[tuple[int, int], ...]
    random_flip: bool
    trigger: str
    holdout: int
    seed: int
    text_encoder_quantize: str = "none"  # none | int8 | nf4: quantized weights change the embeddings
    max_reference_pixels: int = 1024 * 1024  # references larger than this are scaled down to it before encoding
    # Caption variants (data/captions.py): K > 1 stores prompt_embeds.0 .. prompt_embeds.{K-1} per sample.
    caption_shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    caption_variants: int = 1

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["text_layers"] = list(self.text_layers)
        d["buckets"] = [list(b) for b in self.buckets]
        return {k: v for k, v in d.items() if k not in SETTING_DEFAULTS or v != SETTING_DEFAULTS[k]}

    def digest(self, source: str) -> str:
        return hashlib.sha256(json.dumps([self.to_json(), source], sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ShardInfo:
    url: str
    samples: list[tuple[str, int, int]]  # key, bucket width, bucket height
    # Where each sample's <key>.safetensors member lies in the tar: (byte offset of its data, size in bytes).
    offsets: list[tuple[int, int]] | None = None
    # An editing cache: each sample's reference sizes in pixels ((width, height) per reference; () for none).
    references: list[tuple[Size, ...]] | None = None


@dataclass(frozen=True)
class SampleEntry:
    """One cached training sample, addressable without reading its shard: `size` bytes at `offset` of `url`."""

    url: str
    key: str
    bucket: tuple[int, int]
    offset: int
    size: int
    references: tuple[Size, ...] = ()  # pixel size (width, height) of each reference, in order


class SampleTable:
    """Every training sample of a cache as compact arrays (a million samples take tens of MB, not a list of
    objects per sample); `table[i]` is sample i's SampleEntry.

    A *group* is a bucket together with the reference sizes (none for a text-to-image sample): samples of one group
    have tensors of the same shapes and can share a batch."""

    def __init__(self, shards: list[ShardInfo], root: Path):
        self.urls = [s.url for s in shards]
        self.keys: list[str] = []
        self.buckets: list[tuple[int, int]] = []  # distinct bucket sizes; `bucket` indexes them
        self.groups: list[tuple[Size, tuple[Size, ...]]] = []  # distinct (bucket, reference sizes); `group` indexes
        shard, bucket, group, offset, size = [], [], [], [], []
        ids: dict[tuple[int, int], int] = {}
        group_ids: dict[tuple[Size, tuple[Size, ...]], int] = {}
        for j, info in enumerate(shards):
            offsets = info.offsets if info.offsets is not None else member_offsets(root / info.url, info.samples)
            refs = info.references if info.references is not None else [()] * len(info.samples)
            for (key, w, h), (o, n), r in zip(info.samples, offsets, refs, strict=True):
                if (w, h) not in ids:
                    ids[(w, h)] = len(self.buckets)
                    self.buckets.append((w, h))
                if ((w, h), r) not in group_ids:
                    group_ids[((w, h), r)] = len(self.groups)
                    self.groups.append(((w, h), r))
                self.keys.append(key)
                shard.append(j)
                bucket.append(ids[(w, h)])
                group.append(group_ids[((w, h), r)])
                offset.append(o)
                size.append(n)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.bucket = np.asarray(bucket, dtype=np.int32)
        self.group = np.asarray(group, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> SampleEntry:
        return SampleEntry(
            self.urls[self.shard[i]],
            self.keys[i],
            self.buckets[self.bucket[i]],
            int(self.offset[i]),
            int(self.size[i]),
            self.groups[self.group[i]][1],
        )

    def __iter__(self) -> Iterator[SampleEntry]:
        return (self[i] for i in range(len(self)))


@dataclass
class CacheIndex:
    root: Path
    settings: dict[str, Any]
    train: list[ShardInfo]
    val: list[ShardInfo]
    _table: SampleTable | None = field(default=None, repr=False, compare=False)

    @property
    def num_train(self) -> int:
        return sum(len(s.samples) for s in self.train)

    def samples(self) -> SampleTable:
        """Every training sample in index order, with its member offset (found from the tar headers for caches
        made before offsets were recorded). Built once per index."""
        if self._table is None:
            self._table = SampleTable(self.train, self.root)
        return self._table

    def extra(self) -> dict[str, torch.Tensor]:
        try:
            tensors = load_file(str(self.root / "extra.safetensors"))
        except Exception as e:  # noqa: BLE001 - missing, truncated or not safetensors: one line naming the file
            raise CacheCorrupt(self.root, "extra.safetensors", f"cannot be read ({_reason(e)})") from None
        if "empty" not in tensors:
            raise CacheCorrupt(self.root, "extra.safetensors", "has no 'empty' tensor (the empty-prompt embedding)")
        return tensors

    def val_samples(self) -> list[dict[str, Any]]:
        out = []
        for info in self.val:
            try:
                out += list(read_cached_shard(str(self.root / info.url)))
            except Exception as e:  # noqa: BLE001 - a damaged validation shard: one line naming it
                why = str(e).removeprefix(f"{self.root / info.url}: ")
                raise CacheCorrupt(self.root, info.url, f"cannot read the validation samples ({why})") from None
        return out


class CacheCorrupt(DataError):
    """A cache folder whose files cannot be read or do not match its index.json.

    The message is one line: the cache folder, the file (and sample), the reason, and what to do."""

    def __init__(self, root: Path | str, file: str = "", reason: str = "", key: str | None = None):
        if not file:  # CacheCorrupt(message): a DataLoader worker's error re-raised with its traceback (torch's
            # ExceptionWrapper), whose last line is `module.CacheCorrupt: <the one-line message>`
            lines = str(root).strip().splitlines() or [""]
            message = lines[-1].removeprefix(f"{type(self).__module__}.{type(self).__qualname__}: ")
            self.root, self.file, self.key, self.reason = Path(), "", None, message
            super().__init__(message)
            return
        self.root, self.file, self.key, self.reason = Path(root), file, key, _one_line(reason)
        where = file if key is None else f"{file}, sample {key!r}"
        super().__init__(f"{root}: corrupt cache: {where}: {self.reason}; {rebuild_hint(self.root)}")


def is_run_cache(root: Path) -> bool:
    """True for a cache a run built for itself (OUTPUT/cache/<settings digest>): the next run rebuilds it if absent."""
    return root.parent.name == "cache" and re.fullmatch(r"[0-9a-f]{16}", root.name) is not None


def rebuild_hint(root: Path) -> str:
    if is_run_cache(root):
        return "delete this folder and the next run rebuilds it"
    return "delete the folder and rebuild it with `flux2-lora data cache`"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _reason(e: BaseException) -> str:
    return _one_line(str(e) or type(e).__name__)


def _kind(v: Any) -> str:
    """What a JSON value is, for messages."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    kind = "a boolean" if isinstance(v, bool) else "a string" if isinstance(v, str) else "a number"
    return f"{json.dumps(v)[:40]} ({kind})"


def _is_int(v: Any) -> bool:
    return type(v) is int  # not a bool, not a float


# index.json settings: key -> (check, what it must be). Keys of CacheSettings with a SETTING_DEFAULTS entry may be absent.
_SETTING_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: type(v) is str and bool(v), "a model path (string)"),
    "family": (lambda v: type(v) is str and bool(v), "a model family (string)"),
    "text_layers": (lambda v: type(v) is list and bool(v) and all(_is_int(x) for x in v), "a list of layer numbers"),
    "max_sequence_length": (lambda v: _is_int(v) and v > 0, "a whole number > 0"),
    "resolution": (lambda v: _is_int(v) and v > 0, "a whole number > 0"),
    "buckets": (
        lambda v: (
            type(v) is list
            and bool(v)
            and all(
                type(b) is list and len(b) == 2 and all(_is_int(x) and x > 0 and x % MULTIPLE == 0 for x in b)
                for b in v
            )
        ),
        f"a list of [width, height] pairs, multiples of {MULTIPLE}",
    ),
    "random_flip": (lambda v: type(v) is bool, "true or false"),
    "trigger": (lambda v: type(v) is str, "a string"),
    "holdout": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "seed": (_is_int, "a whole number"),
    "text_encoder_quantize": (lambda v: type(v) is str, "a string"),
    "max_reference_pixels": (lambda v: _is_int(v) and v > 0, "a whole number > 0"),
    "caption_shuffle": (lambda v: type(v) is bool, "true or false"),
    "keep_tokens": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "tag_dropout": (lambda v: type(v) in (int, float) and 0 <= v < 1, "a number in [0, 1)"),
    "caption_variants": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
}


def _sizes_ok(v: Any) -> bool:
    """A list of [width, height] reference sizes (positive multiples of 16)."""
    return type(v) is list and all(
        type(b) is list and len(b) == 2 and all(_is_int(x) and x > 0 and x % MULTIPLE == 0 for x in b) for b in v
    )


def _rows_ok(rows: list[Any], n: int) -> bool:
    """Every sample row is [key, w, h] (n=3), [key, w, h, offset, size] (n=5) or, in an editing cache,
    [key, w, h, offset, size, [[ref width, ref height], ...]] (n=6), with a non-empty key and integers."""
    if n == 6:
        return all(type(x) is list and len(x) == 6 and _rows_ok([x[:5]], 5) and _sizes_ok(x[5]) for x in rows)
    if n == 5:
        return all(
            type(x) is list
            and len(x) == 5
            and type(x[0]) is str
            and x[0] != ""
            and type(x[1]) is int
            and type(x[2]) is int
            and type(x[3]) is int
            and type(x[4]) is int
            for x in rows
        )
    return all(
        type(x) is list and len(x) == 3 and type(x[0]) is str and x[0] != "" and _is_int(x[1]) and _is_int(x[2])
        for x in rows
    )


def _row_problem(x: Any, n: int) -> str:
    form = {3: "[key, width, height]", 5: "[key, width, height, offset, size]"}.get(
        n, "[key, width, height, offset, size, references]"
    )
    if type(x) is not list or len(x) != n:
        return f"expected {form} like the other samples of the shard, got {_kind(x)}" + (
            f" of {len(x)} values" if type(x) is list else ""
        )
    if type(x[0]) is not str or not x[0]:
        return f"the key must be a non-empty string, got {_kind(x[0])}"
    names = ["width", "height", "offset", "size"]
    if n == 6 and all(_is_int(v) for v in x[1:5]):
        return f"the references must be a list of [width, height] pairs, multiples of {MULTIPLE}, got {_kind(x[5])}"
    bad = next(j for j in range(1, min(n, 5)) if not _is_int(x[j]))
    return f"the {names[bad - 1]} must be a whole number, got {_kind(x[bad])}"


def _index_from_json(root: Path, d: Any) -> CacheIndex:
    """The CacheIndex of a parsed index.json, every key and type checked (CacheCorrupt naming the JSON path)."""

    def bad(where: str, why: str) -> CacheCorrupt:
        return CacheCorrupt(root, "index.json", f"{where}: {why}" if where else why)

    if type(d) is not dict:
        raise bad("", f"expected a JSON object, got {_kind(d)}")
    if "version" not in d:
        raise bad("", "no 'version' key (not an index.json written by `flux2-lora data cache`)")
    if d["version"] != CACHE_VERSION or not _is_int(d["version"]):
        raise bad("version", f"cache version {d['version']!r} is not {CACHE_VERSION}")
    for key in ("settings", "train", "val"):
        if key not in d:
            raise bad("", f"no {key!r} key")
    st = d["settings"]
    if type(st) is not dict:
        raise bad("settings", f"expected an object, got {_kind(st)}")
    for key, (ok, what) in _SETTING_CHECKS.items():
        if key not in st:
            if key in SETTING_DEFAULTS:
                continue
            raise bad("settings", f"no {key!r} key")
        if not ok(st[key]):
            raise bad(f"settings.{key}", f"expected {what}, got {_kind(st[key])}")
    parts: dict[str, list[ShardInfo]] = {}
    urls: set[str] = set()
    for part in ("train", "val"):
        shards = d[part]
        if type(shards) is not list or not shards:
            raise bad(part, f"expected a non-empty list of shards, got {_kind(shards)}")
        infos = []
        for j, s in enumerate(shards):
            where = f"{part}[{j}]"
            if type(s) is not dict:
                raise bad(where, f'expected a shard {{"url": ..., "samples": [...]}}, got {_kind(s)}')
            for key in ("url", "samples"):
                if key not in s:
                    raise bad(where, f"no {key!r} key")
            url, rows = s["url"], s["samples"]
            if type(url) is not str or not url.endswith(".tar") or "/" in url or "\\" in url or url.startswith("."):
                raise bad(f"{where}.url", f"expected the name of a .tar file in the cache folder, got {_kind(url)}")
            if url in urls:
                raise bad(f"{where}.url", f"{url} is listed twice")
            urls.add(url)
            if type(rows) is not list or not rows:
                raise bad(f"{where}.samples", f"expected a non-empty list of samples, got {_kind(rows)}")
            n = len(rows[0]) if type(rows[0]) is list and len(rows[0]) in (5, 6) else 3
            if not _rows_ok(rows, n):
                k = next(k for k, x in enumerate(rows) if not _rows_ok([x], n))
                raise bad(f"{where}.samples[{k}]", _row_problem(rows[k], n))
            samples = [(x[0], x[1], x[2]) for x in rows]
            refs = [tuple((r[0], r[1]) for r in x[5]) for x in rows] if n == 6 else None
            infos.append(ShardInfo(url, samples, [(x[3], x[4]) for x in rows] if n >= 5 else None, refs))
        parts[part] = infos
    return CacheIndex(root=root, settings=st, train=parts["train"], val=parts["val"])


def read_index_json(root: Path) -> CacheIndex:
    """The cache's index.json, every key and type checked, not yet checked against the files it lists (that is
    `cache_check.read_index`)."""
    path = root / "index.json"
    if not path.exists():
        raise DataError(f"{root}: not a flux2-lora cache (no index.json); make one with `flux2-lora data cache`")
    try:
        d = json.loads(path.read_bytes())
    except OSError as e:
        raise CacheCorrupt(root, "index.json", f"cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: truncated, random bytes
        raise CacheCorrupt(root, "index.json", f"not valid JSON ({_reason(e)})") from None
    return _index_from_json(root, d)


def check_settings(index: CacheIndex, expected: CacheSettings) -> None:
    """Refuse a cache made with other settings, naming what differs."""
    want, have = SETTING_DEFAULTS | expected.to_json(), SETTING_DEFAULTS | index.settings
    diff = [f"{k}: cache has {have.get(k)!r}, recipe wants {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise DataError(f"{index.root}: stale cache ({'; '.join(diff)}); rebuild it with `flux2-lora data cache`")


def member_offsets(path: Path, samples: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """(data offset, size) of each sample's `<key>.safetensors` member, read from the tar headers only."""
    root = path.parent
    found: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".safetensors"):
                    found[m.name[: -len(".safetensors")]] = (m.offset_data, m.size)
    except (OSError, tarfile.TarError) as e:
        raise CacheCorrupt(root, path.name, f"cannot read the shard ({_reason(e)})") from None
    missing = [k for k, _, _ in samples if k not in found]
    if missing:
        raise CacheCorrupt(root, path.name, "listed in index.json but not in the shard", missing[0])
    if len(found) != len(samples):
        listed = {k for k, _, _ in samples}
        extra = next(k for k in found if k not in listed)
        why = f"in the shard but not in index.json (the shard holds {len(found)} samples, index.json lists {len(samples)})"
        raise CacheCorrupt(root, path.name, why, extra)
    return [found[k] for k, _, _ in samples]


def decode_cached(sample: dict[str, Any]) -> dict[str, Any]:
    """A cached-shard sample -> {'key', 'bucket', 'caption', 'latents', 'prompt_embeds', ['latents_flip'],
    ['ref.0', ...]} (an editing sample also has 'references': its reference sizes). A sample of a cache with caption
    variants gives variant 0 as 'prompt_embeds' (validation uses variant 0; its caption is variant 0's)."""
    from safetensors.torch import load

    key = sample.get("__key__")
    try:
        tensors = load(sample["safetensors"])
        if "prompt_embeds.0" in tensors:
            tensors["prompt_embeds"] = tensors.pop("prompt_embeds.0")
            tensors = {k: v for k, v in tensors.items() if not k.startswith("prompt_embeds.")}
        meta = json.loads(sample["json"])
        refs = {"references": [tuple(r) for r in meta["references"]]} if meta.get("references") else {}
        return {"key": key, "bucket": tuple(meta["bucket"]), "caption": meta["caption"], **refs, **tensors}
    except Exception as e:  # noqa: BLE001 - a damaged member: a data error naming the sample
        why = f"no {e} member" if isinstance(e, KeyError) else _reason(e)
        raise DataError(f"sample {key!r} cannot be read ({why})") from None


def read_cached_shard(url: str) -> Iterator[dict[str, Any]]:
    for s in iter_tar(url, CACHE_MEMBERS):
        try:
            yield decode_cached(s)
        except DataError as e:
            raise DataError(f"{url}: {e}") from None
