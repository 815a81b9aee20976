"""A cache checked against its index.json: every shard, sample offset and tensor shape the index claims.

A cache is checked against its index.json whenever it is opened (`read_index`), at a cost that does not grow with
the samples' sizes: the index's types and keys (`cache_index.read_index_json`); every shard exists; each sample's
bytes lie inside its shard, at a tar data boundary, without overlapping another's; the first and last sample of each
shard and the first of each bucket have the tar header and safetensors shapes (latents C x h/16 x w/16,
prompt_embeds max_sequence_length x D, or prompt_embeds.0 .. prompt_embeds.{K-1} with K caption variants) their
entry claims, and every other sample of a bucket has that sample's byte size; no tar member lies before a shard's
first listed sample, after its last or in a gap wide enough for one (so the shard holds the samples listed, no
more); extra.safetensors has the embedding of the settings' shape. `flux2-lora data validate CACHE` (`audit_cache`)
reads every tar header and every sample's safetensors header instead. A mismatch is a `CacheCorrupt` (a DataError):
one line naming the cache folder, the file, the sample and the reason, and what to do.

Shards are read by positioned reads (os.pread at the offsets index.json gives, through a small window), never
sequentially: the tar and safetensors headers are parsed here from the bytes read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .buckets import MULTIPLE
from .cache_index import (
    CacheCorrupt,
    CacheIndex,
    ShardInfo,
    _is_int,
    _one_line,
    _reason,
    member_offsets,
    read_index_json,
)
from .shards import CACHE_MEMBERS

Refs = tuple[tuple[int, int], ...]  # a sample's reference sizes (width, height)
Group = tuple[tuple[int, int], Refs]  # a bucket and the reference sizes of its samples

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


# The tar headers are parsed here, not by tarfile, although the bytes come from positioned reads either way (a
# 512-byte block read at an offset is what TarInfo.frombuf takes). Kept by hand because tarfile's verdicts on a
# damaged shard are not these, and these are what `data validate` and the open-time checks report:
# - TarInfo.frombuf compares the checksum before it reads the size field, so a header whose size field no longer
#   reads as a number is "(bad checksum)" there, "no valid tar header" here (so is ~1 random block in 100: a
#   checksum field starting with 0x80/0xff, base-256 to tarfile, never here). It also accepts a signed-byte
#   checksum, refuses a header whose mode/uid/gid/mtime/dev field is unreadable, turns an old-style regular file
#   `name/` into a directory and joins bytes 345..500 to the name in non-ustar (GNU) headers: another verdict, or
#   another member, from the same bytes. And it is ~4x slower (41 us a header against 10 here), paid 4 times per
#   sample by `data validate`.
# - pax and GNU long-name records (`_pax`, `_members`) are read by TarInfo._proc_pax/_proc_gnulong, private methods
#   that need a TarFile, read the following header themselves from its file object and lose which header failed;
#   they take an unreadable record as the end of the records and an unreadable size as 0, apply global (`g`)
#   headers, and were rewritten in Python's 2024 security releases (CVE-2024-6232). TarFile's member iteration, the
#   public way to them, ends the archive without an error at a damaged header after the first, so a damaged shard
#   would read as a shorter valid one.
# member_offsets (cache_index) does use tarfile: it only needs the offsets in a shard that reads.


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

    tarfile.TarInfo.frombuf less the fields nobody here reads, with this module's verdicts (see above)."""
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
    sizes: dict[Group, tuple[int, str]] = field(default_factory=dict)  # group -> (bytes, a sample's key)
    variants: int = 1  # caption variants: K > 1 stores prompt_embeds.0 .. prompt_embeds.{K-1} (data/captions.py)
    masked: bool | None = None  # every sample holds a loss mask (data/masks.py): learned from the first one checked

    @classmethod
    def of(cls, index: CacheIndex) -> _Expect:
        st = index.settings
        buckets = {(b[0], b[1]) for b in st["buckets"]}
        return cls(st["max_sequence_length"], st["random_flip"], buckets, variants=st.get("caption_variants", 1))

    @property
    def embeds(self) -> list[str]:
        """The names of a sample's prompt embeddings."""
        return ["prompt_embeds"] if self.variants == 1 else [f"prompt_embeds.{k}" for k in range(self.variants)]

    def tensors(self, tensors: dict[str, tuple[str, list[int]]], w: int, h: int, refs: Refs = ()) -> None:
        """_Bad when a sample's tensors are not those of a (w, h) sample of this cache with references of sizes refs."""
        want = {"latents", *self.embeds} | ({"latents_flip"} if self.flip else set())
        want |= {f"ref.{n}" for n in range(len(refs))} | (
            {f"ref_flip.{n}" for n in range(len(refs))} if self.flip else set()
        )
        self.masked = "mask" in tensors if self.masked is None else self.masked
        if self.masked:  # a dataset with loss masks: every sample has one (ones for an image without a mask file)
            want |= {"mask", "mask_flip"} if self.flip else {"mask"}
        if set(tensors) != want:
            listed = f" (index.json lists {len(refs)} reference(s))" if refs or any("ref" in t for t in tensors) else ""
            raise _Bad(f"it holds tensors {sorted(tensors)}, a sample of this cache {sorted(want)}{listed}")
        for n, (rw, rh) in enumerate(refs):
            for name in (f"ref.{n}", f"ref_flip.{n}") if self.flip else (f"ref.{n}",):
                got = tensors[name][1]
                if len(got) != 3 or got[1:] != [rh // MULTIPLE, rw // MULTIPLE]:
                    raise _Bad(
                        f"index.json lists its reference {n} as {rw}x{rh}, whose latents are C x {rh // MULTIPLE} x "
                        f"{rw // MULTIPLE}; its {name} are {_shape(got)}"
                    )
        grid = [h // MULTIPLE, w // MULTIPLE]
        for name in [n for n in ("mask", "mask_flip") if n in tensors and tensors[n][1] != grid]:
            why = f"index.json lists it as {w}x{h}, whose loss mask is {_shape(grid)} (the latent grid); its {name} is "
            raise _Bad(why + _shape(tensors[name][1]))
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
        for name in self.embeds:
            emb = tensors[name][1]
            if len(emb) != 2 or emb[0] != self.seq or (self.dim is not None and emb[1] != self.dim):
                want_emb = f"{self.seq}x{self.dim}" if self.dim is not None else f"{self.seq} x D"
                raise _Bad(
                    f"its {name} are {_shape(emb)}, this cache's are {want_emb} (settings.max_sequence_length "
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


def _check_member(
    r: _Reader, key: str, w: int, h: int, offset: int, size: int, expect: _Expect, refs: Refs = ()
) -> None:
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

    expect.tensors(_header(read, size), w, h, refs)


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
    groups: list[Group],
    off: np.ndarray,
    size: np.ndarray,
    expect: _Expect,
) -> int:
    """The open-time checks of one shard's index entries (module docstring): sample i has bucket and reference sizes
    groups[ids[i]] and lies at bytes off[i] .. off[i] + size[i]. Returns the number of positioned reads it took."""
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
    present = np.flatnonzero(np.bincount(ids, minlength=len(groups)))
    first_of = {int(b): int(np.argmax(ids == b)) for b in present}  # group id -> its first sample here
    for b, i in first_of.items():
        if groups[b][0] not in expect.buckets:
            w, h = groups[b][0]
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
    check = {int(order[0]), int(order[-1])} | {i for b, i in first_of.items() if groups[b] not in expect.sizes}
    with open(path, "rb") as f:
        r = _Reader(f.fileno(), file_size)
        for i in sorted(check):
            (w, h), refs = groups[ids[i]]
            try:
                _check_member(r, keys[i], w, h, int(off[i]), int(size[i]), expect, refs)
            except _Bad as e:
                raise corrupt(i, str(e)) from None
            expect.sizes.setdefault(groups[ids[i]], (int(size[i]), f"{url}, {keys[i]!r}"))
        for b in first_of:
            ((w, h), _), (want, like) = groups[b], expect.sizes[groups[b]]
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
            root, info.url, keys, table.group[a:b], table.groups, table.offset[a:b], table.size[a:b], expect
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
        refs = info.references or [()] * len(info.samples)
        rows = [((w, h), r) for (_, w, h), r in zip(info.samples, refs, strict=True)]
        groups = sorted(set(rows))
        ids = np.asarray([groups.index(g) for g in rows], dtype=np.int64)
        off = np.asarray([o for o, _ in info.offsets], dtype=np.int64)
        size = np.asarray([n for _, n in info.offsets], dtype=np.int64)
        reads += _check_shard(root, info.url, [k for k, _, _ in info.samples], ids, groups, off, size, expect)
    return reads


def read_index(root: Path, check: bool = True) -> CacheIndex:
    """The cache's index, checked against its files (see the module docstring; `check=False`: its JSON only)."""
    index = read_index_json(root)
    if check:
        check_cache(index)
    return index


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
                expect.tensors(_header(r.at(data), size), w, h, info.references[i] if info.references else ())
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
