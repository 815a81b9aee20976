"""webdataset tar shards: raw image+caption shards (`data shard`) and safe reading of any shard spec.

A raw sample is <key>.png (or .jpg, ...), <key>.txt, its references <key>.ref0.png, ... and its loss mask
<key>.mask.png (data/masks.py), each optional but the image.

A shard spec is a folder of .tar files, a brace pattern (`data-{000000..000099}.tar`), a comma-free list
of local paths, or `pipe:` URLs (e.g. `pipe:curl -s https://host/data-{000..009}.tar`). Every tar member
name is checked before its bytes are used: absolute names, `..` segments and extensions that are not on
the whitelist are refused with an error naming the shard and the member.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .folder import DataError, Item

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
# Reference images of an editing sample: <key>.ref0.png, <key>.ref1.jpg, ... (numbered from 0, in order).
REFERENCE_MEMBERS = {f"ref{i}.{e}" for i in range(10) for e in IMAGE_MEMBERS}
# A sample's loss mask (data/masks.py): <key>.mask.png (or .jpg, ...), the size of its image.
MASK_MEMBERS = {f"mask.{e}" for e in IMAGE_MEMBERS}
RAW_MEMBERS = {*IMAGE_MEMBERS, "txt", "json"} | REFERENCE_MEMBERS | MASK_MEMBERS
CACHE_MEMBERS = {"safetensors", "json"}
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_\-/]")


def sample_key(relpath: str) -> str:
    """A webdataset key for a dataset-relative path: no dots (they start the extension), no `..`."""
    stem = relpath.rsplit(".", 1)[0]
    return _KEY_SAFE.sub("_", stem).replace("/", "__")


def expand_spec(spec: str) -> list[str]:
    """The shard URLs of a spec: a folder (its *.tar, sorted), a brace pattern, a path or a pipe: URL."""
    from webdataset.shardlists import expand_urls

    path = Path(spec).expanduser()
    if not spec.startswith("pipe:") and path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise DataError(f"{spec}: no .tar shards in this folder")
        return urls
    urls = list(expand_urls(spec))
    for u in urls:
        if not u.startswith(("pipe:", "http://", "https://")) and not Path(u).exists():
            raise DataError(f"{u}: shard does not exist")
    return urls


def is_shard_spec(spec: str) -> bool:
    """True when the dataset is given as shards rather than an image folder."""
    if spec.startswith("pipe:") or spec.endswith(".tar") or "{" in spec:
        return True
    p = Path(spec).expanduser()
    return p.is_dir() and any(p.glob("*.tar")) and not any(p.glob("*.txt"))


def member_guard(allowed: set[str], url: str) -> Callable[[str], bool]:
    """A webdataset `select_files` predicate that refuses unsafe or unexpected tar members."""

    def check(name: str) -> bool:
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or "\\" in name:
            raise DataError(f"{url}: tar member {name!r} escapes the shard (absolute or '..' path); refused")
        base = parts[-1]
        if base.startswith("__") and base.endswith("__"):
            return False
        ext = base.split(".", 1)[1].lower() if "." in base else ""
        if ext not in allowed:
            raise DataError(f"{url}: tar member {name!r} has extension {ext!r}, not one of {sorted(allowed)}; refused")
        return True

    return check


def iter_tar(url: str, allowed: set[str]) -> Iterator[dict[str, Any]]:
    """Samples ({'__key__', ext: bytes}) of one shard, members checked by member_guard."""
    import webdataset as wds

    ds = wds.WebDataset(
        url,
        shardshuffle=False,
        nodesplitter=None,
        workersplitter=None,
        empty_check=False,
        select_files=member_guard(allowed, url),
    )
    try:
        yield from ds
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken tar is a data error naming the shard
        raise DataError(f"{url}: cannot read shard ({type(e).__name__}: {e})") from None


@dataclass
class RawSample:
    key: str
    image: bytes
    ext: str
    caption: str
    references: tuple[tuple[bytes, str], ...] = ()  # (image bytes, extension) of each reference, in order
    reference_names: tuple[str, ...] = ()  # where each reference came from, for messages
    mask: bytes | None = None  # its loss mask's file bytes (data/masks.py), None: unmasked
    mask_name: str = ""  # where the mask came from, for messages


def shard_references(s: dict[str, Any], url: str) -> tuple[tuple[tuple[bytes, str], ...], tuple[str, ...]]:
    """The ref0, ref1, ... members of a raw shard sample, numbered from 0 without gaps."""
    found: dict[int, tuple[bytes, str]] = {}
    for name, data in s.items():
        if name in REFERENCE_MEMBERS:
            n, ext = name.split(".", 1)
            if int(n[3:]) in found:
                raise DataError(f"{url}: sample {s['__key__']!r} has two {n} members; keep one")
            found[int(n[3:])] = (data, ext)
    if sorted(found) != list(range(len(found))):
        missing = min(set(range(len(found))) - set(found))
        raise DataError(f"{url}: sample {s['__key__']!r} has references {sorted(found)} but no ref{missing}")
    names = tuple(f"{url}: {s['__key__']}.ref{n}.{found[n][1]}" for n in sorted(found))
    return tuple(found[n] for n in sorted(found)), names


def iter_raw_samples(spec: str, instance_prompt: str | None = None) -> Iterator[RawSample]:
    """Image+caption samples from raw shards, in shard order."""
    for url in expand_spec(spec):
        for s in iter_tar(url, RAW_MEMBERS):
            key = s["__key__"]
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
            if ext is None:
                raise DataError(f"{url}: sample {key!r} has no image member")
            if "txt" in s:
                caption = " ".join(s["txt"].decode("utf-8-sig", errors="strict").split())
            elif instance_prompt is not None:
                caption = instance_prompt
            else:
                raise DataError(f"{url}: sample {key!r} has no caption (.txt) and data.instance_prompt is not set")
            refs, names = shard_references(s, url)
            masks = sorted(m for m in MASK_MEMBERS if m in s)
            if len(masks) > 1:
                raise DataError(f"{url}: sample {key!r} has two masks ({', '.join(masks)}); keep one")
            mask = (s[masks[0]], f"{url}: {key}.{masks[0]}") if masks else (None, "")
            yield RawSample(key, s[ext], ext, caption, refs, names, *mask)


def iter_folder_samples(items: list[Item], root: Path) -> Iterator[RawSample]:
    for it in items:
        rel = it.image.relative_to(root).as_posix()
        ext = it.image.suffix.lower().lstrip(".")
        refs = tuple((p.read_bytes(), p.suffix.lower().lstrip(".")) for p in it.references)
        mask = it.mask.read_bytes() if it.mask is not None else None
        yield RawSample(
            sample_key(rel), it.image.read_bytes(), ext, it.caption, refs, tuple(map(str, it.references)), mask,
            str(it.mask or ""),
        )  # fmt: skip


def write_raw_shards(items: list[Item], root: Path, out: Path, shard_size: int = 1000) -> list[Path]:
    """Write image+caption samples into out/data-NNNNNN.tar (webdataset layout), shard_size samples each."""
    import webdataset as wds

    if shard_size < 1:
        raise DataError(f"--shard-size: must be >= 1, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise DataError(f"{out}: already holds shards; choose an empty --output")
    written: list[Path] = []
    keys: set[str] = set()
    writer = None
    for i, s in enumerate(tqdm(list(iter_folder_samples(items, root)), desc="shard", unit="img")):
        if s.key in keys:
            raise DataError(f"{s.key}: two files map to the same sample key; rename one of them")
        keys.add(s.key)
        if i % shard_size == 0:
            if writer is not None:
                writer.close()
            path = out / f"data-{len(written):06d}.tar"
            written.append(path)
            writer = wds.TarWriter(str(path))
        assert writer is not None
        refs = {f"ref{n}.{ext}": data for n, (data, ext) in enumerate(s.references)}
        if s.mask is not None:  # its loss mask as <key>.mask.<ext>
            refs[f"mask.{Path(s.mask_name).suffix.lower().lstrip('.') or 'png'}"] = s.mask
        writer.write({"__key__": s.key, s.ext: s.image, "txt": s.caption, **refs})
    if writer is not None:
        writer.close()
    return written


def open_image(data: bytes, name: str) -> Any:
    """Decode image bytes from a shard with the same safe conversion as files (EXIF, alpha, modes)."""
    from .folder import load_image

    return load_image(io.BytesIO(data), name=name)
