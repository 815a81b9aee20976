"""`flux2-lora data analyze`: what a dataset holds (sizes, shapes, caption lengths) as a table and a histogram PNG.

An editing dataset's reference images are not items: they get a line of their own (how many, per item) and two
rows (their short side, their megapixels), and the histogram a fourth panel, their short side."""

from __future__ import annotations

import math
import os
import statistics
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .masks import without_masks
from .tokens import count_tokens
from .validate import dataset_root, find_caption, image_files, read_metadata
from .validate_refs import find_references

# Aspect ratio (width / height) classes: (upper bound, label).
ASPECT_CLASSES = (
    (0.5, "< 1:2 (very tall)"),
    (0.75, "1:2 - 3:4 (portrait)"),
    (0.95, "3:4 - 1:1"),
    (1.05, "~1:1 (square)"),
    (1.34, "1:1 - 4:3"),
    (2.0, "4:3 - 2:1 (landscape)"),
    (math.inf, "> 2:1 (very wide)"),
)
BAR_COLOR = (31, 119, 180)


def _stats(values: list[float]) -> dict[str, float] | None:
    """min / median / p95 (nearest rank) / max; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]
    return {"min": ordered[0], "median": statistics.median(ordered), "p95": p95, "max": ordered[-1]}


def _displayed_size(path: Path) -> tuple[int, int]:
    """Width and height as training sees them (EXIF rotation applied); raises if the image cannot be decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            if im.format == "JPEG":
                im.draft("RGB", (max(w // 8, 1), max(h // 8, 1)))  # decode at 1/8 scale: fast, still complete
            im.load()
    return w, h


def _aspect_class(ratio: float) -> str:
    return next(label for bound, label in ASPECT_CLASSES if ratio < bound)


def analyze_dataset(root: str | os.PathLike[str], tokenizer: Any = None) -> dict[str, Any]:
    """Counts and distributions of a dataset folder. Unreadable images and captions are counted and skipped.

    Keys: root, n_images, n_unreadable, unreadable (relative paths), n_captioned, n_missing_captions,
    n_bad_captions, width/height/megapixels/short_side/aspect_ratio/caption_words/caption_tokens
    (each {min, median, p95, max} or None), aspect_classes ({label: count}), per_image (one dict per
    readable image: path, width, height, words, tokens, references: [[w, h], ...] of its readable references).
    Editing datasets: n_with_references, n_references, n_unreadable_references, references_per_item
    ({count: items}), reference_short_side / reference_megapixels (stats or None). Reference images are not images.
    """
    root_path = dataset_root(root)
    metadata, _ = read_metadata(root_path)
    per_image: list[dict[str, Any]] = []
    unreadable: list[str] = []
    missing = bad_captions = 0
    refs = find_references(root_path, without_masks(image_files(root_path)), set(metadata))
    images = [p for p in without_masks(image_files(root_path)) if p not in refs.files]
    for path in tqdm(images, desc="analyze", unit="image", disable=None, leave=False):
        rel = path.relative_to(root_path).as_posix()
        try:
            w, h = _displayed_size(path)
        except Exception:  # truncated, corrupt, bomb: counted, not fatal
            unreadable.append(rel)
            continue
        record: dict[str, Any] = {"path": rel, "width": w, "height": h, "words": None, "tokens": None}
        record["references"] = []
        for ref in refs.of.get(path, ()):
            try:
                record["references"].append(list(_displayed_size(ref)))
            except Exception:  # counted, not fatal
                unreadable.append(refs.rel(ref))
        try:
            caption = find_caption(path, metadata, root_path).text
        except (OSError, UnicodeDecodeError):
            caption, bad_captions = None, bad_captions + 1
        else:
            missing += caption is None
        if caption is not None:
            record["words"] = len(caption.split())
            record["tokens"] = count_tokens(tokenizer, caption) if tokenizer is not None else None
        per_image.append(record)
    stats = _summary(root_path, images, per_image, unreadable, missing, bad_captions)
    n_refs = [len(refs.of.get(p, ())) for p in images]
    sizes = [r for rec in per_image for r in rec["references"]]
    stats["n_with_references"] = sum(n > 0 for n in n_refs)
    stats["n_references"] = sum(n_refs)
    stats["n_unreadable_references"] = sum(n_refs) - sum(len(rec["references"]) for rec in per_image)
    stats["references_per_item"] = {n: n_refs.count(n) for n in sorted(set(n_refs))} if any(n_refs) else {}
    stats["reference_short_side"] = _stats([min(w, h) for w, h in sizes])
    stats["reference_megapixels"] = _stats([w * h / 1e6 for w, h in sizes])
    return stats


def _summary(
    root: Path,
    images: list[Path],
    per_image: list[dict[str, Any]],
    unreadable: list[str],
    missing: int,
    bad_captions: int,
) -> dict[str, Any]:
    sizes = [(r["width"], r["height"]) for r in per_image]
    ratios = [w / h for w, h in sizes if h]
    words = [r["words"] for r in per_image if r["words"] is not None]
    tokens = [r["tokens"] for r in per_image if r["tokens"] is not None]
    classes = {label: 0 for _, label in ASPECT_CLASSES}
    for ratio in ratios:
        classes[_aspect_class(ratio)] += 1
    return {
        "root": str(root),
        "n_images": len(images),
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
        "n_captioned": len(words),
        "n_missing_captions": missing,
        "n_bad_captions": bad_captions,
        "width": _stats([w for w, _ in sizes]),
        "height": _stats([h for _, h in sizes]),
        "megapixels": _stats([w * h / 1e6 for w, h in sizes]),
        "short_side": _stats([min(w, h) for w, h in sizes]),
        "aspect_ratio": _stats(ratios),
        "aspect_classes": classes,
        "caption_words": _stats(words),
        "caption_tokens": _stats(tokens),
        "per_image": per_image,
    }


def _num(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def format_analysis(stats: dict[str, Any]) -> str:
    """A readable table of analyze_dataset's result."""
    lines = [
        f"dataset: {stats['root']}",
        f"images: {stats['n_images']} ({stats['n_unreadable']} unreadable, skipped)",
        f"captions: {stats['n_captioned']} ({stats['n_missing_captions']} missing, {stats['n_bad_captions']} unreadable)",
    ]
    if stats.get("n_references"):
        per = ", ".join(f"{k} with {n}" for n, k in stats["references_per_item"].items())
        unread = stats["n_unreadable_references"]
        lines.append(
            f"references: {stats['n_references']} in {stats['n_with_references']} items ({per}; {unread} unreadable)"
        )
    lines += [
        "",
        f"{'':<16}{'min':>9}{'median':>9}{'p95':>9}{'max':>9}",
    ]
    rows = (
        ("width (px)", "width"),
        ("height (px)", "height"),
        ("megapixels", "megapixels"),
        ("short side (px)", "short_side"),
        ("aspect (w/h)", "aspect_ratio"),
        ("caption words", "caption_words"),
        ("caption tokens", "caption_tokens"),
        ("ref short side", "reference_short_side"),
        ("ref megapixels", "reference_megapixels"),
    )
    for label, key in rows:
        s = stats.get(key)
        if s is not None:
            lines.append(f"{label:<16}" + "".join(f"{_num(s[k]):>9}" for k in ("min", "median", "p95", "max")))
    lines += ["", "aspect ratio classes:"]
    lines += [f"  {label:<24}{n:>6}" for label, n in stats["aspect_classes"].items()]
    if stats["unreadable"]:
        lines += ["", "unreadable images (run `flux2-lora data validate` for the reasons):"]
        lines += [f"  {rel}" for rel in stats["unreadable"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- histogram


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # FreeType build of Pillow: a scalable font
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _nice_step(span: float, n: int = 5) -> float:
    """A 1, 2 or 5 times a power of ten step giving about n ticks over span."""
    raw = span / n
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _histogram(values: list[float], n_bins: int = 20) -> tuple[list[float], list[int]]:
    """Bin edges (n+1) and counts. Whole numbers in a short range get one bin per number; a single value is centred."""
    lo, hi = min(values), max(values)
    whole = all(float(v).is_integer() for v in values)
    if hi - lo < 1e-9:
        pad = max(abs(lo) * 0.1, 2.0 if whole else 0.05)
        lo, hi = lo - pad, hi + pad
    if whole and hi - lo <= 40:
        edges = [math.floor(lo) - 0.5 + i for i in range(math.ceil(hi) - math.floor(lo) + 2)]
    else:
        width = (hi - lo) / n_bins
        edges = [lo + i * width for i in range(n_bins + 1)]
    counts = [0] * (len(edges) - 1)
    width = edges[1] - edges[0]
    for v in values:
        counts[min(max(int((v - edges[0]) / width), 0), len(counts) - 1)] += 1
    return edges, counts


def _vertical_text(img: Image.Image, xy: tuple[float, float], text: str, font: Any) -> None:
    """text rotated 90 degrees (reading upwards), centred on xy."""
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill=255, font=font)
    label = label.rotate(90, expand=True)
    pos = (round(xy[0] - label.width / 2), round(xy[1] - label.height / 2))
    img.paste((0, 0, 0), (*pos, pos[0] + label.width, pos[1] + label.height), mask=label)


def _panel(img: Image.Image, box: tuple[int, int, int, int], values: list[float], title: str, xlabel: str) -> None:
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 80, x1 - 20, y0 + 34, y1 - 52
    d.text((x0 + 10, y0 + 6), title, fill=(0, 0, 0), font=font)
    d.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    _vertical_text(img, (x0 + 18, (top + bottom) / 2), "images", small)
    d.text(((left + right) / 2, y1 - 8), xlabel, fill=(0, 0, 0), font=small, anchor="ms")
    if not values:
        d.text((left + 10, top + 10), "no data", fill=(0, 0, 0), font=small)
        return
    edges, counts = _histogram(values)
    peak = max(counts)
    lo, span = edges[0], edges[-1] - edges[0]

    def x_at(v: float) -> float:
        return left + (v - lo) / span * (right - left)

    def y_at(c: float) -> float:
        return bottom - c / peak * (bottom - top - 8)

    for i, c in enumerate(counts):
        if c:
            d.rectangle((x_at(edges[i]) + 1, y_at(c), x_at(edges[i + 1]) - 1, bottom), fill=BAR_COLOR)
    step = max(1, math.ceil(peak / 4))
    for count in range(0, peak + 1, step):  # y ticks: whole image counts
        y = y_at(count)
        d.line((left - 5, y, left, y), fill=(0, 0, 0))
        d.text((left - 10, y), str(count), fill=(0, 0, 0), font=small, anchor="rm")
    tick = _nice_step(span)
    v = math.ceil(lo / tick) * tick
    while v <= edges[-1] + 1e-9:  # x ticks: round values
        x = x_at(v)
        d.line((x, bottom, x, bottom + 5), fill=(0, 0, 0))
        d.text((x, bottom + 8), f"{round(v, 6):g}", fill=(0, 0, 0), font=small, anchor="ma")
        v += tick


def plot_analysis(stats: dict[str, Any], out: str | os.PathLike[str], size: tuple[int, int] = (900, 840)) -> Path:
    """Three histograms, one above the other: short side, aspect ratio, caption length (tokens when counted); a
    fourth, the references' short side, for an editing dataset (size is then 4/3 as tall)."""
    per = stats["per_image"]
    short = [min(r["width"], r["height"]) for r in per]
    aspect = [r["width"] / r["height"] for r in per if r["height"]]
    tokens = [r["tokens"] for r in per if r["tokens"] is not None]
    words = [r["words"] for r in per if r["words"] is not None]
    caption, unit = (tokens, "tokens") if tokens else (words, "words")
    panels: list[tuple[list[Any], str, str]] = [
        (short, "Short side", "short side (pixels)"),
        (aspect, "Aspect ratio", "width / height  (1 = square, > 1 = landscape)"),
        (caption, "Caption length", f"caption length ({unit})"),
    ]
    ref_short = [min(r) for rec in per for r in rec.get("references", ())]
    if ref_short:
        panels.append((ref_short, "Reference short side", "reference image short side (pixels)"))
    w, h = size[0], size[1] * len(panels) // 3
    img = Image.new("RGB", (w, h), "white")
    rows = len(panels)
    for i, (values, title, xlabel) in enumerate(panels):
        _panel(img, (0, i * h // rows, w, (i + 1) * h // rows), values, f"{title}  ({len(values)} images)", xlabel)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
