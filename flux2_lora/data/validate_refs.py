"""Reference images in `data validate`: which files are whose references, and the checks only a reference gets.

The rules are training's (`folder.scan_folder`): `<stem>_ref<n>` files beside the target or in a references/
folder beside it (references/<stem>.<ext> is reference 0), or a metadata.jsonl line's "references" list (paths
relative to the dataset folder; that list wins over files beside the target). Where training stops at the first
mistake, `find_references` lists every one and raises nothing: a reference without its target, one that could
belong to two targets, two files for one number, a gap in the numbers (a warning), more than MAX_REFERENCES, a
metadata.jsonl reference that is missing, not an image, outside the dataset folder or through a symbolic link
(refused, never followed). Problems about an item's set of references name the target; problems about one file
name that file. A reference is checked as FLUX.2's pipeline checks an `image=` input
(`Flux2ImageProcessor.check_image_input`): both sides at least 64 px and an aspect ratio of at most 8:1, both
errors; --min-resolution and --max-aspect are for targets. Nothing here imports validate.py, which reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import MAX_REFERENCES
from .folder import IMAGE_EXTENSIONS, REFERENCES_DIR, reference_index

REF_MIN_SIDE = 64  # Flux2ImageProcessor.check_image_input: both sides at least this
REF_MAX_ASPECT = 8  # and long / short at most this
Found = tuple[Path, Literal["error", "warning"], str, str]  # a validate.Problem's fields: path, severity, code, reason
_EXTS = "/".join(sorted(IMAGE_EXTENSIONS))


@dataclass
class References:
    """Each item's references as training reads them, every file taken as a reference, and the problems found."""

    root: Path
    of: dict[Path, tuple[Path, ...]] = field(default_factory=dict)  # target image -> its references, in order
    files: set[Path] = field(default_factory=set)  # every file taken as a reference (one in excess, an orphan too)
    problems: list[Found] = field(default_factory=list)

    def add(self, path: Path, severity: Literal["error", "warning"], code: str, reason: str) -> None:
        self.problems.append((path, severity, code, reason))

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def errors(self) -> dict[Path, list[str]]:
        """path -> the reasons of its errors (an item's own, or a reference file's)."""
        out: dict[Path, list[str]] = {}
        for path, severity, _, reason in self.problems:
            if severity == "error":
                out.setdefault(path, []).append(reason)
        return out


def reference_geometry(width: int, height: int) -> list[tuple[str, str]]:
    """(code, reason) for each FLUX.2 limit a reference image of this size breaks: too small, too elongated."""
    out = []
    short, long = min(width, height), max(width, height)
    if short < REF_MIN_SIDE:
        why = f"{width}x{height}: a reference image needs both sides at least {REF_MIN_SIDE} px (FLUX.2 refuses it)"
        out.append(("too-small", why))
    if short > 0 and long / short > REF_MAX_ASPECT:
        why = f"{width}x{height}: aspect ratio {long / short:.1f}:1 is over {REF_MAX_ASPECT}:1, the most FLUX.2 takes"
        out.append(("extreme-aspect", why + " for a reference image"))
    return out


def find_references(root: Path, images: list[Path], captioned: set[Path]) -> References:
    """The references of every target among images (regular image files under root, in training's order).

    captioned: the images with a metadata.jsonl caption (a numbered file with its own caption and no target is a
    target itself)."""
    refs = References(root)
    named = _metadata(refs)
    _folder(refs, [p for p in images if p not in named], captioned)
    return refs


def _metadata(refs: References) -> set[Path]:
    """metadata.jsonl's "references" lists into refs.of; the files they name that exist and are images."""
    meta = refs.root / "metadata.jsonl"
    if meta.is_symlink() or not meta.is_file():
        return set()
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):  # reported by validate.read_metadata
        return set()
    named: set[Path] = set()
    lines: dict[str, tuple[list[str], int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # reported by validate.read_metadata
        if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str) or "references" not in rec:
            continue
        listed = rec["references"]
        if not isinstance(listed, list) or not all(isinstance(r, str) and r for r in listed):
            why = f"line {n}: references must be a list of file names relative to the dataset folder"
            refs.add(meta, "error", "bad-metadata", why)
            continue
        lines[rec["file_name"]] = (listed, n)  # a later line for the same file wins, as in training
    for name, (listed, n) in lines.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            continue  # a file_name outside the folder: that line is an error of its own (validate.read_metadata)
        target = refs.root / name
        found = [_listed(refs, target, r, n) for r in listed]
        if len(listed) > MAX_REFERENCES:
            why = f"{len(listed)} reference images (metadata.jsonl line {n}); FLUX.2 takes up to {MAX_REFERENCES}"
            refs.add(target, "error", "too-many-references", why)
        paths = tuple(p for p in found if p is not None)
        named.update(paths)
        refs.files.update(paths)
        if paths and Path(os.path.normpath(name)).as_posix() == name:  # training matches file_name as written
            refs.of[target] = paths
    return named


def _listed(refs: References, target: Path, name: str, line: int) -> Path | None:
    """One metadata.jsonl reference as a file under root, or None with a problem on the target naming it."""
    where = f"reference {name!r} (metadata.jsonl line {line})"
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        refs.add(target, "error", "outside-root", f"{where} is outside the dataset folder (refused)")
        return None
    for i in range(1, len(rel.parts) + 1):
        part = refs.root.joinpath(*rel.parts[:i])
        if part.is_symlink():
            link = "is a symbolic link" if i == len(rel.parts) else f"goes through the symbolic link {refs.rel(part)}"
            why = f"{where} {link} (refused, not followed)"
            refs.add(target, "error", "symlink", why)
            return None
    full = refs.root / rel
    if not os.path.lexists(full):
        refs.add(target, "error", "missing-reference", f"{where} does not exist")
        return None
    if not full.is_file():
        refs.add(target, "error", "missing-reference", f"{where} is not a file")
        return None
    if full.suffix.lower() not in IMAGE_EXTENSIONS:
        refs.add(target, "error", "bad-extension", f"{where} is not a {_EXTS} image")
        return None
    return full


def _folder(refs: References, images: list[Path], captioned: set[Path]) -> None:
    """`<stem>_ref<n>` files beside their target or in references/ beside it, as folder.folder_references."""
    in_dir = {p for p in images if p.parent.name == REFERENCES_DIR}
    beside = [p for p in images if p not in in_dir]
    targets: dict[tuple[Path, str], list[Path]] = {}
    for p in beside:
        if reference_index(p) is None:
            targets.setdefault((p.parent, p.stem), []).append(p)
    slots: dict[Path, dict[int, list[Path]]] = {}
    for p in beside + [p for p in images if p in in_dir]:
        base = p.parent.parent if p in in_dir else p.parent
        ref = reference_index(p)
        if ref is not None and (base, ref[0]) in targets:
            stem, n = ref
        elif p in in_dir and (base, p.stem) in targets:
            stem, n = p.stem, 0
        elif p in in_dir or ref is not None and not _own_caption(p, captioned):
            refs.files.add(p)
            want, where = ref[0] if ref else p.stem, refs.rel(base) if base != refs.root else "the dataset folder"
            why = f"a reference image without its target {want}.png/.jpg/.webp in {where} (add the target, or give"
            refs.add(p, "error", "orphan-reference", why + " this file a caption if it is not a reference)")
            continue
        else:
            continue
        refs.files.add(p)
        owners = targets[(base, stem)]
        if len(owners) > 1:
            which = " and ".join(refs.rel(t) for t in owners)
            refs.add(
                p, "error", "ambiguous-reference", f"a reference of which image? {which} share its name (rename one)"
            )
            continue
        slots.setdefault(owners[0], {}).setdefault(n, []).append(p)
    for target, numbered in slots.items():
        _item(refs, target, numbered)


def _item(refs: References, target: Path, numbered: dict[int, list[Path]]) -> None:
    for n, files in sorted(numbered.items()):
        if len(files) > 1:
            why = f"reference {n} is both {' and '.join(refs.rel(p) for p in files)} (keep one of them)"
            refs.add(target, "error", "duplicate-reference", why)
    if len(numbered) > MAX_REFERENCES:
        why = f"{len(numbered)} reference images; FLUX.2 takes up to {MAX_REFERENCES}"
        refs.add(target, "error", "too-many-references", why)
    order = sorted(numbered)
    chosen = tuple(numbered[n][0] for n in order)
    if order != list(range(len(order))):
        gap = min(set(range(len(order))) - set(order))
        why = f"references numbered {', '.join(map(str, order))}: no reference {gap} (training takes them in order)"
        refs.add(target, "warning", "reference-gap", why)
    for p in chosen:
        txt = p.with_suffix(".txt")
        if os.path.lexists(txt):
            why = f"caption of a reference image ({p.name} is a reference of {refs.rel(target)}); training ignores it"
            refs.add(txt, "warning", "reference-caption", why)
    if target in refs.of:
        unused = ", ".join(refs.rel(p) for p in chosen)
        why = f"its metadata.jsonl references are used, not {unused} (remove one of the two)"
        refs.add(target, "warning", "unused-reference", why)
    else:
        refs.of[target] = chosen


def _own_caption(p: Path, captioned: set[Path]) -> bool:
    return p in captioned or os.path.lexists(p.with_suffix(".txt")) or os.path.lexists(p.with_suffix(".json"))
