"""Dataset folders: images with same-named .txt captions, scanned recursively in a stable order.

An item may carry reference images (an editing dataset: the caption is the instruction, the image the result):

  photo.png  photo.txt  photo_ref0.png  photo_ref1.jpg     references beside the target, numbered from 0
  photo.png  photo.txt  references/photo_ref0.png          or in a references/ folder beside it
                        references/photo.png               (one reference: the target's own name)
  metadata.jsonl: {"file_name": "photo.png", "text": "...", "references": ["in/photo.png", ...]}

References keep their order (ref0 first: FLUX.2 gives reference i the time index 10 + 10 i). A file that is some
item's reference is never a target itself.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from ..config import MAX_REFERENCES
from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
# Transparent pixels are composited onto this background before training.
ALPHA_BACKGROUND = (255, 255, 255)


REFERENCES_DIR = "references"
_REF_NAME = re.compile(r"^(?P<stem>.+)_ref(?P<n>[0-9]+)$")


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str
    references: tuple[Path, ...] = field(default=())
    mask: Path | None = None  # its loss mask (data/masks.py), None: trains unmasked


def reference_index(path: Path) -> tuple[str, int] | None:
    """(target stem, n) for a file named `<stem>_ref<n>.<ext>`, else None."""
    m = _REF_NAME.match(path.stem)
    return (m["stem"], int(m["n"])) if m else None


def read_caption(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read caption ({e.strerror})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: caption is not UTF-8 text") from None
    return " ".join(text.split())


def read_metadata(root: Path) -> dict[str, str]:
    """Captions from an optional root/metadata.jsonl ({"file_name": "rel/path.png", "text": "..."} per line)."""
    return {k: caption for k, (caption, _) in read_metadata_records(root).items()}


def read_metadata_records(root: Path) -> dict[str, tuple[str, list[str]]]:
    """root/metadata.jsonl as file_name -> (caption, reference paths relative to root); {} without the file."""
    path = root / "metadata.jsonl"
    if not path.exists():
        return {}
    records: dict[str, tuple[str, list[str]]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            caption = " ".join(str(rec["text"]).split())
            refs = rec.get("references", [])
            if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
                raise DataError(f"{path}:{n}: references must be a list of file names relative to {root}")
            records[str(rec["file_name"])] = (caption, refs)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise DataError(f"{path}:{n}: not a JSON object with file_name and text") from None
    return records


def reference_path(root: Path, rel: str, where: str) -> Path:
    """A metadata.jsonl reference as a path inside root; outside root (absolute, `..`, a symlink out) is refused."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{where}: reference {rel!r} is outside the dataset folder {root}; refused")
    full = root / p
    try:
        inside = full.resolve().is_relative_to(root.resolve())
    except OSError:
        inside = False
    if not inside or full.is_symlink():
        raise DataError(f"{where}: reference {rel!r} leads outside the dataset folder {root} (symlink); refused")
    return full


def folder_references(root: Path, images: list[Path], captioned: set[str]) -> dict[Path, tuple[Path, ...]]:
    """Each target's `<stem>_ref<n>` files beside it or in references/ (and references/<stem>.<ext>), in order of n.

    A `<stem>_ref<n>` file whose target is missing is a target itself when it has its own caption (a .txt/.json
    sidecar, or a metadata.jsonl line: `captioned` holds those relative paths), else an error naming it; so are
    two files for one number and more than 10 references."""
    in_dir = [p for p in images if p.parent.name == REFERENCES_DIR]
    beside = [p for p in images if p.parent.name != REFERENCES_DIR]
    targets: dict[tuple[Path, str], list[Path]] = {}  # photo.jpg and photo.png share one: whose is photo_ref0.png?
    for p in beside:
        if reference_index(p) is None:
            targets.setdefault((p.parent, p.stem), []).append(p)
    in_dir_set = set(in_dir)
    numbered: dict[Path, dict[int, Path]] = {}

    def own_caption(p: Path) -> bool:
        rel = p.relative_to(root).as_posix()
        return rel in captioned or p.with_suffix(".txt").exists() or p.with_suffix(".json").exists()

    for p in beside + in_dir:
        base = p.parent.parent if p in in_dir_set else p.parent
        ref = reference_index(p)
        if ref is not None and (base, ref[0]) in targets:
            stem, n = ref
        elif p in in_dir_set and (base, p.stem) in targets:
            stem, n = p.stem, 0
        elif p in in_dir_set or ref is not None and not own_caption(p):
            want = ref[0] if ref else p.stem
            raise DataError(
                f"{p}: a reference image without its target {want}.png/.jpg/.webp in {base} "
                "(add the target, or give this file a caption if it is not a reference)"
            )
        else:
            continue
        owners = targets[(base, stem)]
        if len(owners) > 1:
            names = " and ".join(t.name for t in owners)
            raise DataError(f"{p}: a reference of which image? {names} share its name (rename one)")
        target = owners[0]
        slots = numbered.setdefault(target, {})
        if n in slots:
            raise DataError(f"{p}: reference {n} of {target} is also {slots[n]}; keep one of them")
        slots[n] = p
    out: dict[Path, tuple[Path, ...]] = {}
    for target, slots in numbered.items():
        if len(slots) > MAX_REFERENCES:
            raise DataError(f"{target}: {len(slots)} reference images; FLUX.2 takes up to {MAX_REFERENCES}")
        out[target] = tuple(slots[n] for n in sorted(slots))
    return out


def read_json_caption(path: Path) -> str:
    """Caption from a per-image JSON sidecar: {"caption": "..."} (or "text" / "prompt")."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8-sig"))
        text = next(rec[k] for k in ("caption", "text", "prompt") if isinstance(rec.get(k), str))
    except (ValueError, StopIteration, AttributeError):
        raise DataError(f"{path}: not a JSON object with a caption, text or prompt string") from None
    return " ".join(text.split())


def scan_folder(root: str | Path, instance_prompt: str | None = None, mask_dir: str | Path | None = None) -> list[Item]:
    """Image/caption pairs under root, sorted by relative path.

    Captions come from root/metadata.jsonl, else x.txt, else a x.json sidecar. An image without a caption
    takes instance_prompt; without one that is an error naming the file.
    Symlinks are not followed. Loss masks (`x.mask.png` beside an image, or in mask_dir: data/masks.py) are never
    images; each image's is its Item.mask.
    """
    from .masks import find_masks, resolve_mask_dir, split_masks

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    masks_in = resolve_mask_dir(mask_dir, root)
    records = read_metadata_records(root)
    images: list[Path] = []
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.is_symlink():
            log.warning("%s: symlink refused, not followed (run `flux2-lora data validate`)", path)
            continue
        if path.is_file():
            images.append(path)
    images, mask_files, _ = split_masks(images, masks_in)  # a mask is never a training image
    listed = {
        rel: tuple(reference_path(root, r, f"{root / 'metadata.jsonl'}: {rel}") for r in refs)
        for rel, (_, refs) in records.items()
        if refs
    }
    named = {p for refs in listed.values() for p in refs}
    for rel, refs in listed.items():
        missing = next((p for p in refs if not p.is_file()), None)
        if missing is not None:
            raise DataError(f"{root / 'metadata.jsonl'}: {rel}: reference {missing} does not exist")
    beside = folder_references(root, [p for p in images if p not in named], set(records))
    named |= {p for refs in beside.values() for p in refs}
    masks = find_masks(root, [p for p in images if p not in named], mask_files, masks_in)
    if masks.first_error() is not None:
        raise DataError(f"{masks.first_error()} (run `flux2-lora data validate`)")
    for path, _, _, reason in masks.problems:
        log.warning("%s: %s", path, reason)
    items: list[Item] = []
    for path in images:
        if path in named:
            continue
        caption_file = path.with_suffix(".txt")
        rel = path.relative_to(root).as_posix()
        json_file = path.with_suffix(".json")
        refs = listed.get(rel) or beside.get(path, ())
        if len(refs) > MAX_REFERENCES:
            raise DataError(f"{path}: {len(refs)} reference images; FLUX.2 takes up to {MAX_REFERENCES}")
        if rel in records:
            caption = records[rel][0]
        elif not caption_file.exists() and json_file.exists():
            caption = read_json_caption(json_file)
        elif caption_file.exists():
            caption = read_caption(caption_file)
            if not caption:
                if instance_prompt is None:
                    raise DataError(f"{caption_file}: caption is empty (write one or set data.instance_prompt)")
                caption = instance_prompt
        elif instance_prompt is not None:
            caption = instance_prompt
        else:
            raise DataError(f"{path}: no caption file {caption_file.name} (add one or set data.instance_prompt)")
        items.append(Item(path, caption, refs, masks.of.get(path)))
    if not items:
        raise DataError(f"{root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    _check_mask_sizes(items)
    return items


def _check_mask_sizes(items: list[Item]) -> None:
    """A mask of another size than its image stops the run before the text encoder runs (file headers only)."""
    from .masks import mask_size

    for item in items:
        if item.mask is None:
            continue
        try:
            mask, image = mask_size(item.mask), mask_size(item.image)
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is read, naming it
            continue
        if mask != image:
            raise DataError(
                f"{item.mask}: mask is {mask[0]}x{mask[1]}, its image {image[0]}x{image[1]} (a mask must have its "
                "image's size; `flux2-lora data validate` lists every problem)"
            )


def load_image(source: Path | IO[bytes], name: str | None = None) -> Image.Image:
    """RGB image with EXIF orientation applied; alpha composited onto ALPHA_BACKGROUND.

    Animated files (GIF/APNG/WebP) use their first frame, with a warning. 16-bit images are scaled to
    8 bits; CMYK and palette images are converted to RGB.
    """
    label = name or str(source)
    try:
        with Image.open(source) as opened:
            if getattr(opened, "n_frames", 1) > 1:
                log.warning("%s: animated image, training on its first frame", label)
            opened.seek(0)
            im: Image.Image = ImageOps.exif_transpose(opened)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, ALPHA_BACKGROUND)
                bg.paste(im, mask=im.getchannel("A"))
                return bg
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{label}: cannot read image ({e})") from None
