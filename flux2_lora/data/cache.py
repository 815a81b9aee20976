"""The cache stage: the text encoder and the VAE run once over the dataset, then are freed.

Output is a folder of webdataset shards that training reads as its one data path:

  index.json              settings the cache was made with + every shard's samples (key, bucket, and the byte
                          offset and size of the sample's tensors in its shard: training reads by position)
  train-NNNNNN.tar        samples: <key>.safetensors (latents, [latents_flip], prompt_embeds) + <key>.json
  val-NNNNNN.tar          the held-out samples for the fixed-seed validation loss
  extra.safetensors       the empty-prompt embedding (caption dropout, negative prompt)
  prompts-<hash>.safetensors  sample-prompt embeddings for one list of validation prompts

The settings (model, text layers, sequence length, resolution, buckets, flips, holdout, text encoder quantization)
are stored and checked: a cache made with other settings is refused with the difference named, never silently reused.
Pass 1 runs the text encoder over the distinct captions (embeddings spill to a temp folder, so memory
stays flat); pass 2 runs the VAE over the images and writes the shards.

The text encoder (24 B for FLUX.2-dev) runs where `model.text_encoder_device` says: `auto` takes the GPU when its
weights and a margin fit in the free memory (sizes read from the safetensors headers, nothing loaded), else the CPU.
Where it ran is not part of the cache settings (the same weights at the same dtype give the same embeddings up to
kernel rounding); `model.text_encoder_quantize` is, because int8/nf4 weights change the embeddings (by ~1% here).

A cache is checked against its index.json whenever it is opened (`read_index`), at a cost that does not grow with the
samples' sizes: the index's types and keys; every shard exists; each sample's bytes lie inside its shard, at a tar
data boundary, without overlapping another's; the first and last sample of each shard and the first of each bucket
have the tar header and safetensors shapes (latents C x h/16 x w/16, prompt_embeds max_sequence_length x D) their
entry claims, and every other sample of a bucket has that sample's byte size; no tar member lies before a shard's
first listed sample, after its last or in a gap wide enough for one (so the shard holds the samples listed, no more);
extra.safetensors has the embedding of the settings' shape. `flux2-lora data validate CACHE` (`audit_cache`) reads
every tar header and every sample's safetensors header instead. A mismatch is a `CacheCorrupt` (a DataError): one
line naming the cache folder, the file, the sample and the reason, and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save, save_file
from tqdm.auto import tqdm

from ..flow import encode_images, encode_prompts
from ..memory import TEXT_BATCH, GiB, text_encoder_bytes
from ..model import ModelError, ModelSource, free, load_text_encoder, load_vae
from ..quant import check_quantize
from .buckets import MULTIPLE, bucket_sizes, nearest_bucket, resize_to_bucket, to_tensor
from .folder import DataError
from .shards import CACHE_MEMBERS, RawSample, iter_tar, open_image

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Settings added after version 1, with the value that caches made before them were made with. A setting at its
# default is left out of index.json, so those caches keep their digest and stay valid.
SETTING_DEFAULTS: dict[str, Any] = {"text_encoder_quantize": "none"}


def full_caption(caption: str, trigger: str | None) -> str:
    """Caption with the trigger word in front (once)."""
    if not trigger or caption.split(" ", 1)[0] == trigger:
        return caption
    return f"{trigger} {caption}".strip()


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

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["text_layers"] = list(self.text_layers)
        d["buckets"] = [list(b) for b in self.buckets]
        return {k: v for k, v in d.items() if k not in SETTING_DEFAULTS or v != SETTING_DEFAULTS[k]}

    def digest(self, source: str) -> str:
        return hashlib.sha256(json.dumps([self.to_json(), source], sort_keys=True).encode()).hexdigest()[:16]


def settings_for(src: ModelSource, recipe: Any) -> CacheSettings:
    d = recipe.data
    return CacheSettings(
        model=str(src.path.resolve()),
        family=src.family,
        text_layers=tuple(src.text_layers),
        max_sequence_length=recipe.model.max_sequence_length,
        resolution=d.resolution,
        buckets=tuple(bucket_sizes(d.resolution, d.buckets, d.bucket_aspects)),
        random_flip=d.random_flip,
        trigger=d.trigger or "",
        holdout=d.holdout,
        seed=recipe.training.seed,
        text_encoder_quantize=getattr(recipe.model, "text_encoder_quantize", "none"),
    )


@dataclass
class ShardInfo:
    url: str
    samples: list[tuple[str, int, int]]  # key, bucket width, bucket height
    # Where each sample's <key>.safetensors member lies in the tar: (byte offset of its data, size in bytes).
    offsets: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class SampleEntry:
    """One cached training sample, addressable without reading its shard: `size` bytes at `offset` of `url`."""

    url: str
    key: str
    bucket: tuple[int, int]
    offset: int
    size: int


class SampleTable:
    """Every training sample of a cache as compact arrays (a million samples take tens of MB, not a list of
    objects per sample); `table[i]` is sample i's SampleEntry."""

    def __init__(self, shards: list[ShardInfo], root: Path):
        self.urls = [s.url for s in shards]
        self.keys: list[str] = []
        self.buckets: list[tuple[int, int]] = []  # distinct bucket sizes; `bucket` indexes them
        shard, bucket, offset, size = [], [], [], []
        ids: dict[tuple[int, int], int] = {}
        for j, info in enumerate(shards):
            offsets = info.offsets if info.offsets is not None else member_offsets(root / info.url, info.samples)
            for (key, w, h), (o, n) in zip(info.samples, offsets, strict=True):
                if (w, h) not in ids:
                    ids[(w, h)] = len(self.buckets)
                    self.buckets.append((w, h))
                self.keys.append(key)
                shard.append(j)
                bucket.append(ids[(w, h)])
                offset.append(o)
                size.append(n)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.bucket = np.asarray(bucket, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> SampleEntry:
        return SampleEntry(
            self.urls[self.shard[i]], self.keys[i], self.buckets[self.bucket[i]], int(self.offset[i]), int(self.size[i])
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


# ------------------------------------------------------------------------------------------- integrity


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
}


def _rows_ok(rows: list[Any], n: int) -> bool:
    """Every sample row is [key, w, h] (n=3) or [key, w, h, offset, size] (n=5) with a non-empty key and integers."""
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
    form = "[key, width, height, offset, size]" if n == 5 else "[key, width, height]"
    if type(x) is not list or len(x) != n:
        return f"expected {form} like the other samples of the shard, got {_kind(x)}" + (
            f" of {len(x)} values" if type(x) is list else ""
        )
    if type(x[0]) is not str or not x[0]:
        return f"the key must be a non-empty string, got {_kind(x[0])}"
    names = ["width", "height", "offset", "size"]
    bad = next(j for j in range(1, n) if not _is_int(x[j]))
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
            n = 5 if type(rows[0]) is list and len(rows[0]) == 5 else 3
            if not _rows_ok(rows, n):
                k = next(k for k, x in enumerate(rows) if not _rows_ok([x], n))
                raise bad(f"{where}.samples[{k}]", _row_problem(rows[k], n))
            samples = [(x[0], x[1], x[2]) for x in rows]
            infos.append(ShardInfo(url, samples, [(x[3], x[4]) for x in rows] if n == 5 else None))
        parts[part] = infos
    return CacheIndex(root=root, settings=st, train=parts["train"], val=parts["val"])


def read_index(root: Path, check: bool = True) -> CacheIndex:
    """The cache's index, checked against its files (see the module docstring; `check=False`: its JSON only)."""
    path = root / "index.json"
    if not path.exists():
        raise DataError(f"{root}: not a flux2-lora cache (no index.json); make one with `flux2-lora data cache`")
    try:
        d = json.loads(path.read_bytes())
    except OSError as e:
        raise CacheCorrupt(root, "index.json", f"cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: truncated, random bytes
        raise CacheCorrupt(root, "index.json", f"not valid JSON ({_reason(e)})") from None
    index = _index_from_json(root, d)
    if check:
        check_cache(index)
    return index


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


# safetensors dtypes and their sizes in bytes
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_BLOCK = 512  # tar block
# Between the end of one sample's tensors and the next's: at least the next sample's .json member (a header and a
# data block) and the header of its .safetensors member (webdataset writes a sample's members sorted by name).
_MIN_GAP = 3 * _BLOCK
_HEAD = 4096  # bytes of a sample's safetensors member read with its tar header (its safetensors header is ~200)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split of a member name into key and extension


def _align(n: Any) -> Any:
    return (n + _BLOCK - 1) // _BLOCK * _BLOCK


class _Bad(Exception):
    """What is wrong with a file or member (the message), raised inside the checks and turned into CacheCorrupt."""


class _KeyedBad(_Bad):
    """What is wrong, about the sample `key` (which the caller may not know)."""

    def __init__(self, key: str, why: str):
        super().__init__(why)
        self.key = key


class _Reader:
    """Positioned reads of one file through a small window (tar headers lie close together)."""

    def __init__(self, fd: int, size: int, window: int = 8192):
        self.fd, self.size, self.window = fd, size, window
        self.base, self.buf = 0, b""
        self.reads = 0

    def read(self, offset: int, n: int) -> bytes:
        if not (self.base <= offset and offset + n <= self.base + len(self.buf)):
            self.reads += 1
            if n > self.window:
                return os.pread(self.fd, n, offset)
            self.base, self.buf = offset, os.pread(self.fd, self.window, offset)
        return self.buf[offset - self.base : offset - self.base + n]

    def at(self, base: int) -> Callable[[int, int], bytes]:
        """Reads relative to `base` (a member's data)."""
        return lambda offset, n: self.read(base + offset, n)


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header (`<length> <key>=<value>\\n` each)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        sp = data.find(b" ", pos)
        try:
            length = int(data[pos:sp]) if sp > pos else 0
        except ValueError:
            length = 0
        if length <= sp - pos:
            raise _Bad("a pax header with an unreadable record")
        key, _, value = data[sp + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


_REGULAR = (b"0", b"\0", b"7")  # tar type flags of a file's data
_PAX, _GLOBAL, _SOLARIS, _LONGNAME = b"x", b"g", b"X", b"L"


def _tar_header(block: bytes, pos: int) -> tuple[str, bytes, int]:
    """(name, type flag, size) of the tar header block at byte `pos`; _Bad when it is not one (its checksum).

    tarfile.TarInfo.frombuf less the fields nobody here reads: 5 us instead of 33 (opening a cache parses ~6 per
    shard)."""
    if len(block) < _BLOCK:
        raise _Bad(f"the file ends inside the tar header at byte {pos} (truncated)")
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        raw = block[124:136]
        size = int.from_bytes(raw[1:], "big") if raw[0] & 0x80 else int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Bad(f"no valid tar header at byte {pos}") from None
    if stored != sum(block) - sum(block[148:156]) + 8 * 32:
        raise _Bad(f"no valid tar header at byte {pos} (bad checksum)")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000" and block[345] != 0:  # POSIX ustar: a name prefix
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), block[156:157], size


def _members(r: _Reader, start: int) -> Iterator[tuple[str, int, int, int]]:
    """(name, header offset, data offset, size) of the tar members whose headers lie from `start` on, up to the end
    of the archive (a zero block or the end of the file). _Bad for a block that is not a tar header."""
    pos, pax = start, {}
    while pos + _BLOCK <= r.size:
        block = r.read(pos, _BLOCK)
        if block == bytes(_BLOCK):
            return
        name, kind, size = _tar_header(block, pos)
        data = pos + _BLOCK
        if kind in (_PAX, _GLOBAL, _SOLARIS, _LONGNAME):
            if data + size > r.size:
                raise _Bad(f"the tar header at byte {pos} runs past the end of the file (truncated)")
            if kind in (_PAX, _SOLARIS):
                pax = _pax(r.read(data, size))
            elif kind == _LONGNAME:
                pax = {"path": r.read(data, size).rstrip(b"\0").decode("utf-8", "surrogateescape")}
            pos = data + _align(size)
            continue
        try:
            size = int(pax.get("size", size))
        except ValueError:
            raise _Bad(f"the tar header at byte {pos} has an unreadable size") from None
        name = pax.get("path", name)
        pax = {}
        yield name, pos, data, size
        pos = data + _align(size)
    if pos < r.size or pax:
        raise _Bad(f"the file ends at byte {r.size}, inside a tar member's headers (truncated)")


def _key_ext(name: str) -> tuple[str, str]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else (name, "")


def _header(read: Callable[[int, int], bytes], total: int) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) from the header of a safetensors file or member of `total` bytes, checked as
    safetensors checks it (sizes, contiguous data filling the rest exactly). _Bad says what is wrong."""
    if total < 10:
        raise _Bad(f"{total} bytes: too few for safetensors")
    n = int.from_bytes(read(0, 8), "little")
    if n < 2 or 8 + n > total:
        raise _Bad(f"its safetensors header length ({n} bytes) does not fit in its {total} bytes")
    raw = read(8, n)
    if len(raw) < n:
        raise _Bad("its safetensors header is cut short")
    try:
        h = json.loads(raw)
    except ValueError as e:
        raise _Bad(f"its safetensors header is not JSON ({_reason(e)})") from None
    if type(h) is not dict:
        raise _Bad("its safetensors header is not a JSON object")
    out: dict[str, tuple[str, list[int]]] = {}
    spans = []
    for name, t in h.items():
        if name == "__metadata__":
            continue
        dtype, shape, span = (t.get("dtype"), t.get("shape"), t.get("data_offsets")) if type(t) is dict else (0, 0, 0)
        if (
            dtype not in _DTYPE_BYTES
            or type(shape) is not list
            or not all(_is_int(s) and s >= 0 for s in shape)
            or type(span) is not list
            or len(span) != 2
            or not all(_is_int(s) for s in span)
        ):
            raise _Bad(f"tensor {name!r} has an unreadable safetensors header entry")
        need = _DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
        if span[1] - span[0] != need:
            raise _Bad(f"tensor {name!r} ({dtype} {shape}) takes {need} bytes, its header gives it {span[1] - span[0]}")
        out[name] = (dtype, shape)
        spans.append(span)
    pos = 0
    for a, b in sorted(spans):
        if a != pos:
            raise _Bad("its tensors' data overlap or leave a gap")
        pos = b
    if 8 + n + pos != total:
        raise _Bad(f"its header accounts for {8 + n + pos} bytes, it has {total} (truncated or padded)")
    return out


def _file_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensors of a safetensors file, from its header alone (_Bad for a missing, truncated or foreign file)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            return _header(lambda o, n: os.pread(f.fileno(), n, o), size)
    except FileNotFoundError:
        raise _Bad("the file is missing") from None
    except OSError as e:
        raise _Bad(f"cannot be read ({e.strerror or e})") from None


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "a scalar"


@dataclass
class _Expect:
    """What every sample of one cache holds, from its settings, extra.safetensors and the first sample checked."""

    seq: int
    flip: bool
    buckets: set[tuple[int, int]]
    dim: int | None = None  # prompt embedding width (extra.safetensors)
    channels: int | None = None
    dtypes: dict[str, str] = field(default_factory=dict)
    sizes: dict[tuple[int, int], tuple[int, str]] = field(default_factory=dict)  # bucket -> (bytes, a sample's key)

    @classmethod
    def of(cls, index: CacheIndex) -> _Expect:
        st = index.settings
        return cls(st["max_sequence_length"], st["random_flip"], {(b[0], b[1]) for b in st["buckets"]})

    def tensors(self, tensors: dict[str, tuple[str, list[int]]], w: int, h: int) -> None:
        """_Bad when a sample's tensors are not those of a (w, h) sample of this cache."""
        want = {"latents", "prompt_embeds"} | ({"latents_flip"} if self.flip else set())
        if set(tensors) != want:
            raise _Bad(f"it holds tensors {sorted(tensors)}, a sample of this cache {sorted(want)}")
        lat = tensors["latents"][1]
        if len(lat) != 3 or lat[1:] != [h // MULTIPLE, w // MULTIPLE]:
            found = f" (a {lat[2] * MULTIPLE}x{lat[1] * MULTIPLE} sample)" if len(lat) == 3 else ""
            raise _Bad(
                f"index.json lists it as {w}x{h}, whose latents are C x {h // MULTIPLE} x {w // MULTIPLE}; "
                f"its latents are {_shape(lat)}{found}"
            )
        if self.channels is None:
            self.channels = lat[0]
        if lat[0] != self.channels:
            raise _Bad(f"its latents have {lat[0]} channels, the other samples' {self.channels}")
        if self.flip and tensors["latents_flip"][1] != lat:
            raise _Bad(f"its latents_flip are {_shape(tensors['latents_flip'][1])}, its latents {_shape(lat)}")
        emb = tensors["prompt_embeds"][1]
        if len(emb) != 2 or emb[0] != self.seq or (self.dim is not None and emb[1] != self.dim):
            want_emb = f"{self.seq}x{self.dim}" if self.dim is not None else f"{self.seq} x D"
            raise _Bad(
                f"its prompt_embeds are {_shape(emb)}, this cache's are {want_emb} (settings.max_sequence_length "
                "x the width of extra.safetensors)"
            )
        for name, (dtype, _) in tensors.items():
            if self.dtypes.setdefault(name, dtype) != dtype:
                raise _Bad(f"its {name} are {dtype}, the other samples' {self.dtypes[name]}")

    def embedding(self, shape: list[int], what: str) -> None:
        if len(shape) != 2 or shape[0] != self.seq or (self.dim is not None and shape[1] != self.dim):
            want = f"{self.seq}x{self.dim}" if self.dim is not None else f"{self.seq} x D"
            raise _Bad(f"{what} is {_shape(shape)}, this cache's prompt embeddings are {want}")
        self.dim = shape[1]


def _check_extra(root: Path, expect: _Expect) -> None:
    try:
        tensors = _file_header(root / "extra.safetensors")
        if "empty" not in tensors:
            raise _Bad("has no 'empty' tensor (the empty-prompt embedding)")
        expect.embedding(tensors["empty"][1], "its 'empty' embedding")
    except _Bad as e:
        raise CacheCorrupt(root, "extra.safetensors", str(e)) from None


def _check_member(r: _Reader, key: str, w: int, h: int, offset: int, size: int, expect: _Expect) -> None:
    """One sample's tar header and safetensors header against its index entry, in one positioned read."""
    head = r.read(offset - _BLOCK, _BLOCK + min(size, _HEAD))
    try:
        found, kind, found_size = _tar_header(head[:_BLOCK], offset - _BLOCK)
    except _Bad:
        raise _Bad(f"no tar member's data starts at its offset {offset} (index.json)") from None
    name = f"{key}.safetensors"
    simple = name.isascii() and len(name) <= 100  # else the tar header holds a shortened name (pax holds the rest)
    if kind not in _REGULAR or (simple and found != name):
        raise _Bad(f"the tar member at its offset {offset} (index.json) is {found!r}, not {name!r}")
    if found_size != size:
        raise _Bad(f"index.json gives it {size} bytes, its tar member has {found_size}")

    def read(o: int, n: int) -> bytes:
        return head[_BLOCK + o : _BLOCK + o + n] if o + n <= len(head) - _BLOCK else r.read(offset + o, n)

    expect.tensors(_header(read, size), w, h)


def _check_unlisted(r: _Reader, keys: list[str], off: np.ndarray, end: np.ndarray, order: np.ndarray) -> None:
    """No sample in the shard is missing from its index entries: none before the first (in shard order), none after
    the last, none in a gap wide enough to hold one. (key, _Bad) raised as CacheCorrupt by the caller."""

    def walk(start: int, allowed: set[str], stop_key: str | None, stop: int, where: str) -> None:
        for name, hdr, data, _size in _members(r, start):
            k, ext = _key_ext(name)
            if stop_key is not None and k == stop_key and ext == "safetensors":
                if data != stop:
                    raise _KeyedBad(stop_key, f"its tar member's data starts at {data}, index.json says {stop}")
                return
            if stop_key is not None and hdr >= stop:
                break
            if k not in allowed:
                raise _KeyedBad(k, f"in the shard {where} but not in index.json")
        if stop_key is not None:
            raise _KeyedBad(stop_key, f"no tar member's data starts at its offset {stop} (index.json)")

    first, last = int(order[0]), int(order[-1])
    walk(0, {keys[first]}, keys[first], int(off[first]), f"before {keys[first]!r}")
    after = f"after {keys[last]!r}, the last of its {len(keys)} samples in index.json"
    walk(int(_align(end[last])), {keys[last]}, None, 0, after)
    o, e = off[order], _align(end[order])
    wide = max(2 * _BLOCK * 8, int(np.min(end - off)) // 2)  # a normal gap is ~7 blocks (caption json + headers)
    for g in np.flatnonzero(o[1:] - e[:-1] >= wide):
        a, b = int(order[g]), int(order[g + 1])
        walk(int(e[g]), {keys[a], keys[b]}, keys[b], int(off[b]), f"between {keys[a]!r} and {keys[b]!r}")


def _check_shard(
    root: Path,
    url: str,
    keys: list[str],
    ids: np.ndarray,
    buckets: list[tuple[int, int]],
    off: np.ndarray,
    size: np.ndarray,
    expect: _Expect,
) -> int:
    """The open-time checks of one shard's index entries (module docstring): sample i has bucket buckets[ids[i]]
    and lies at bytes off[i] .. off[i] + size[i]. Returns the number of positioned reads it took."""
    path = root / url

    def corrupt(i: int, why: str) -> CacheCorrupt:
        return CacheCorrupt(root, url, why, keys[i])

    try:
        file_size = os.stat(path).st_size
    except FileNotFoundError:
        why = f"the shard file is missing (index.json lists {len(keys)} samples in it)"
        raise CacheCorrupt(root, url, why) from None
    except OSError as e:
        raise CacheCorrupt(root, url, f"cannot be read ({e.strerror or e})") from None
    present = np.flatnonzero(np.bincount(ids, minlength=len(buckets)))
    first_of = {int(b): int(np.argmax(ids == b)) for b in present}  # bucket id -> its first sample here
    for b, i in first_of.items():
        if buckets[b] not in expect.buckets:
            w, h = buckets[b]
            raise corrupt(i, f"index.json lists it as {w}x{h}, not one of the cache's buckets (settings.buckets)")
    bad = np.flatnonzero((off < _BLOCK) | (off % _BLOCK != 0))
    if bad.size:
        i = int(bad[0])
        raise corrupt(i, f"index.json gives it offset {off[i]}, where no tar member's data can start")
    bad = np.flatnonzero(size < 10)
    if bad.size:
        raise corrupt(int(bad[0]), f"index.json gives it {size[bad[0]]} bytes, too few for its tensors")
    end = off + size
    bad = np.flatnonzero(end > file_size)
    if bad.size:
        i = int(bad[0])
        raise corrupt(
            i,
            f"index.json puts it at bytes {off[i]}..{end[i]}, past the end of the shard ({file_size} bytes): the "
            "shard is truncated or index.json lists samples it does not hold",
        )
    # Shard order (index.json lists samples in it: no sort then).
    order = np.arange(len(off)) if np.all(off[1:] > off[:-1]) else np.argsort(off, kind="stable")
    gaps = off[order][1:] - _align(end[order])[:-1]
    bad = np.flatnonzero(gaps < _MIN_GAP)
    if bad.size:
        a, b = int(order[bad[0]]), int(order[bad[0] + 1])
        what = "the same bytes as" if off[a] == off[b] else "bytes overlapping those of"
        raise corrupt(b, f"index.json gives it {what} sample {keys[a]!r} (offsets {off[b]} and {off[a]})")
    # The samples whose headers are read: the first and last in the shard, and the first of each bucket new here.
    check = {int(order[0]), int(order[-1])} | {i for b, i in first_of.items() if buckets[b] not in expect.sizes}
    with open(path, "rb") as f:
        r = _Reader(f.fileno(), file_size)
        for i in sorted(check):
            w, h = buckets[ids[i]]
            try:
                _check_member(r, keys[i], w, h, int(off[i]), int(size[i]), expect)
            except _Bad as e:
                raise corrupt(i, str(e)) from None
            expect.sizes.setdefault((w, h), (int(size[i]), f"{url}, {keys[i]!r}"))
        for b in first_of:
            (w, h), (want, like) = buckets[b], expect.sizes[buckets[b]]
            bad = np.flatnonzero((ids == b) & (size != want))
            if bad.size:
                i = int(bad[0])
                why = f"index.json gives it {size[i]} bytes, a {w}x{h} sample of this cache has {want} ({like})"
                raise corrupt(i, why)
        try:
            _check_unlisted(r, keys, off, end, order)
        except _KeyedBad as e:
            raise CacheCorrupt(root, url, str(e), e.key) from None
        except _Bad as e:
            raise CacheCorrupt(root, url, f"{e} (the shard is damaged)") from None
        return r.reads


def check_cache(index: CacheIndex) -> int:
    """The open-time checks of a cache against its index.json (module docstring); CacheCorrupt for the first problem.

    Caches made before offsets were recorded get theirs from the tar headers first (a scan of each shard's headers).
    Returns the number of positioned reads it took (for the tests' cost measure)."""
    root = index.root
    expect = _Expect.of(index)
    _check_extra(root, expect)
    for info in index.train + index.val:
        if info.offsets is None:
            info.offsets = member_offsets(root / info.url, info.samples)
    table = index.samples()
    starts = np.cumsum([0] + [len(s.samples) for s in index.train])
    reads = 0
    for j, info in enumerate(index.train):
        a, b = int(starts[j]), int(starts[j + 1])
        keys = table.keys[a:b]
        reads += _check_shard(
            root, info.url, keys, table.bucket[a:b], table.buckets, table.offset[a:b], table.size[a:b], expect
        )
    for part, infos in (("train", index.train), ("val", index.val)):
        keys = table.keys if part == "train" else [k for info in infos for k, _, _ in info.samples]
        if len(set(keys)) != len(keys):
            seen: dict[str, str] = {}
            for info in infos:
                for k, _, _ in info.samples:
                    if k in seen:
                        raise CacheCorrupt(
                            root, info.url, f"listed twice in index.json's {part} (also in {seen[k]})", k
                        )
                    seen[k] = info.url
    for info in index.val:
        assert info.offsets is not None
        buckets = sorted({(w, h) for _, w, h in info.samples})
        ids = np.asarray([buckets.index((w, h)) for _, w, h in info.samples], dtype=np.int64)
        off = np.asarray([o for o, _ in info.offsets], dtype=np.int64)
        size = np.asarray([n for _, n in info.offsets], dtype=np.int64)
        reads += _check_shard(root, info.url, [k for k, _, _ in info.samples], ids, buckets, off, size, expect)
    return reads


@dataclass(frozen=True)
class CacheProblem:
    """One mismatch `audit_cache` found: the file (relative to the cache folder), the sample (or None), the reason."""

    file: str
    key: str | None
    reason: str


def audit_cache(root: Path) -> tuple[list[CacheProblem], int, int]:
    """Every problem of a cache folder: index.json against every tar header and every sample's safetensors and json
    members (`flux2-lora data validate CACHE`). Returns (problems, samples listed, samples without a problem)."""
    try:
        index = read_index(root, check=False)
    except CacheCorrupt as e:
        return [CacheProblem(e.file, e.key, e.reason)], 0, 0
    problems: list[CacheProblem] = []
    expect = _Expect.of(index)
    try:
        _check_extra(root, expect)
    except CacheCorrupt as e:
        problems.append(CacheProblem(e.file, e.key, e.reason))
    listed = flagged = 0
    for part, infos in (("train", index.train), ("val", index.val)):
        seen: dict[str, str] = {}
        for info in infos:
            found = _audit_shard(root, info, part, expect, seen)
            problems += found
            listed += len(info.samples)
            keys = {k for k, _, _ in info.samples}
            whole = any(p.key is None and p.file == info.url and "missing" in p.reason for p in found)
            flagged += len(keys) if whole else len({p.key for p in found if p.key in keys})
    for path in sorted(root.glob("prompts-*.safetensors")):
        try:
            tensors = _file_header(path)
            names = [f"prompt.{j}" for j in range(len(tensors))]
            if sorted(tensors) != sorted(names):
                raise _Bad(f"holds tensors {sorted(tensors)}, not prompt.0 .. prompt.{len(tensors) - 1}")
            for name in names:
                expect.embedding(tensors[name][1], name)
        except _Bad as e:
            problems.append(CacheProblem(path.name, None, f"{e} (delete it: the next run computes it again)"))
    return problems, listed, listed - flagged


def _audit_shard(root: Path, info: ShardInfo, part: str, expect: _Expect, seen: dict[str, str]) -> list[CacheProblem]:
    """Every problem of one shard: its tar headers read in order, each listed sample's members checked."""
    url, out = info.url, []

    def add(key: str | None, why: str) -> None:
        out.append(CacheProblem(url, key, _one_line(why)))

    path = root / url
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        add(None, f"the shard file is missing (index.json lists {len(info.samples)} samples in it)")
        return out
    except OSError as e:
        add(None, f"the shard file is missing or unreadable ({e.strerror or e})")
        return out
    with f:
        r = _Reader(f.fileno(), os.fstat(f.fileno()).st_size)
        members: dict[str, dict[str, tuple[int, int]]] = {}
        cut = ""
        try:
            for name, _, data, size in _members(r, 0):
                key, ext = _key_ext(name)
                if data + size > r.size:
                    raise _Bad(f"the file ends inside tar member {name!r} ({r.size} bytes, truncated)")
                if ext not in CACHE_MEMBERS:
                    add(key, f"tar member {name!r} is not a cache member (.safetensors or .json)")
                    continue
                members.setdefault(key, {})[ext] = (data, size)
        except _Bad as e:
            add(None, f"{e}: the shard is damaged from there on")
            cut = " (which is damaged or truncated before it)"
        keys = {k for k, _, _ in info.samples}
        for i, (key, w, h) in enumerate(info.samples):
            if key in seen:
                add(key, f"listed twice in index.json's {part} (also in {seen[key]})")
                continue
            seen[key] = url
            if (w, h) not in expect.buckets:
                add(key, f"index.json lists it as {w}x{h}, not one of the cache's buckets (settings.buckets)")
                continue
            m = members.get(key, {})
            if "safetensors" not in m:
                add(key, f"listed in index.json but not in the shard{cut}")
                continue
            data, size = m["safetensors"]
            if info.offsets is not None and info.offsets[i] != (data, size):
                o, n = info.offsets[i]
                add(key, f"index.json puts it at bytes {o}..{o + n}, the shard at {data}..{data + size}")
                continue
            try:
                expect.tensors(_header(r.at(data), size), w, h)
            except _Bad as e:
                add(key, str(e))
                continue
            if "json" not in m:
                add(key, "has no .json member (its caption and bucket)")
                continue
            try:
                meta = json.loads(r.read(*m["json"]))
            except ValueError:
                meta = None
            bucket = meta.get("bucket") if type(meta) is dict and type(meta.get("caption")) is str else None
            if type(bucket) is not list or len(bucket) != 2:
                add(key, 'its .json member is not {"bucket": [width, height], "caption": "..."}')
            elif bucket != [w, h]:
                add(key, f"index.json lists it as {w}x{h}, its .json member says {bucket[0]}x{bucket[1]}")
        unlisted = [k for k in members if k not in keys]
        for key in unlisted:
            add(key, "in the shard but not in index.json")
        n_shard = sum("safetensors" in m for m in members.values())
        if n_shard != len(info.samples):
            add(None, f"index.json lists {len(info.samples)} samples in it, the shard holds {n_shard}")
    return out


def decode_cached(sample: dict[str, Any]) -> dict[str, Any]:
    """A cached-shard sample -> {'key', 'bucket', 'caption', 'latents', 'prompt_embeds', ['latents_flip']}."""
    from safetensors.torch import load

    key = sample.get("__key__")
    try:
        tensors = load(sample["safetensors"])
        meta = json.loads(sample["json"])
        return {"key": key, "bucket": tuple(meta["bucket"]), "caption": meta["caption"], **tensors}
    except Exception as e:  # noqa: BLE001 - a damaged member: a data error naming the sample
        why = f"no {e} member" if isinstance(e, KeyError) else _reason(e)
        raise DataError(f"sample {key!r} cannot be read ({why})") from None


def read_cached_shard(url: str) -> Iterator[dict[str, Any]]:
    for s in iter_tar(url, CACHE_MEMBERS):
        try:
            yield decode_cached(s)
        except DataError as e:
            raise DataError(f"{url}: {e}") from None


def dataset_source(spec: str, instance_prompt: str | None) -> tuple[Callable[[], Iterator[RawSample]], str]:
    """(samples, source id) for a folder or raw-shard spec; the id changes when any file does."""
    from .folder import scan_folder
    from .sample import resolve_dataset
    from .shards import expand_spec, is_shard_spec, iter_folder_samples, iter_raw_samples

    if is_shard_spec(spec):
        stats = []
        for u in expand_spec(spec):  # local shards by size and mtime, remote ones by URL
            p = Path(u)
            stats.append(f"{u}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else u)
        return (lambda: iter_raw_samples(spec, instance_prompt)), json.dumps([spec, stats])
    root = resolve_dataset(spec)
    items = scan_folder(root, instance_prompt)
    ident = json.dumps([[str(i.image), i.image.stat().st_size, i.image.stat().st_mtime_ns, i.caption] for i in items])
    return (lambda: iter_folder_samples(items, root)), ident


def gpu_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device in bytes, as the driver reports it (tests replace this)."""
    return int(torch.cuda.mem_get_info(device)[0])


def place_text_encoder(
    choice: str, src: ModelSource, device: torch.device, dtype: torch.dtype, quantize: str, tokens: int
) -> torch.device:
    """Where the cache stage runs the text encoder (`model.text_encoder_device`), decided before anything loads.

    `auto` on a GPU: the GPU when weights x 1.05 + activations of one batch (memory.text_encoder_bytes) + 1 GiB fit
    in its free memory, else the CPU (one warning line). nf4 runs only on a GPU. Without a GPU: the CPU."""
    if device.type != "cuda":
        if choice == "gpu":
            raise ModelError("model.text_encoder_device: gpu, but there is no CUDA GPU here; use auto or cpu")
        return device
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "gpu" and quantize != "nf4":
        return device
    weights, act = text_encoder_bytes(src.path / "text_encoder", dtype.itemsize, quantize, TEXT_BATCH, tokens)
    need, free_now = 1.05 * weights + act + GiB, gpu_free_bytes(device)
    if need <= free_now or choice == "gpu":
        return device
    kind = f"{quantize} linears" if quantize != "none" else str(dtype).removeprefix("torch.")
    why = (
        f"the text encoder needs ~{need / GiB:.1f} GiB ({weights / GiB:.1f} GiB of {kind} weights, activations and "
        f"a reserve), the GPU has {free_now / GiB:.1f} GiB free"
    )
    if quantize == "nf4":  # bitsandbytes 4-bit runs only on the GPU: try there
        log.warning("model.text_encoder_quantize: nf4 runs on the GPU although %s; it may run out of memory", why)
        return device
    hint = "model.text_encoder_quantize: int8 or nf4 may keep it on the GPU" if quantize == "none" else "nf4 is smaller"
    log.warning("model.text_encoder_device: auto: %s, so it runs on the CPU (slow; %s)", why, hint)
    return torch.device("cpu")


def open_text_encoder(
    src: ModelSource,
    dtype: torch.dtype,
    run_on: torch.device,
    quantize: str = "none",
    force_cpu_loading: bool = False,
) -> tuple[Any, Any]:
    """The text encoder and tokenizer on `run_on`, quantized while loading (nf4 loads straight onto the GPU)."""
    load_on = run_on if quantize == "nf4" or not force_cpu_loading else torch.device("cpu")
    text_encoder, tokenizer = load_text_encoder(src, dtype, None if load_on.type == "cpu" else load_on, quantize)
    if quantize != "nf4":  # bitsandbytes models cannot be moved, and are already there
        text_encoder.to(run_on)
    return text_encoder, tokenizer


def build_cache(
    out: Path,
    settings: CacheSettings,
    samples: Callable[[], Iterator[RawSample]],
    device: torch.device,
    text_dtype: torch.dtype,
    shard_size: int = 1000,
    force_cpu_loading: bool = False,
    text_encoder_device: str = "auto",
) -> CacheIndex:
    """Encode every sample once into cached shards under `out` (written to out.tmp, then renamed).

    `samples` is called twice (pass 1: captions, pass 2: images) and must yield the same order both times.
    The text encoder runs where `text_encoder_device` (auto | gpu | cpu) places it, quantized as the settings say.
    """
    if (out / "index.json").exists():
        index = read_index(out)
        check_settings(index, settings)
        return index
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "embeds").mkdir(parents=True)
    src = ModelSource(Path(settings.model), settings.family, settings.text_layers, "")
    load_on = None if force_cpu_loading else device
    # Placement and quantization are decided (and refused in one line) before anything is read or loaded.
    quantize = settings.text_encoder_quantize
    text_on = place_text_encoder(text_encoder_device, src, device, text_dtype, quantize, settings.max_sequence_length)
    check_quantize(quantize, text_on, "model.text_encoder_quantize")

    # Pass 1: keys and captions; the text encoder embeds each distinct caption once (spilled to disk).
    keys: list[str] = []
    captions: dict[str, str] = {}
    for s in tqdm(samples(), desc="cache: scan", unit="img", leave=False):
        if s.key in captions:
            raise DataError(f"{s.key}: duplicate sample key in the dataset")
        keys.append(s.key)
        captions[s.key] = full_caption(s.caption, settings.trigger or None)
    if not keys:
        raise DataError("dataset: no samples")
    unique = sorted(set(captions.values()) | {""})
    text_encoder, tokenizer = open_text_encoder(src, text_dtype, text_on, quantize, force_cpu_loading)
    for j in tqdm(range(0, len(unique), TEXT_BATCH), desc="cache: prompts", unit="batch", leave=False):
        chunk = unique[j : j + TEXT_BATCH]
        out_emb = encode_prompts(
            src.family, text_encoder, tokenizer, chunk, src.text_layers, settings.max_sequence_length
        )
        for text, e in zip(chunk, out_emb, strict=True):
            save_file({"prompt_embeds": e.to("cpu").contiguous()}, str(tmp / "embeds" / f"{_h(text)}.safetensors"))
    free(text_encoder)
    del text_encoder, tokenizer
    save_file(
        {"empty": load_file(str(tmp / "embeds" / f"{_h('')}.safetensors"))["prompt_embeds"]},
        str(tmp / "extra.safetensors"),
    )

    # Held-out keys: a seeded choice over the sorted keys (independent of source order).
    holdout = (
        set(random.Random(settings.seed).sample(sorted(keys), settings.holdout))
        if 0 < settings.holdout < len(keys)
        else set()
    )

    # Pass 2: the VAE encodes every image at its bucket; samples go to train or val shards.
    vae = load_vae(src, device=load_on).to(device)
    writers = {"train": _ShardWriter(tmp, "train", shard_size), "val": _ShardWriter(tmp, "val", shard_size)}
    sizes = list(settings.buckets)
    for s in tqdm(samples(), total=len(keys), desc="cache: latents", unit="img", leave=False):
        image = open_image(s.image, name=s.key)
        bucket = nearest_bucket(image.width, image.height, sizes)
        pixels = to_tensor(resize_to_bucket(image, bucket)).unsqueeze(0)
        tensors = {
            "latents": encode_images(vae, pixels)[0].to("cpu").contiguous(),
            "prompt_embeds": load_file(str(tmp / "embeds" / f"{_h(captions[s.key])}.safetensors"))["prompt_embeds"],
        }
        if settings.random_flip:
            tensors["latents_flip"] = encode_images(vae, pixels.flip(-1))[0].to("cpu").contiguous()
        meta = {"bucket": list(bucket), "caption": captions[s.key]}
        writers["val" if s.key in holdout else "train"].write(s.key, tensors, meta, bucket)
    free(vae)
    del vae
    shards = {k: w.close() for k, w in writers.items()}
    if not shards["val"]:  # no holdout: validate on (up to 4 of) the training samples
        first = shards["train"][0]
        _copy_first(tmp / first.url, tmp / "val-000000.tar", 4)
        shards["val"] = [ShardInfo("val-000000.tar", first.samples[:4])]
    shutil.rmtree(tmp / "embeds")
    index_json = {
        "version": CACHE_VERSION,
        "settings": settings.to_json(),
        "train": [_index_entry(tmp, i) for i in shards["train"]],
        "val": [_index_entry(tmp, i) for i in shards["val"]],
    }
    (tmp / "index.json").write_text(json.dumps(index_json))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return read_index(out)


def prompt_embeddings(
    index: CacheIndex,
    prompts: list[str],
    device: torch.device,
    text_dtype: torch.dtype,
    force_cpu_loading: bool = False,
    text_encoder_device: str = "auto",
) -> list[torch.Tensor]:
    """Embeddings of the sample prompts, computed once per prompt list and kept in the cache folder.

    The text encoder is quantized as the cache's settings say (the same encoder as the cached captions)."""
    if not prompts:
        return []
    path = index.root / f"prompts-{_h(json.dumps(prompts))[:16]}.safetensors"
    if not path.exists():
        st = index.settings
        src = ModelSource(Path(st["model"]), st["family"], tuple(st["text_layers"]), "")
        quantize = st.get("text_encoder_quantize", SETTING_DEFAULTS["text_encoder_quantize"])
        text_on = place_text_encoder(text_encoder_device, src, device, text_dtype, quantize, st["max_sequence_length"])
        check_quantize(quantize, text_on, "model.text_encoder_quantize")
        text_encoder, tokenizer = open_text_encoder(src, text_dtype, text_on, quantize, force_cpu_loading)
        emb = encode_prompts(src.family, text_encoder, tokenizer, prompts, src.text_layers, st["max_sequence_length"])
        free(text_encoder)
        tmp = path.with_name("." + path.name)
        save_file({f"prompt.{j}": e.to("cpu").contiguous() for j, e in enumerate(emb)}, str(tmp))
        os.replace(tmp, path)
    try:
        t = load_file(str(path))
        return [t[f"prompt.{j}"] for j in range(len(prompts))]
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, or another list's file: one line naming it
        why = f"has no tensor {e}" if isinstance(e, KeyError) else f"cannot be read ({_reason(e)})"
        raise DataError(
            f"{path}: corrupt sample-prompt embeddings: {why}; delete this file and the next run computes it again"
        ) from None


def _index_entry(root: Path, info: ShardInfo) -> dict[str, Any]:
    """A shard's entry in index.json: each sample as [key, bucket w, bucket h, data offset, size]."""
    offsets = member_offsets(root / info.url, info.samples)
    return {"url": info.url, "samples": [[*x, *o] for x, o in zip(info.samples, offsets, strict=True)]}


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _copy_first(src: Path, dst: Path, n: int) -> None:
    import webdataset as wds

    with wds.TarWriter(str(dst)) as w:
        for k, s in enumerate(iter_tar(str(src), CACHE_MEMBERS)):
            if k >= n:
                break
            w.write({key: v for key, v in s.items() if key in ("__key__", "safetensors", "json")})


class _ShardWriter:
    """Writes `<prefix>-NNNNNN.tar` cached shards of `size` samples and remembers their index entries."""

    def __init__(self, root: Path, prefix: str, size: int):
        self.root, self.prefix, self.size = root, prefix, size
        self.infos: list[ShardInfo] = []
        self.writer: Any = None

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], bucket: tuple[int, int]) -> None:
        import webdataset as wds

        if self.writer is None or len(self.infos[-1].samples) >= self.size:
            if self.writer is not None:
                self.writer.close()
            name = f"{self.prefix}-{len(self.infos):06d}.tar"
            self.infos.append(ShardInfo(name, []))
            self.writer = wds.TarWriter(str(self.root / name))
        self.writer.write({"__key__": key, "safetensors": save(tensors), "json": json.dumps(meta).encode()})
        self.infos[-1].samples.append((key, bucket[0], bucket[1]))

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self.writer.close()
        return self.infos
