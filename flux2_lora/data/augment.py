"""`flux2-lora data augment`: caption-preserving variants of every image (flip, crop, colour jitter) as a new folder.

Each variant's randomness comes from (seed, relative path, sample index) alone, so the output does not depend on
the order or the number of other files. The originals are not copied.

An editing item (reference images: the caption an instruction, the image the result) keeps its references: each
variant's references are written beside it (`photo_aug000_ref0.png`, ...) with the same change as its target:
the same flip and colour factors, and the crop as the same fraction of each reference's own width and height.
Pixel correspondence between a reference and the target (an edit pair of one size) is kept; a reference that does
not line up with the target (a colour swatch, a subject photo) is cropped by that fraction all the same, at most
20% of a side. An item whose references are broken (see `data validate`) is skipped with its reason.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from pathlib import Path

from PIL import Image, ImageEnhance
from tqdm.auto import tqdm

from .fix import check_output_folder
from .folder import DataError, load_image
from .masks import without_masks
from .validate import CAPTION_SUFFIX, dataset_root, find_caption, image_files, read_metadata
from .validate_refs import find_references

log = logging.getLogger(__name__)

MIN_CROP = 0.8  # a crop keeps at least this share of each side
JITTER = 0.15  # brightness, contrast and saturation factors within 1 +- JITTER


def augment_image(img: Image.Image, rng: random.Random) -> Image.Image:
    """One random variant: crop (>= 80% of each side), horizontal flip (half the time), colour jitter (+-15%)."""
    return augment_item(img, [], rng)[0]


def augment_item(
    img: Image.Image, references: list[Image.Image], rng: random.Random
) -> tuple[Image.Image, list[Image.Image]]:
    """augment_image of img, and the same crop (as a fraction of each side), flip and jitter of each reference."""
    w, h = img.size
    cw = rng.randint(math.ceil(w * MIN_CROP), w)
    ch = rng.randint(math.ceil(h * MIN_CROP), h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    flip = rng.random() < 0.5
    factors = [rng.uniform(1 - JITTER, 1 + JITTER) for _ in range(3)]

    def apply(im: Image.Image) -> Image.Image:
        sx, sy = im.width / w, im.height / h
        box = (round(x * sx), round(y * sy), round((x + cw) * sx), round((y + ch) * sy))
        out = im.crop(box)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhancer, factor in zip(
            (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors, strict=True
        ):
            out = enhancer(out).enhance(factor)
        return out

    return apply(img), [apply(r) for r in references]


def _targets(root: Path, images: list[Path]) -> dict[Path, str]:
    """Output name stem per image: `photo`, or `photo_jpg` when photo.png sits beside it too."""
    stems = Counter(p.relative_to(root).with_suffix("").as_posix().lower() for p in images)
    out = {}
    for p in images:
        rel = p.relative_to(root).with_suffix("")
        clash = stems[rel.as_posix().lower()] > 1
        out[p] = (rel.as_posix() + "_" + p.suffix[1:].lower()) if clash else rel.as_posix()
    return out


def augment_folder(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    samples_per_image: int,
    seed: int = 0,
    instance_prompt: str | None = None,
) -> tuple[int, list[str]]:
    """augment_dataset, also returning a line for each image skipped (unreadable, without a caption, or an editing
    item with broken references; a broken reference file is a line of its own)."""
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}")
    root_path = dataset_root(root)
    out_path = check_output_folder(root_path, out)
    metadata, _ = read_metadata(root_path)
    refs = find_references(root_path, without_masks(image_files(root_path)), set(metadata))
    errors = refs.errors()
    images = [p for p in without_masks(image_files(root_path)) if p not in refs.files]
    names = _targets(root_path, images)
    written = 0
    skipped = [f"{refs.rel(p)}: skipped ({'; '.join(errors[p])})" for p in sorted(refs.files) if p in errors]
    for path in tqdm(images, desc="augment", unit="image", disable=None, leave=False):
        rel = path.relative_to(root_path).as_posix()
        if path in errors:  # its references: missing, too many, ...
            skipped.append(f"{rel}: skipped ({'; '.join(errors[path])})")
            continue
        try:
            caption = find_caption(path, metadata, root_path).text or instance_prompt
            img = load_image(path)
            references = [load_image(r) for r in refs.of.get(path, ())]
        except (OSError, UnicodeDecodeError, DataError) as e:
            skipped.append(f"{rel}: skipped ({e})")
            continue
        if caption is None:
            skipped.append(f"{rel}: skipped (no caption)")
            continue
        for k in range(samples_per_image):
            target = out_path / f"{names[path]}_aug{k:03d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            variant, variant_refs = augment_item(img, references, random.Random(f"{seed}/{rel}/{k}"))
            variant.save(target)
            for n, ref in enumerate(variant_refs):
                ref.save(target.with_name(f"{target.stem}_ref{n}.png"))
            target.with_suffix(CAPTION_SUFFIX).write_text(caption + "\n", encoding="utf-8")
            written += 1
    return written, skipped


def augment_dataset(
    root: str | os.PathLike[str], out: str | os.PathLike[str], samples_per_image: int, seed: int = 0
) -> int:
    """Write samples_per_image augmented PNGs (with the same caption .txt) per image of root into out.

    out must not be inside root and must be empty or absent (DataError otherwise). Deterministic for a seed.
    Images that cannot be read or have no caption are skipped with a logged warning. Returns the number written.
    """
    written, skipped = augment_folder(root, out, samples_per_image, seed)
    for line in skipped:
        log.warning("%s", line)
    return written
