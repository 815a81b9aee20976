"""`flux2-lora data validate SHARDS`: raw webdataset shards (`data shard`'s), sample by sample, one line a problem.

Each line names the shard and the member (`ERROR   /data/data-000000.tar: 003.ref1.png: 40x40: ...`). Member names
are checked as training checks them (an absolute or `..` name, or an extension training does not read, makes it
refuse the whole shard); each image is decoded with the folder checks (validate._Checker); a sample's references
(`<key>.ref0.png`, `<key>.ref1.jpg`, ...) must be numbered from 0 without a gap or a number twice, at most
MAX_REFERENCES of them, each one FLUX.2 accepts (validate_refs.reference_geometry); a loss mask (`<key>.mask.png`)
must be readable, of its image's size and not all black (data/masks.py). A tar that cannot be read is one line
naming it. Shards are only read: nothing is extracted to disk.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import MAX_REFERENCES
from .masks import mask_problems
from .shards import IMAGE_MEMBERS, MASK_MEMBERS, RAW_MEMBERS, expand_spec
from .validate import DEFAULT_MAX_TOKENS, Report, Severity, _Checker, _mb, _Options, normalise

_REF_MEMBER = re.compile(r"^ref([0-9]+)\.(jpg|jpeg|png|webp)$")  # any number: ref10 is counted, then refused


class _ShardChecker(_Checker):
    """The folder checks on one shard's members: every problem names the shard, and its reason the member."""

    def __init__(self, shard: Path, opts: _Options) -> None:
        super().__init__(shard, opts)
        self.member = ""
        self.reference = False
        self.refused = False  # training refuses this shard as a whole (a member it does not take, a broken tar)

    def add(self, path: Path, severity: Severity, code: str, reason: str) -> None:
        super().add(path, severity, code, f"{self.member}: {reason}" if self.member else reason)

    def is_reference(self, path: Path) -> bool:
        return self.reference

    def guard(self, name: str) -> bool:
        """webdataset's select_files: True for a member training reads; a problem for one it refuses."""
        base = name.split("/")[-1]
        if base.startswith("__") and base.endswith("__"):
            return False
        self.member = name
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            self.add(
                self.root, "error", "unsafe-member", "escapes the shard (absolute or '..' name); training refuses it"
            )
            self.refused = True
            return False
        ext = base.split(".", 1)[1].lower() if "." in base else ""
        if ext not in RAW_MEMBERS and not _REF_MEMBER.match(ext):
            why = f"extension {ext!r} is not one training reads ({', '.join(sorted(IMAGE_MEMBERS))}, txt, json, refN.*)"
            self.add(self.root, "error", "bad-member", why + "; training refuses the shard")
            self.refused = True
            return False
        return True

    def member_image(self, name: str, data: bytes, reference: bool) -> None:
        self.member, self.reference = name, reference
        limit = self.opts.max_file_mb * 2**20
        if not data:
            self.add(self.root, "error", "empty-file", "member is empty (0 bytes)")
            return
        if len(data) > limit:
            why = f"member is {_mb(len(data))}, over the {self.opts.max_file_mb:g} MB limit (--max-file-mb)"
            self.add(self.root, "error", "too-large", why)
        self.pixels(self.root, data)

    def sample(self, s: dict[str, Any], instance_prompt: str | None) -> tuple[str, ...]:
        """Check one sample; the member names of its references, in order."""
        key = s["__key__"]
        self.member, self.reference = key, False
        ext = next((e for e in IMAGE_MEMBERS if e in s), None)
        if ext is None:
            self.add(self.root, "error", "missing-image", f"no image member ({', '.join(IMAGE_MEMBERS)})")
        else:
            self.member_image(f"{key}.{ext}", s[ext], reference=False)
        self.caption_member(key, s, instance_prompt)
        found: dict[int, list[str]] = {}
        for name in s:
            m = _REF_MEMBER.match(name)
            if m:
                found.setdefault(int(m[1]), []).append(name)
        self.member = key
        for n, names in sorted(found.items()):
            if len(names) > 1:
                both = " and ".join(f"{key}.{x}" for x in names)
                self.add(self.root, "error", "duplicate-reference", f"reference {n} is both {both} (keep one of them)")
        if len(found) > MAX_REFERENCES:
            why = f"{len(found)} reference images; FLUX.2 takes up to {MAX_REFERENCES}"
            self.add(self.root, "error", "too-many-references", why)
        gaps = sorted(set(range(max(found, default=-1) + 1)) - set(found))
        if gaps:
            why = f"references {', '.join(f'ref{n}' for n in sorted(found))} but no ref{gaps[0]} (number them from 0)"
            self.add(self.root, "error", "reference-gap", why)
        for n in sorted(found):
            self.member_image(f"{key}.{found[n][0]}", s[found[n][0]], reference=True)
        masks = sorted(m for m in MASK_MEMBERS if m in s)
        if len(masks) > 1:
            self.member = key
            self.add(self.root, "error", "duplicate-mask", f"two masks: {', '.join(masks)} (keep one of them)")
        elif masks and ext is not None:
            self.member_mask(f"{key}.{masks[0]}", s[masks[0]], s[ext], f"{key}.{ext}")
        return tuple(f"{key}.{found[n][0]}" for n in sorted(found))

    def member_mask(self, name: str, data: bytes, image: bytes, image_name: str) -> None:
        """A sample's loss mask: readable, of its image's size, not all black (data/masks.py)."""
        self.member, self.reference = name, False
        for code, why in mask_problems(data, image, name, image_name):
            self.add(self.root, "error", code, why)

    def caption_member(self, key: str, s: dict[str, Any], instance_prompt: str | None) -> None:
        self.member, self.reference = f"{key}.txt", False
        if "txt" not in s:
            if instance_prompt is None:
                self.member = key
                self.add(self.root, "error", "missing-caption", "no caption (.txt member) and no instance prompt")
            return
        try:
            text = normalise(s["txt"].decode("utf-8-sig"))
        except UnicodeDecodeError:
            self.add(self.root, "error", "caption-not-utf8", "caption is not UTF-8 text")
            return
        if not text:
            self.add(self.root, "warning", "empty-caption", "caption is empty (training uses it as it is)")
        else:
            self.tokens(self.root, text)


def _samples(url: str, checker: _ShardChecker) -> Iterator[dict[str, Any]]:
    import webdataset as wds

    ds = wds.WebDataset(
        url, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False, select_files=checker.guard
    )
    try:
        yield from ds
    except Exception as e:  # a truncated or broken tar: one line naming it
        checker.member = ""
        checker.add(checker.root, "error", "unreadable", f"cannot read shard ({type(e).__name__}: {e})")
        checker.refused = True


def validate_shards(
    spec: str | os.PathLike[str],
    *,
    max_file_mb: float = 50.0,
    min_resolution: int = 256,
    max_aspect: float = 4.0,
    max_caption_tokens: int | None = None,
    tokenizer: Any = None,
    instance_prompt: str | None = None,
) -> Report:
    """Check every sample of raw shards (a folder of .tar files, a brace pattern, a .tar); as validate_dataset.

    Only a spec that names no shard raises (DataError)."""
    limit = DEFAULT_MAX_TOKENS if max_caption_tokens is None else max_caption_tokens
    opts = _Options(max_file_mb, min_resolution, max_aspect, limit, tokenizer, instance_prompt)
    report = Report(root=Path(spec), unit="sample", absolute=True)
    for url in expand_spec(str(spec)):
        checker = _ShardChecker(Path(url), opts)
        ok = 0
        for s in _samples(url, checker):
            before = len(checker.problems)
            refs = checker.sample(s, instance_prompt)
            report.n_images += 1
            ok += len(checker.problems) == before
            if refs:
                report.references[Path(url) / s["__key__"]] = tuple(Path(url) / r for r in refs)
        report.n_ok += 0 if checker.refused else ok
        report.problems += checker.problems
    return report
