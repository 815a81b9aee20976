"""`flux2-lora data validate --fix`: a cleaned copy of a dataset folder, written from its validation `Report`.

The dataset folder is only read, never modified. Files with errors, duplicates and orphan captions are left out;
caption byte-order marks and whitespace are fixed, metadata.jsonl captions become .txt files, and images training
would have to convert (EXIF rotation, CMYK, palette, 16-bit, alpha, animation) are re-saved as RGB PNG. An editing
item goes with its reference images, or is left out with them when one has an error; in the copy they sit beside
their target as `<stem>_ref0`, `<stem>_ref1`, ... in training's order (from a references/ folder or metadata.jsonl
too: that file is not copied), so the copy scans to the same items. An image's loss mask goes beside its copy as
`<stem>.mask.png` (from a mask folder too, so the copy needs no mask_dir); a bad mask drops its image with it, a mask
of no image is left out. Every change is one line, returned and written to FIXES.txt in the copy. Checking the
folder is `validate`'s job: this module only acts on its report. `check_output_folder` is shared with `augment`,
which also writes a derived dataset.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .folder import DataError, load_image
from .validate import (
    CAPTION_SUFFIX,
    FIXES_FILE,
    METADATA_FILE,
    Caption,
    Report,
    dataset_root,
    find_caption,
    image_files,
    inside,
    is_hidden,
    is_regular,
    quiet_folder_log,
    read_metadata,
    walk,
)


def check_output_folder(root: Path, out: str | os.PathLike[str]) -> Path:
    """A folder to write a derived dataset into: not inside root, and empty or absent (else DataError)."""
    out_path = Path(out).resolve()
    if inside(out_path, root):
        raise DataError(f"{out}: output folder is inside the dataset folder {root} (choose another place)")
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise DataError(f"{out}: output folder exists and is not empty")
    out_path.mkdir(parents=True, exist_ok=True)
    return out_path


def rgb_resave_reason(path: Path) -> str | None:
    """Why the image should be re-saved as an RGB PNG (EXIF rotation, CMYK, palette, 16-bit, alpha, animation)."""
    with Image.open(path) as im:
        mode = im.mode
        orientation = im.getexif().get(0x0112, 1)
        animated = bool(getattr(im, "is_animated", False))
        transparent = "transparency" in im.info
    reasons = []
    if orientation not in (1, None):
        reasons.append(f"EXIF orientation {orientation} applied")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or transparent:
        reasons.append("alpha composited onto white")
    elif mode == "P":
        reasons.append("palette")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        reasons.append("16-bit")
    elif mode not in ("RGB", "L"):
        reasons.append(mode)
    if animated:
        reasons.append("first frame of an animation")
    return ", ".join(reasons) or None


class _Fixer:
    def __init__(self, report: Report, out: Path, instance_prompt: str | None) -> None:
        self.report, self.root, self.out = report, report.root, out
        self.instance_prompt = instance_prompt
        self.lines: list[str] = []
        self.errors: dict[Path, list[str]] = {}
        for p in report.problems:
            if p.severity == "error" or p.code == "duplicate":
                self.errors.setdefault(p.path, []).append(p.reason)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def run(self) -> list[str]:
        metadata, _ = read_metadata(self.root)
        images = image_files(self.root)
        images = [p for p in images if p not in self.report.reference_files and p not in self.report.mask_files]
        self.not_copied(images, metadata)
        if metadata:
            self.lines.append(f"{METADATA_FILE}: captions written as .txt files next to their images")
        with quiet_folder_log():
            for image in tqdm(images, desc="fix", unit="image", disable=None, leave=False):
                self.image(image, metadata)
        return sorted(self.lines, key=lambda line: line.split(": ", 1)[0])

    def not_copied(self, images: list[Path], metadata: dict[Path, tuple[str, int]]) -> None:
        """A line for each file left out that is not an image (or the caption of one) dropped further on."""
        image_set = set(images)
        captions = {p.with_suffix(CAPTION_SUFFIX) for p in images if p not in metadata}
        orphans = {p.path for p in self.report.problems if p.code == "orphan-caption"}
        used = {r for refs in self.report.references.values() for r in refs}
        masks = set(self.report.masks.values())
        ref_captions = {p.path for p in self.report.problems if p.code == "reference-caption"}
        for path in walk(self.root)[0]:
            if path in image_set or path in captions or path.parent == self.root and path.name == METADATA_FILE:
                if path in self.errors and path.name == METADATA_FILE:
                    self.lines.append(f"{self.rel(path)}: not copied ({'; '.join(self.errors[path])})")
                continue
            if path in used or path in masks:  # copied with its item, or named in the line of the item dropped
                continue
            if path in self.report.mask_files and path not in self.errors:
                self.lines.append(f"{self.rel(path)}: not copied (a mask training does not use)")
                continue
            if path in self.report.reference_files and path not in self.errors:
                self.lines.append(f"{self.rel(path)}: not copied (a reference image training does not use)")
            elif path in ref_captions:
                self.lines.append(f"{self.rel(path)}: dropped (caption of a reference image: training ignores it)")
            elif path in self.errors:
                self.lines.append(f"{self.rel(path)}: not copied ({'; '.join(self.errors[path])})")
            elif path in orphans:
                self.lines.append(f"{self.rel(path)}: dropped (orphan caption: no image)")
            elif path.suffix != CAPTION_SUFFIX and not is_hidden(path, self.root) and is_regular(path):
                self.lines.append(f"{self.rel(path)}: not copied (not an image or a caption)")

    def image(self, image: Path, metadata: dict[Path, tuple[str, int]]) -> None:
        txt = image.with_suffix(CAPTION_SUFFIX)
        reasons = self.errors.get(image, [])
        if image not in metadata and txt in self.errors:
            reasons = reasons + [f"{txt.name}: {r}" for r in self.errors[txt]]
        for ref in self.report.references.get(image, ()):
            reasons = reasons + [f"reference {self.rel(ref)}: {r}" for r in self.errors.get(ref, [])]
        mask = self.report.masks.get(image)
        if mask is not None:
            reasons = reasons + [f"mask {self.report.rel(mask)}: {r}" for r in self.errors.get(mask, [])]
        if reasons:
            self.lines.append(f"{self.rel(image)}: dropped ({'; '.join(reasons)})")
            return
        try:
            caption = find_caption(image, metadata, self.root)
        except (OSError, UnicodeDecodeError) as e:  # changed since the report was made
            self.lines.append(f"{self.rel(image)}: dropped (caption unreadable: {e})")
            return
        text = caption.text or self.instance_prompt
        if text is None:
            self.lines.append(f"{self.rel(image)}: dropped (no caption)")
            return
        target = self.write_image(image)
        if target is None or not self.write_mask(image, target) or not self.write_references(image, target):
            return
        self.write_caption(image, target, text, caption)

    def write_references(self, image: Path, target: Path) -> bool:
        """The item's references beside its copy as <stem>_ref<n> in order; False (the item dropped) on a failure."""
        refs = self.report.references.get(image, ())
        written: list[Path] = []
        try:
            for n, ref in enumerate(refs):
                dest = target.with_name(f"{target.stem}_ref{n}{ref.suffix}")
                why = rgb_resave_reason(ref)
                if why is None:
                    shutil.copyfile(ref, dest)
                else:
                    dest = dest.with_suffix(".png")
                    load_image(ref).save(dest)
                    self.lines.append(
                        f"{self.rel(ref)}: re-saved as RGB PNG {dest.relative_to(self.out).as_posix()} ({why})"
                    )
                written.append(dest)
        except (OSError, DataError, ValueError) as e:
            for p in [target, target.with_name(f"{target.stem}.mask.png"), *written]:
                p.unlink(missing_ok=True)
            self.lines.append(f"{self.rel(image)}: dropped (cannot copy a reference image: {e})")
            return False
        names = [p.relative_to(self.out).as_posix() for p in written]
        if names != [self.rel(r) for r in refs]:
            self.lines.append(f"{self.rel(image)}: references written beside it as {', '.join(names)}")
        return True

    def write_mask(self, image: Path, target: Path) -> bool:
        """The image's loss mask beside its copy as <stem>.mask.png (from a mask folder too: the copy needs none);
        re-saved as a greyscale PNG when it is not a PNG or has an EXIF rotation. False (the item dropped) on a
        failure."""
        from .masks import MASK_TAG, open_mask

        mask = self.report.masks.get(image)
        if mask is None:
            return True
        dest = target.with_name(f"{target.stem}{MASK_TAG}.png")
        try:
            with Image.open(mask) as im:
                rotated = im.getexif().get(0x0112, 1) not in (1, None)
            if mask.suffix.lower() == ".png" and not rotated:
                shutil.copyfile(mask, dest)
                why = None
            else:
                weights = np.asarray(open_mask(mask), dtype=np.float32)
                Image.fromarray(np.round(weights * 255).astype(np.uint8), "L").save(dest)
                why = "EXIF orientation applied" if rotated else f"from {mask.suffix.lower()}"
        except (OSError, DataError, ValueError) as e:
            for p in (target, dest):
                p.unlink(missing_ok=True)
            self.lines.append(f"{self.rel(image)}: dropped (cannot copy its mask: {e})")
            return False
        name = dest.relative_to(self.out).as_posix()
        if why is not None:
            self.lines.append(f"{self.report.rel(mask)}: mask re-saved as greyscale PNG {name} ({why})")
        elif self.report.rel(mask) != name:
            self.lines.append(f"{self.report.rel(mask)}: mask written beside its image as {name}")
        return True

    def write_image(self, image: Path) -> Path | None:
        rel = image.relative_to(self.root)
        try:
            why = rgb_resave_reason(image)
            if why is None:
                target = self.out / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, target)
                return target
            name = rel.with_suffix(".png")
            if image.suffix != ".png" and os.path.lexists(self.root / name):  # a.jpg beside a.png: a.jpg.png
                name = rel.with_name(rel.name + ".png")
            target = self.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            load_image(image).save(target)
            self.lines.append(f"{rel.as_posix()}: re-saved as RGB PNG {name.as_posix()} ({why})")
            return target
        except (OSError, DataError, ValueError) as e:
            self.lines.append(f"{rel.as_posix()}: dropped (cannot convert: {e})")
            return None

    def write_caption(self, image: Path, target: Path, text: str, caption: Caption) -> None:
        rel = self.rel(image)
        if caption.source is None:
            self.lines.append(f"{rel}: caption filled with the instance prompt")
        elif not caption.text:
            self.lines.append(f"{rel}: empty caption replaced by the instance prompt")
        elif caption.source.suffix == CAPTION_SUFFIX:
            src = self.rel(caption.source)
            if caption.bom:
                self.lines.append(f"{src}: byte-order mark removed")
            if caption.raw_text is not None and caption.raw_text.strip("\n") != text:
                self.lines.append(f"{src}: whitespace normalised")
        target.with_suffix(CAPTION_SUFFIX).write_text(text + "\n", encoding="utf-8")


def fix_dataset(
    root: str | os.PathLike[str], out: str | os.PathLike[str], report: Report, instance_prompt: str | None = None
) -> list[str]:
    """Write a cleaned copy of root into out (root is never modified); the changes, one line each, also in FIXES.txt.

    Dropped: files with errors, duplicates, orphan captions, editing items with a bad reference. Fixed: caption BOM and whitespace; EXIF-rotated, CMYK,
    palette, 16-bit, transparent and animated images are re-saved as RGB PNG; missing or empty captions take
    instance_prompt when given; metadata.jsonl captions become .txt files.
    """
    root_path = dataset_root(root)
    if root_path != report.root:
        raise DataError(f"{root}: the report is for another folder ({report.root})")
    out_path = check_output_folder(root_path, out)
    lines = _Fixer(report, out_path, instance_prompt).run()
    (out_path / FIXES_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return lines
