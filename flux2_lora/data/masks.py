"""Loss masks: which file is whose mask, a mask read as a weight map, and that map at the latent grid.

An image's mask lies beside it or in the source's mask folder (`data.mask_dir`, `data.datasets[i].mask_dir`):

  photo.jpg  photo.txt  photo.mask.png         beside the image: its name, `.mask`, an image extension (.png best)
  MASK_DIR/sub/photo.png                       in the mask folder: the image's path relative to the dataset folder,
                                               any image extension (`photo.mask.png` there is read the same)

White trains, black is ignored, grey trains at partial weight: the mask is read as grey levels in 0..1 (EXIF
orientation applied as to the image; a transparent part counts as black; 16-bit masks keep their precision). A
mask must have its image's size. An image without a mask trains unmasked (weight 1 everywhere); a mask file is
never a training image, and a mask folder inside the dataset folder is not scanned for images.

In the cache stage the mask goes through `buckets.resize_to_bucket` with its image (the same scale and crop), and
is then averaged over each 16x16 pixel block: one weight per latent token (`latent_weights`). The loss
(`flow.flow_loss`) weights each token's squared error by it and divides by the sum of the weights, so a masked
sample's loss is its mean over the masked area, whatever the area's size.

`find_masks` follows training's rules and raises nothing: every problem (a mask with no image, one that could
belong to two images, two masks for one image, a mask folder's mask unused because one lies beside the image)
is a (path, severity, code, reason) for `data validate`; `scan_folder` raises the first error and logs the warnings.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .buckets import MULTIPLE, resize_to_bucket
from .folder import IMAGE_EXTENSIONS, DataError

MASK_TAG = ".mask"  # photo.mask.png is the mask of photo.<ext> beside it
Found = tuple[Path, Literal["error", "warning"], str, str]  # a validate.Problem's fields: path, severity, code, reason


def is_mask_name(path: Path) -> bool:
    """True for `<stem>.mask.<image extension>`: a mask beside its image, never a training image."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.lower().endswith(MASK_TAG) and len(path.stem) > 5


def _strip_tag(stem: str) -> str:
    return stem[: -len(MASK_TAG)] if stem.lower().endswith(MASK_TAG) and len(stem) > len(MASK_TAG) else stem


def resolve_mask_dir(mask_dir: str | os.PathLike[str] | None, root: Path) -> Path | None:
    """The mask folder, resolved (None without one); DataError when it is missing or is the dataset folder root."""
    if mask_dir is None:
        return None
    path = Path(mask_dir).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{mask_dir}: mask folder does not exist")
    if path == root.resolve():
        raise DataError(f"{mask_dir}: the mask folder is the dataset folder (give masks a folder of their own)")
    return path


def mask_dir_files(mask_dir: Path) -> tuple[list[Path], list[Path]]:
    """(image files, symbolic links) under a mask folder, sorted by relative path; links are never followed."""
    files: list[Path] = []
    links: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(mask_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath)
        for name in filenames:
            p = base / name
            if name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            (links if p.is_symlink() else files).append(p)
    key = lambda p: p.relative_to(mask_dir).as_posix()  # noqa: E731
    return sorted(files, key=key), sorted(links, key=key)


def without_masks(files: list[Path]) -> list[Path]:
    """files less the masks named `x.mask.png` (tools that see an image folder without a mask folder)."""
    return [p for p in files if not is_mask_name(p)]


def in_mask_dir(path: Path, mask_dir: Path | None) -> bool:
    """True for a file inside the (resolved) mask folder; its folders are resolved, never the file itself."""
    if mask_dir is None:
        return False
    try:
        return _inside(path.parent.resolve() / path.name, mask_dir)
    except OSError:
        return False


def is_mask_file(path: Path, mask_dir: Path | None) -> bool:
    """A file that is a mask, by its name or by lying in the mask folder."""
    return is_mask_name(path) or in_mask_dir(path, mask_dir)


def split_masks(files: list[Path], mask_dir: Path | None) -> tuple[list[Path], list[Path], list[Path]]:
    """(images, masks, links): the image files of a dataset folder split into training images and masks (named
    `x.mask.png`, or in the mask folder), the mask folder's files listed from it wherever it lies, and its symbolic
    links (refused, never followed)."""
    masks = [p for p in files if is_mask_file(p, mask_dir)]
    taken = set(masks)
    images = [p for p in files if p not in taken]
    links: list[Path] = []
    if mask_dir is not None:
        found, links = mask_dir_files(mask_dir)
        masks = [p for p in masks if not in_mask_dir(p, mask_dir)] + found
    return images, masks, links


@dataclass
class Masks:
    """Each training image's mask, every file taken as a mask, and the problems found (see the module docstring)."""

    root: Path
    mask_dir: Path | None = None
    of: dict[Path, Path] = field(default_factory=dict)  # image -> its mask
    files: set[Path] = field(default_factory=set)  # every mask file (beside images, in the mask folder)
    problems: list[Found] = field(default_factory=list)

    def add(self, path: Path, severity: Literal["error", "warning"], code: str, reason: str) -> None:
        self.problems.append((path, severity, code, reason))

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def first_error(self) -> str | None:
        """`path: reason` of the first error (what training stops on), or None."""
        return next((f"{path}: {reason}" for path, sev, _, reason in self.problems if sev == "error"), None)


def find_masks(root: Path, images: list[Path], masks: list[Path], mask_dir: Path | None = None) -> Masks:
    """The mask of every image among `images` (the training targets under root), from `masks`: the mask files found
    (`<stem>.mask.<ext>` under root, and the image files of the mask folder)."""
    out = Masks(root, mask_dir, files=set(masks))
    beside: dict[tuple[Path, str], list[Path]] = {}
    by_rel: dict[str, list[Path]] = {}
    for image in images:
        beside.setdefault((image.parent, image.stem), []).append(image)
        by_rel.setdefault(image.relative_to(root).with_suffix("").as_posix(), []).append(image)
    found: dict[Path, list[Path]] = {}  # image -> masks beside it, then masks in the folder
    in_dir: set[Path] = set()
    for mask in masks:
        if mask_dir is not None and _inside(mask, mask_dir):
            rel = mask.relative_to(mask_dir)
            want = rel.with_name(_strip_tag(rel.stem)).as_posix()
            owners = by_rel.get(want, [])
            where = f"{want}.jpg/.png/.webp in the dataset folder"
            in_dir.add(mask)
        else:
            stem = _strip_tag(mask.stem)
            owners = beside.get((mask.parent, stem), [])
            where = f"{stem}.jpg/.png/.webp beside it"
        if not owners:
            why = f"a mask without its image (no {where}); training ignores it"
            out.add(mask, "warning", "orphan-mask", why)
        elif len(owners) > 1:
            which = " and ".join(out.rel(p) for p in owners)
            out.add(mask, "error", "ambiguous-mask", f"a mask of which image? {which} share its name (rename one)")
        else:
            found.setdefault(owners[0], []).append(mask)
    for image, candidates in found.items():
        near = [m for m in candidates if m not in in_dir]
        far = [m for m in candidates if m in in_dir]
        chosen = near or far
        if len(chosen) > 1:
            which = " and ".join(out.rel(m) for m in chosen)
            out.add(image, "error", "duplicate-mask", f"two masks: {which} (keep one of them)")
            continue
        out.of[image] = chosen[0]
        for m in far if near else []:
            why = f"not used: {out.rel(near[0])} beside its image {out.rel(image)} is its mask (remove one of the two)"
            out.add(m, "warning", "unused-mask", why)
    return out


def _inside(path: Path, folder: Path) -> bool:
    p, f = os.path.normpath(path), os.path.normpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


# -------------------------------------------------------------------------------------------- reading a mask


def mask_size(source: Path | IO[bytes]) -> tuple[int, int]:
    """A mask's (or an image's) size as training reads it: EXIF orientation applied, the file decoded only in part."""
    with Image.open(source) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def open_mask(source: Path | bytes | IO[bytes], name: str | None = None) -> Image.Image:
    """A mask as an "F" image of weights in 0..1 (EXIF orientation applied; transparent = 0; 16-bit kept)."""
    label = name or str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            opened.seek(0)
            im = ImageOps.exif_transpose(opened)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im.convert("I"), dtype=np.float32) / 65535.0
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
            elif im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                grey = np.asarray(rgba.convert("L"), dtype=np.float32)
                arr = grey * np.asarray(rgba.getchannel("A"), dtype=np.float32) / (255.0 * 255.0)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise DataError(
            f"{label}: cannot read mask (not an image Pillow can read: corrupt or another format)"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{label}: cannot read mask ({e or type(e).__name__})") from None
    return Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32), "F")


def mask_problems(mask: Path | bytes, image: Path | bytes, mask_name: str, image_name: str) -> list[tuple[str, str]]:
    """(code, reason) of each error of an image's loss mask (`data validate`): it cannot be read, its size is not
    its image's, it is all black."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's warnings are about pixels the mask is converted from anyway
        try:
            weights = open_mask(mask, mask_name)
        except DataError as e:
            return [("unreadable-mask", str(e).removeprefix(f"{mask_name}: "))]
        try:
            size: tuple[int, int] | None = mask_size(io.BytesIO(image) if isinstance(image, bytes) else image)
        except Exception:  # an image that cannot be read: reported as such
            size = None
    if size is not None and weights.size != size:
        why = f"mask is {weights.width}x{weights.height}, its image {image_name} is {size[0]}x{size[1]}"
        return [("mask-size", why + " (a mask must have its image's size)")]
    if is_black(weights):
        return [
            ("black-mask", f"mask is all black: nothing of {image_name} would train (white = train, black = ignore)")
        ]
    return []


def is_black(mask: Image.Image) -> bool:
    """True for a mask (from `open_mask`) with no weight anywhere: nothing of its image would train."""
    return float(np.asarray(mask).max(initial=0.0)) <= 0.0


def latent_weights(mask: Image.Image, bucket: tuple[int, int]) -> torch.Tensor:
    """The mask (from `open_mask`) resized into its image's bucket as the image is (`resize_to_bucket`), then
    averaged over each 16x16 block: (height / 16, width / 16) float32 weights in 0..1, one per latent token."""
    pixels = np.clip(np.asarray(resize_to_bucket(mask, bucket), dtype=np.float32), 0.0, 1.0)
    h, w = pixels.shape
    blocks = pixels.reshape(h // MULTIPLE, MULTIPLE, w // MULTIPLE, MULTIPLE)
    return torch.from_numpy(blocks.mean(axis=(1, 3), dtype=np.float64).astype(np.float32))


__all__ = [
    "MASK_TAG",
    "Masks",
    "find_masks",
    "in_mask_dir",
    "is_black",
    "is_mask_file",
    "is_mask_name",
    "latent_weights",
    "mask_dir_files",
    "mask_problems",
    "mask_size",
    "open_mask",
    "resolve_mask_dir",
    "split_masks",
    "without_masks",
]
