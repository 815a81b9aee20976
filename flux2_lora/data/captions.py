"""Caption tag shuffle and tag dropout with cached embeddings: K caption variants per image.

Prompt embeddings are cached (the text encoder runs once, in the cache stage, then is freed), so a caption cannot be
re-shuffled at every step. Instead the cache holds K *variants* of each caption (`data.caption_variants`): variant k
of an image is its comma-separated tags with the first `data.keep_tokens` kept in place, the rest shuffled
(`data.caption_shuffle`) and each dropped with probability `data.tag_dropout` (never all of them), drawn from
(seed, image key, k) alone, with the trigger in front. The cache stage embeds every distinct variant once and stores
a sample's K embeddings as `prompt_embeds.0 .. prompt_embeds.{K-1}`; training draws one of them per sample and pass
(`draws.choose_caption_variant`, keyed by (seed, data pass, draw key + "#caption")) and reads only its bytes
(`read_variant`). With K == 1 nothing of this applies: the sample holds `prompt_embeds`, read whole, as before.

The trade-off (K x one prompt embedding per image on disk, against re-encoding with the text encoder every step) is
in docs/data.md, "Captions: shuffling, tag dropout, variants".
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MB, GB = 1e6, 1e9
HEAD = 4096  # bytes read first: a sample's safetensors header (a few hundred bytes) and what follows it


@dataclass(frozen=True)
class TagRules:
    """How caption variants are made (the cache settings caption_shuffle, keep_tokens, tag_dropout)."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        """False: every variant is the caption as written (trigger first), as without this feature."""
        return self.shuffle or self.dropout > 0

    @classmethod
    def of(cls, settings: Any) -> TagRules:
        """The rules of a CacheSettings (or an index.json settings dict; absent keys are off)."""
        get = settings.get if isinstance(settings, dict) else lambda k, v: getattr(settings, k, v)
        return cls(bool(get("caption_shuffle", False)), int(get("keep_tokens", 0)), float(get("tag_dropout", 0.0)))


def caption_settings(d: Any) -> dict[str, Any]:
    """The CacheSettings fields of a recipe's data group: all at their defaults (so a cache keeps its digest) unless
    captions are shuffled or tags dropped; keep_tokens is recorded only then, where it changes the variants."""
    from ..sources import caption_variants as variants

    rules = TagRules(bool(d.caption_shuffle), int(d.keep_tokens), float(d.tag_dropout))
    if not rules.active:
        return {"caption_shuffle": False, "keep_tokens": 0, "tag_dropout": 0.0, "caption_variants": 1}
    return {
        "caption_shuffle": rules.shuffle,
        "keep_tokens": rules.keep_tokens,
        "tag_dropout": rules.dropout,
        "caption_variants": variants(d),
    }


def split_tags(caption: str) -> list[str]:
    """A caption's comma-separated tags, stripped, empty ones left out (a caption without commas is one tag)."""
    return [t for t in (p.strip() for p in caption.split(",")) if t]


def _seed(seed: int, key: str, k: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{key}:{k}#caption".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def caption_variant(caption: str, trigger: str | None, rules: TagRules, seed: int, key: str, k: int) -> str:
    """Variant `k` of the caption of image `key`: a pure function of its arguments.

    The first `rules.keep_tokens` tags stay in place; the others are shuffled (rules.shuffle) and each dropped with
    probability rules.dropout, but a caption never loses all its tags. A tag equal to the trigger is taken out (the
    trigger goes in front once, `cache.full_caption`). Inactive rules give `full_caption(caption, trigger)`."""
    from .cache import full_caption

    if not rules.active:
        return full_caption(caption, trigger)
    tags = split_tags(caption)
    keep = max(rules.keep_tokens, 0)
    head = [t for t in tags[:keep] if t != trigger]
    rest = [t for t in tags[keep:] if t != trigger]
    rng = random.Random(_seed(seed, key, k))
    if rules.shuffle:
        rng.shuffle(rest)
    if rules.dropout > 0 and rest:
        kept = [t for t in rest if rng.random() >= rules.dropout]
        if not head and not kept:  # never an empty caption: one tag stays
            kept = [rest[rng.randrange(len(rest))]]
        rest = kept
    return full_caption(", ".join(head + rest), trigger)


def caption_variants(caption: str, trigger: str | None, rules: TagRules, seed: int, key: str, count: int) -> list[str]:
    """The `count` variants of one image's caption (variant 0 is the one validation uses)."""
    return [caption_variant(caption, trigger, rules, seed, key, k) for k in range(count)]


def embedding_width(model: Path) -> int | None:
    """The text encoder's hidden size from its config.json (its text part for Mistral-3), None when unknown."""
    try:
        config = json.loads((model / "text_encoder" / "config.json").read_text())
        return int(config.get("text_config", config)["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cost_line(count: int, tokens: int, hidden: int, layers: int, itemsize: int, images: int) -> str:
    """The one line the cache stage prints before it encodes K > 1 variants: what they cost on disk."""
    per = tokens * hidden * layers * itemsize
    return (
        f"cache: {count} caption variants x {_num(per / MB)} MB per prompt embedding ({tokens} tokens x "
        f"{layers * hidden} = {layers} layers x {hidden} hidden x {itemsize} bytes) = {_num(count * per / MB)} MB per "
        f"image, {_num(count * per * images / GB)} GB for {images} images"
    )


def _num(x: float) -> str:
    """15.7, 125.8, 0.012: one decimal, two significant digits below 0.1."""
    return f"{x:.1f}" if x >= 0.1 or x == 0 else f"{x:.2g}"


_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BOOL": torch.bool, "U8": torch.uint8,
    "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}  # fmt: skip


def read_variant(fd: int, offset: int, size: int, k: int) -> dict[str, torch.Tensor]:
    """The tensors of a cached sample (a safetensors blob of `size` bytes at `offset` of the file `fd`) with only
    caption variant `k` of its prompt embeddings, as `prompt_embeds`: its header is read first, then only the bytes of
    the tensors kept (adjacent ones in one read), straight into one buffer the tensors share (no further copy).
    ValueError for a blob whose header does not describe its bytes (OSError from the reads)."""
    head = os.pread(fd, min(size, HEAD), offset)
    if len(head) < 8:
        raise ValueError(f"short read: {len(head)} of {size} bytes")
    n = int.from_bytes(head[:8], "little")
    if n < 2 or 8 + n > size:
        raise ValueError(f"its safetensors header length ({n} bytes) does not fit in its {size} bytes")
    if 8 + n > len(head):
        head += os.pread(fd, 8 + n - len(head), offset + len(head))
    header = json.loads(head[8 : 8 + n])
    chosen = f"prompt_embeds.{k}"
    if not isinstance(header, dict) or chosen not in header:
        raise ValueError(f"it has no tensor {chosen!r}")
    keep = []  # (start, end, name, dtype, shape) of the tensors kept, in file order
    for name, t in header.items():
        if name == "__metadata__" or (name.startswith("prompt_embeds.") and name != chosen):
            continue
        try:
            (a, b), dtype, shape = t["data_offsets"], _DTYPES[t["dtype"]], [int(x) for x in t["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has an unreadable safetensors header entry") from None
        numel = 1
        for x in shape:
            numel *= x
        if not (type(a) is int and type(b) is int and 0 <= a <= b and 8 + n + b <= size):
            raise ValueError(f"tensor {name!r}'s data offsets lie outside its {size} bytes")
        if b - a != numel * dtype.itemsize:
            raise ValueError(
                f"tensor {name!r} ({t['dtype']} {shape}) takes {numel * dtype.itemsize} bytes, not {b - a}"
            )
        keep.append((a, b, "prompt_embeds" if name == chosen else name, dtype, shape))
    keep.sort()
    buf = bytearray(sum(b - a for a, b, *_ in keep))
    view, pos, run_start, run_end, runs = memoryview(buf), 0, -1, -1, []
    for a, b, *_ in keep:  # runs of adjacent tensors: (first byte, last byte) in the blob
        if a == run_end:
            run_end = b
        else:
            if run_end >= 0:
                runs.append((run_start, run_end))
            run_start, run_end = a, b
    if run_end >= 0:
        runs.append((run_start, run_end))
    base = 8 + n
    for a, b in runs:
        if base + b <= len(head):
            view[pos : pos + b - a] = head[base + a : base + b]
        elif os.preadv(fd, [view[pos : pos + b - a]], offset + base + a) != b - a:
            raise ValueError(f"short read: bytes {a}..{b} of its tensors lie past the end of the shard")
        pos += b - a
    out, pos = {}, 0
    for a, b, name, dtype, shape in keep:
        numel = (b - a) // dtype.itemsize
        out[name] = (
            torch.frombuffer(buf, dtype=dtype, count=numel, offset=pos).view(shape)
            if numel
            else torch.empty(shape, dtype=dtype)
        )
        pos += b - a
    return out


__all__ = [
    "TagRules",
    "caption_settings",
    "caption_variant",
    "caption_variants",
    "cost_line",
    "embedding_width",
    "read_variant",
    "split_tags",
]
