"""The Dataset tab's view of a recipe's sources: each source of `data.datasets` (or `data.dataset` alone) with its
images, masked images and share of an epoch, and their thumbnails with the masks laid over them.

No Gradio here: plain values (rows, text, pictures) that the tests check directly and app.py only places.

Samples per epoch are counted from the files: (images - holdout) x repeats x resolutions, the holdout taken off as
the cache stage does (only when 0 < holdout < images; never from a regularisation source). Shards, patterns and
cache folders are read as they are at training time and not counted here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..sources import Source, is_pattern, resolve_sources
from .paths import Roots, UiError
from .views import DatasetEntry, dataset_entries, thumbnails

HEADERS = [
    "source",
    "path",
    "role",
    "repeats",
    "resolutions",
    "images",
    "masked",
    "samples / epoch",
    "share %",
    "note",
]


@dataclass
class SourceView:
    """One source as the page shows it: where it was read from, what was counted (None: not counted), and why not."""

    source: Source
    folder: Path | None = None  # the local folder read (None: not read)
    builtin: bool = False
    entries: list[DatasetEntry] = field(default_factory=list)
    counted: bool = False
    note: str = ""

    @property
    def images(self) -> int | None:
        return len(self.entries) if self.counted else None

    @property
    def masked(self) -> int | None:
        return sum(e.mask is not None for e in self.entries) if self.counted else None

    @property
    def trained(self) -> int | None:
        """Images trained on: less the holdout (as the cache stage takes it: only when 0 < holdout < images)."""
        n, h = self.images, self.source.holdout
        if n is None:
            return None
        return n - h if 0 < h < n else n

    @property
    def samples(self) -> int | None:
        n = self.trained
        return None if n is None else n * self.source.repeats * len(self.source.resolutions)


def recipe_argv(preset: str | None, config: str | None, roots: Roots) -> list[str]:
    """`--preset P --config FILE` (either alone) for the recipe picked in the page; the file inside the roots."""
    name = (preset or "").strip()
    argv = ["--preset", name] if name else []
    if (config or "").strip():
        argv += ["--config", roots.resolve(config, "recipe file")]
    if not argv:
        raise UiError("recipe file: required (a recipe YAML with data.datasets, or a preset)")
    return argv


def read_source(src: Source, roots: Roots) -> SourceView:
    """A source's folder (inside the roots) and its items with their masks; a source that cannot be counted here
    has a note saying why."""
    view = SourceView(src)
    if is_pattern(src.path):
        view.note = "shards: read at training time, not counted here"
        return view
    try:
        folder, view.builtin = roots.dataset(
            src.path, f"{src.field}.path" if src.field != "data.dataset" else src.field
        )
    except (UiError, DataError) as e:
        view.note = str(e).splitlines()[0]
        return view
    if folder.is_file() or (folder / "index.json").is_file():
        view.note = f"{'a shard' if folder.is_file() else 'a cache folder'}: read as it is, not counted here"
        return view
    mask_dir = None
    if src.mask_dir is not None:
        name = f"{src.field}.mask_dir" if src.field != "data.dataset" else "data.mask_dir"
        try:
            mask_dir = Path(roots.resolve(src.mask_dir, name))
        except UiError as e:
            view.note = str(e)
            return view
    view.folder = folder
    view.entries, refused = dataset_entries(folder, mask_dir)
    view.counted = True
    if refused:
        view.note = f"training would refuse it: {refused}"
    return view


def read_sources(recipe: Any, roots: Roots) -> list[SourceView]:
    """Every source of a parsed recipe (parse_recipe(..., need_data=True)), read."""
    return [read_source(src, roots) for src in resolve_sources(recipe.data)]


def _share(view: SourceView, total: int) -> float | None:
    return None if view.samples is None or not total else round(100.0 * view.samples / total, 1)


def sources_table(views: list[SourceView]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of the sources table; a count that was not taken is "-"."""
    total = sum(v.samples or 0 for v in views)
    rows = []
    for v in views:
        s = v.source
        share = _share(v, total)
        rows.append(
            [
                s.field,
                s.path,
                s.role,
                s.repeats,
                ", ".join(str(r) for r in s.resolutions),
                "-" if v.images is None else v.images,
                "-" if v.masked is None else v.masked,
                "-" if v.samples is None else v.samples,
                "-" if share is None else share,
                v.note,
            ]
        )
    return HEADERS, rows


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def sources_summary(views: list[SourceView], name: str) -> str:
    """The page's summary: totals, then one line per source with its counts and share of the epoch."""
    total = sum(v.samples or 0 for v in views)
    roles = {r: sum(v.source.role == r for v in views) for r in ("train", "regularisation")}
    head = f"**{name}**: {_plural(len(views), 'source')} ({roles['train']} train"
    head += f", {roles['regularisation']} regularisation)" if roles["regularisation"] else ")"
    counted = [v for v in views if v.counted]
    if counted:
        images = sum(v.images or 0 for v in counted)
        masked = sum(v.masked or 0 for v in counted)
        head += f": {_plural(images, 'image')}, {masked} masked, {_plural(total, 'sample')} per epoch"
    lines = [head, ""]
    for i, v in enumerate(views, 1):
        s = v.source
        what = f"{i}. `{s.field}` {Path(s.path).name or s.path} ({s.role}): "
        if v.counted:
            what += f"{_plural(v.images or 0, 'image')}, {v.masked} masked, {_plural(v.samples or 0, 'sample')} "
            what += f"per epoch ({_share(v, total) or 0:g}%)"
        else:
            what += "not counted"
        lines.append(what + (f" — {v.note}" if v.note else ""))
    lines += [
        "",
        "Samples per epoch = (images - holdout) x repeats x resolutions, counted from the files; the share is of "
        "the counted sources. Red on a thumbnail: what its loss mask leaves out of the loss.",
    ]
    return "\n".join(lines)


def sources_gallery(views: list[SourceView], tile_dir: Path, limit: int = 48) -> list[tuple[str, str]]:
    """The thumbnails of every counted source (an even share of `limit` each, at least 6), captions numbered by
    source, masks laid over the images."""
    read = [v for v in views if v.counted and v.folder is not None]
    each = max(6, limit // max(1, len(read)))
    out: list[tuple[str, str]] = []
    for i, v in enumerate(views, 1):
        if v.counted and v.folder is not None:
            out += thumbnails(
                v.folder, each, tile_dir=tile_dir, copy_plain=v.builtin, entries=v.entries, prefix=f"[{i}] "
            )
    return out


__all__ = [
    "HEADERS",
    "SourceView",
    "read_source",
    "read_sources",
    "recipe_argv",
    "sources_gallery",
    "sources_summary",
    "sources_table",
]
