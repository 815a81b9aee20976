"""`flux2-lora data augment`: caption-preserving variants of every image (flip, crop, colour jitter) as a new folder.

Each variant's randomness comes from (seed, relative path, sample index) alone, so the output does not depend on
the order or the number of other files. The originals are not copied.
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
from .validate import CAPTION_SUFFIX, dataset_root, find_caption, image_files, read_metadata

log = logging.getLogger(__name__)

MIN_CROP = 0.8  # a crop keeps at least this share of each side
JITTER = 0.15  # brightness, contrast and saturation factors within 1 +- JITTER


def augment_image(img: Image.Image, rng: random.Random) -> Image.Image:
    """One random variant: crop (>= 80% of each side), horizontal flip (half the time), colour jitter (+-15%)."""
    w, h = img.size
    cw = rng.randint(math.ceil(w * MIN_CROP), w)
    ch = rng.randint(math.ceil(h * MIN_CROP), h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        out = enhancer(out).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    return out


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
    """augment_dataset, also returning a line for each image skipped (unreadable, or without a caption)."""
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}")
    root_path = dataset_root(root)
    out_path = check_output_folder(root_path, out)
    metadata, _ = read_metadata(root_path)
    images = image_files(root_path)
    names = _targets(root_path, images)
    written, skipped = 0, []
    for path in tqdm(images, desc="augment", unit="image", disable=None, leave=False):
        rel = path.relative_to(root_path).as_posix()
        try:
            caption = find_caption(path, metadata, root_path).text or instance_prompt
            img = load_image(path)
        except (OSError, UnicodeDecodeError, DataError) as e:
            skipped.append(f"{rel}: skipped ({e})")
            continue
        if caption is None:
            skipped.append(f"{rel}: skipped (no caption)")
            continue
        for k in range(samples_per_image):
            target = out_path / f"{names[path]}_aug{k:03d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            augment_image(img, random.Random(f"{seed}/{rel}/{k}")).save(target)
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
