"""Dataset folders: images with same-named .txt captions, scanned recursively in a stable order."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from ..errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
# Transparent pixels are composited onto this background before training.
ALPHA_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str


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
    path = root / "metadata.jsonl"
    if not path.exists():
        return {}
    captions: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            captions[str(rec["file_name"])] = " ".join(str(rec["text"]).split())
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: not a JSON object with file_name and text") from None
    return captions


def read_json_caption(path: Path) -> str:
    """Caption from a per-image JSON sidecar: {"caption": "..."} (or "text" / "prompt")."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8-sig"))
        text = next(rec[k] for k in ("caption", "text", "prompt") if isinstance(rec.get(k), str))
    except (ValueError, StopIteration, AttributeError):
        raise DataError(f"{path}: not a JSON object with a caption, text or prompt string") from None
    return " ".join(text.split())


def scan_folder(root: str | Path, instance_prompt: str | None = None) -> list[Item]:
    """Image/caption pairs under root, sorted by relative path.

    Captions come from root/metadata.jsonl, else x.txt, else a x.json sidecar. An image without a caption
    takes instance_prompt; without one that is an error naming the file.
    Symlinks are not followed.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    metadata = read_metadata(root)
    items: list[Item] = []
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.is_symlink():
            log.warning("%s: symlink refused, not followed (run `flux2-lora data validate`)", path)
            continue
        if not path.is_file():
            continue
        caption_file = path.with_suffix(".txt")
        rel = path.relative_to(root).as_posix()
        json_file = path.with_suffix(".json")
        if rel in metadata:
            caption = metadata[rel]
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
        items.append(Item(path, caption))
    if not items:
        raise DataError(f"{root}: no images found ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return items


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
