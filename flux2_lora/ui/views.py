"""What the browser shows, read from folders on disk: a dataset's report, a run's progress, a sweep's trials.

No Gradio here: each function returns plain values (text, rows, paths), so the tests check them directly and the
app only places them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.folder import IMAGE_EXTENSIONS
from ..data.validate import find_caption, read_metadata
from ..errors import DataError
from ..plots import loss_plot

# ---------------------------------------------------------------------------------------------------- dataset


def problem_rows(report: Any) -> list[list[str]]:
    """validate's problems as table rows: severity, file (relative to the dataset), code, reason."""
    return [[p.severity, report.rel(p.path), p.code, p.reason] for p in report.problems]


@dataclass(frozen=True)
class DatasetEntry:
    """One thing the trainer reads: a target image, its caption ("" when it has none) and its references."""

    image: Path
    caption: str
    references: tuple[Path, ...] = ()
    mask: Path | None = None  # its loss mask (data/masks.py)


def dataset_entries(root: Path, mask_dir: Path | None = None) -> tuple[list[DatasetEntry], str | None]:
    """The dataset's items as training reads them (scan_folder: references joined to their targets, loss masks
    found beside the images or in `mask_dir`), and None; on a folder training refuses (a bad metadata.jsonl, a
    reference without its target, two masks for one image), every image as an entry of its own with the masks that
    are plain to find, and the refusal's one line. A missing caption is shown, not refused: `data validate`
    reports it."""
    from ..data.folder import scan_folder
    from ..data.masks import find_masks, resolve_mask_dir, split_masks

    try:
        items = scan_folder(root, instance_prompt="", mask_dir=mask_dir)
    except DataError as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        return [DatasetEntry(i.image, i.caption, tuple(i.references), i.mask) for i in items], None
    metadata, _ = read_metadata(root)
    files: list[Path] = []
    for p in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        if p.suffix.lower() not in IMAGE_EXTENSIONS or any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_symlink() or not p.is_file():
            continue
        files.append(p)
    try:
        masks_in = resolve_mask_dir(mask_dir, root)
    except DataError:
        masks_in = None  # the refusal above names it
    images, mask_files, _ = split_masks(files, masks_in)
    masks = find_masks(root, images, mask_files, masks_in).of
    out: list[DatasetEntry] = []
    for p in images:
        try:
            caption = find_caption(p, metadata, root).text or ""
        except (OSError, UnicodeDecodeError):
            caption = ""
        out.append(DatasetEntry(p, caption, mask=masks.get(p)))
    return out, why


def reference_summary(entries: list[DatasetEntry]) -> str:
    """'12 items, 12 with references (8 with 1, 4 with 2)' or '12 items, none with references'."""
    counts: dict[int, int] = {}
    for e in entries:
        if e.references:
            counts[len(e.references)] = counts.get(len(e.references), 0) + 1
    text = f"{len(entries)} item{'' if len(entries) == 1 else 's'}, "
    if not counts:
        return text + "none with references"
    n = sum(counts.values())
    text += f"{'all' if n == len(entries) and n > 1 else n} with references"
    if len(counts) > 1 or n != len(entries):
        text += " (" + ", ".join(f"{c} with {k}" for k, c in sorted(counts.items())) + ")"
    else:
        text += f" ({next(iter(counts))} each)"
    return text


def entry_caption(entry: DatasetEntry, root: Path) -> str:
    """The gallery line: `rel: caption`, then the references by name when there are any, then the loss mask."""
    rel = entry.image.relative_to(root).as_posix()
    text = f"{rel}: {entry.caption or '(no caption)'}"
    if entry.references:
        k = len(entry.references)
        names = ", ".join(r.relative_to(root).as_posix() for r in entry.references)
        text += f" — {k} reference{'' if k == 1 else 's'}: {names}"
    if entry.mask is not None:
        name = Path(os.path.relpath(entry.mask, root)).as_posix()  # a mask folder beside it: ../masks/x.png
        text += f" — mask: {name} (red: not trained)"
    return text


MASK_TINT = (230, 20, 20)  # the colour laid over what a loss mask ignores
MASK_ALPHA = 0.6  # its opacity where the mask is black (weight 0); grey in proportion, white untouched


def mask_overlay(image: Any, mask: Any) -> Any:
    """`image` (PIL) as RGB with what its loss mask ignores tinted red: `mask` is `masks.open_mask`'s "F" image of
    weights in 0..1, resized to the image's size when it differs (a thumbnail)."""
    import numpy as np
    from PIL import Image

    weights = mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.BILINEAR)
    w = np.clip(np.asarray(weights, dtype=np.float32), 0.0, 1.0)[..., None]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    alpha = (1.0 - w) * MASK_ALPHA
    out = rgb * (1.0 - alpha) + np.asarray(MASK_TINT, dtype=np.float32) * alpha
    return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8), "RGB")


TILE = 192  # the height of a gallery tile drawn here


def _tile(entry: DatasetEntry, out_dir: Path) -> Path:
    """A picture of one item: its references small on the left, an arrow, then the target (a plain item: the
    target alone) with its loss mask laid over it (`mask_overlay`). Drawn once per set of files: the name hashes
    their paths, sizes and times."""
    import uuid

    from PIL import Image, ImageDraw, ImageOps

    from ..data.folder import load_image
    from ..data.masks import open_mask

    files = [entry.image, *entry.references, *([entry.mask] if entry.mask is not None else [])]
    stamp_of = "|".join(f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    stamp_of += f"|mask={entry.mask is not None}"
    path = out_dir / f"tile-{hashlib.sha1(stamp_of.encode()).hexdigest()[:16]}.png"
    if path.exists():
        return path
    target = ImageOps.contain(load_image(entry.image), (2 * TILE, TILE))
    if entry.mask is not None:
        target = mask_overlay(target, open_mask(entry.mask))
    k, pad = len(entry.references), 4
    rows = 1 if k <= 1 else 2 if k <= 4 else 3
    small = (TILE - pad * (rows - 1)) // rows if rows > 1 else TILE // 2
    left = -(-k // rows) * (small + pad)
    arrow = 24 if k else 0
    canvas = Image.new("RGB", (left + arrow + target.width, TILE), (236, 236, 236))
    for i, ref in enumerate(entry.references):
        im = ImageOps.contain(load_image(ref), (small, small))
        x = (i // rows) * (small + pad) + (small - im.width) // 2
        y = ((i % rows) * (small + pad) if rows > 1 else (TILE - small) // 2) + (small - im.height) // 2
        canvas.paste(im, (x, y))
    if k:
        mid, x0 = TILE // 2, left + 2
        ImageDraw.Draw(canvas).polygon([(x0, mid - 8), (x0 + arrow - 6, mid), (x0, mid + 8)], fill=(90, 90, 90))
    canvas.paste(target, (left + arrow, (TILE - target.height) // 2))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{path.stem}-{uuid.uuid4().hex[:8]}.png"  # two pages drawing one tile never mix
    canvas.save(tmp)
    tmp.replace(path)
    return path


def thumbnails(
    root: Path,
    limit: int = 48,
    tile_dir: Path | None = None,
    copy_plain: bool = False,
    mask_dir: Path | None = None,
    entries: list[DatasetEntry] | None = None,
    prefix: str = "",
) -> list[tuple[str, str]]:
    """(picture, caption) for the first `limit` items in file order, with the caption the trainer would read and the
    item's references and loss mask named. With `tile_dir`, an item with references or a mask is drawn there (as
    references -> target, the mask tinting red what it ignores; so is every item when `copy_plain`: a folder the
    browser may not read, such as a built-in dataset's). `entries`: dataset_entries(root, mask_dir) if known."""
    if entries is None:
        entries, _ = dataset_entries(root, mask_dir)
    out: list[tuple[str, str]] = []
    for e in entries[:limit]:
        picture = str(e.image)
        if tile_dir is not None and (e.references or e.mask is not None or copy_plain):
            try:
                picture = str(_tile(e, tile_dir))
            except (OSError, DataError):
                pass  # an unreadable file: validate names it; the gallery shows what it can
        out.append((picture, prefix + entry_caption(e, root)))
    return out


# -------------------------------------------------------------------------------------------------- training


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written right now
    return out


def _recipe(out: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load((out / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def dotted(recipe: dict[str, Any], name: str) -> Any:
    node: Any = recipe
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def recipe_value(out: Path, name: str) -> Any:
    """A dotted field of a run's recorded recipe.yaml (None when the file or the field is missing)."""
    return dotted(_recipe(out), name)


@dataclass
class RunView:
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    val_loss: float | None = None
    steps_per_s: float | None = None
    eta_s: float | None = None
    lora: str | None = None
    loss_png: str | None = None
    samples: list[tuple[str, str]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0

    def progress_text(self, state: str) -> str:
        parts = [f"step {self.step}" + (f" of {self.max_steps} ({100 * self.fraction:.0f}%)" if self.max_steps else "")]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val_loss is not None:
            parts.append(f"val_loss {self.val_loss:.4f}")
        if state == "running" and self.steps_per_s:
            parts.append(f"{self.steps_per_s:.2f} steps/s")
            if self.eta_s is not None:
                parts.append(f"ETA {format_seconds(self.eta_s)}")
        return ", ".join(parts)


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_view(out: Path, plot_dir: Path | None = None) -> RunView:
    """A training run's state from its folder: progress, latest losses, ETA, plot, samples, checkpoints, LoRA."""
    v = RunView()
    recipe = _recipe(out)
    v.max_steps = dotted(recipe, "training.max_steps")
    records = read_metrics(out / "metrics.jsonl")
    for rec in records:
        v.step = max(v.step, int(rec.get("step", 0)))
        if isinstance(rec.get("loss"), float) and math.isfinite(rec["loss"]):
            v.loss = rec["loss"]
            v.steps_per_s = rec.get("steps_per_s")
        if isinstance(rec.get("val_loss"), float):
            v.val_loss = rec["val_loss"]
    if v.steps_per_s and v.max_steps:
        v.eta_s = max(0, v.max_steps - v.step) / v.steps_per_s
    if plot_dir is not None and len(records) >= 2:
        plot_dir.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha1(str(out).encode()).hexdigest()[:10]
        png = plot_dir / f"loss-{key}-{len(records)}.png"
        if not png.exists():
            for old in plot_dir.glob(f"loss-{key}-*.png"):
                old.unlink(missing_ok=True)
            loss_plot(out / "metrics.jsonl", png)
        v.loss_png = str(png) if png.exists() else None
    grids = sorted((out / "samples").glob("step-*-grid.png"))
    v.samples = [(str(p), p.stem.replace("-grid", "").replace("step-", "step ")) for p in reversed(grids[-4:])]
    v.checkpoints = checkpoints(out)
    if (out / "lora.safetensors").exists():
        v.lora = str(out / "lora.safetensors")
    return v


def checkpoints(out: Path) -> list[str]:
    """A run's LoRA files in step order: each checkpoints/step-N/lora.safetensors, then the final lora.safetensors."""
    steps = []
    for d in (out / "checkpoints").glob("step-*"):
        if (d / "lora.safetensors").exists() and d.name[5:].isdigit():
            steps.append((int(d.name[5:]), str(d / "lora.safetensors")))
    found = [p for _, p in sorted(steps)]
    if (out / "lora.safetensors").exists():
        found.append(str(out / "lora.safetensors"))
    return found


def checkpoint_label(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.parent.name.startswith("step-") else "final"


# ----------------------------------------------------------------------------------------------------- sweeps


@dataclass
class SweepView:
    requested: int = 0
    max_steps: int = 0
    names: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)  # trial, params..., step, val_loss, state
    best: tuple[str, float] | None = None
    best_config: str | None = None
    plots: list[str] = field(default_factory=list)
    finished: bool = False

    @property
    def headers(self) -> list[str]:
        return ["trial", *[n.split(".")[-1] for n in self.names], "step", "val_loss", "state"]

    def summary(self) -> str:
        done = sum(r[-1] != "running" for r in self.rows)
        text = f"{len(self.rows)} of {self.requested} trials started, {done} ended"
        if self.best is not None:
            text += f"; best so far: trial {self.best[0]}, val_loss {self.best[1]:.5f}"
        return text


def sweep_view(out: Path) -> SweepView:
    """A sweep's trials from O/trials/<id>/ while it runs; the final summary once optimization_results.json exists."""
    v = SweepView()
    try:
        sweep = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        sweep = {}
    v.requested = int(sweep.get("trials", 0))
    v.max_steps = int(sweep.get("max_steps", 0))
    v.names = [p["name"] for p in sweep.get("space", [])]
    final = {}
    results = out / "optimization_results.json"
    if results.exists() and (out / "trials_data.json").exists():
        v.finished = True
        for t in json.loads((out / "trials_data.json").read_text()):
            final[t["trial_id"]] = t
    for d in sorted((out / "trials").glob("*"), key=lambda p: p.stat().st_mtime):
        if not d.is_dir():
            continue
        recipe = _recipe(d)
        vals = [r["val_loss"] for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r]
        steps = [r["step"] for r in read_metrics(d / "metrics.jsonl")]
        t = final.get(d.name)
        state = t["state"] if t else ("completed" if (d / "lora.safetensors").exists() else "running")
        val = vals[-1] if vals else None
        v.rows.append([d.name, *[dotted(recipe, n) for n in v.names], max(steps, default=0), val, state])
        if state == "completed" and val is not None and (v.best is None or val < v.best[1]):
            v.best = (d.name, val)
    if v.finished:
        summary = json.loads(results.read_text())
        if summary.get("best_value") is not None:
            v.best = (summary["best_trial"], summary["best_value"])
        if (out / "best_config.yaml").exists():
            v.best_config = str(out / "best_config.yaml")
        v.plots = [
            str(p) for p in (out / n for n in ("optimization_history.png", "validation_curves.png")) if p.exists()
        ]
    return v


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")
