"""A recipe's data sources: `data.datasets` (or the short form `data.dataset`) resolved, and their checks.

Every source becomes a `Source` with each setting decided (a field it leaves unset takes the `data.*` value), and
one *cache entry* per resolution (`Source.resolutions`): the cache stage builds each entry on its own, so adding a
source or a resolution does not rebuild the others (data/cache.py, train.py `_prepare_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError

ROLES = ("train", "regularisation")
MAX_REPEATS = 10_000  # copies of an image per epoch: past this an epoch is a typo, not a plan
CAPTION_VARIANTS_SHUFFLED = 8  # data.caption_variants: 0 with shuffled captions or tag dropout


@dataclass(frozen=True)
class Source:
    """One data source with every setting decided."""

    field: str  # where it was given, for messages: `data.dataset` or `data.datasets[i]`
    path: str
    role: str
    repeats: int
    trigger: str | None
    instance_prompt: str | None
    caption_dropout: float
    resolutions: tuple[int, ...]
    mask_dir: str | None
    holdout: int

    @property
    def regularisation(self) -> bool:
        return self.role == "regularisation"


def caption_variants(d: Any) -> int:
    """How many caption variants the cache holds per image (data.caption_variants, 0 = decided here)."""
    if d.caption_variants:
        return int(d.caption_variants)
    return CAPTION_VARIANTS_SHUFFLED if d.caption_shuffle or d.tag_dropout > 0 else 1


def largest_resolution(d: Any) -> int:
    """The largest side length the recipe trains at (over data.resolution(s) and every source's): what a memory
    plan must fit and what samples are rendered at."""
    sizes = [r for src in resolve_sources(d) for r in src.resolutions]
    return max(sizes or ([*d.resolutions] if d.resolutions else [d.resolution]))


def resolve_sources(d: Any) -> list[Source]:
    """The recipe's sources, in order (data.datasets, or data.dataset as a list of one)."""
    base_res = tuple(d.resolutions) if d.resolutions else (d.resolution,)
    if not d.datasets:
        if d.dataset is None:
            return []
        return [
            Source(
                "data.dataset",
                d.dataset,
                "train",
                d.repeats,
                d.trigger,
                d.instance_prompt,
                d.caption_dropout,
                base_res,
                d.mask_dir,
                d.holdout,
            )  # fmt: skip
        ]
    out = []
    for i, s in enumerate(d.datasets):
        reg = s.role == "regularisation"

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        res = tuple(s.resolutions) if s.resolutions else (s.resolution,) if s.resolution is not None else base_res
        out.append(
            Source(
                field=f"data.datasets[{i}]",
                path=s.path,
                role=s.role,
                repeats=pick(s.repeats, d.repeats),
                trigger=(s.trigger or None) if s.trigger is not None else (None if reg else d.trigger),
                instance_prompt=pick(s.instance_prompt, d.instance_prompt),
                caption_dropout=pick(s.caption_dropout, d.caption_dropout),
                resolutions=res,
                mask_dir=pick(s.mask_dir, d.mask_dir),
                holdout=0 if reg else pick(s.holdout, d.holdout),
            )
        )
    return out


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise RecipeError(f"{field_name}: {message}")


def is_pattern(spec: str) -> bool:
    """A shard pattern or pipe, checked when it is read."""
    return spec.startswith("pipe:") or "{" in spec


def check_data(recipe: Any, need_data: bool = True) -> None:
    """The data group's checks (config.validate calls this). Raises RecipeError('<field>: <reason>')."""
    from .config import BUILTIN_DATASETS, MAX_REFERENCES, MAX_RESOLUTION, user_path

    d = recipe.data
    _require(
        not (d.dataset is not None and d.datasets),
        "data.datasets",
        f"give either data.dataset (one source; here {d.dataset!r}, perhaps from a preset) or data.datasets (a list "
        "of sources), not both: set `dataset: null` beside `datasets:`",
    )
    _require(
        bool(d.dataset is not None or d.datasets) or not need_data,
        "data.dataset",
        "is required (a folder of images + .txt captions)",
    )
    for i, s in enumerate(d.datasets):
        where = f"data.datasets[{i}]"
        _require(hasattr(s, "path"), where, f"must be a mapping with path: (and role:, repeats:, ...), got {s!r}")
        _require(bool(s.path), f"{where}.path", "is required (a folder, raw shards or a cache folder)")
        _require(s.role in ROLES, f"{where}.role", f"must be train or regularisation, got {s.role!r}")
        _require(
            s.repeats is None or 1 <= s.repeats <= MAX_REPEATS,
            f"{where}.repeats",
            f"must be in 1..{MAX_REPEATS}, got {s.repeats}",
        )
        _require(s.holdout is None or s.holdout >= 0, f"{where}.holdout", f"must be >= 0, got {s.holdout}")
        cd = s.caption_dropout
        _require(cd is None or 0.0 <= cd < 1.0, f"{where}.caption_dropout", f"must be in [0, 1), got {cd}")
        _require(
            not (s.resolution is not None and s.resolutions),
            f"{where}.resolutions",
            "give either resolution or resolutions, not both",
        )
        for name in ("resolution", "resolutions"):
            value = getattr(s, name)
            if value is not None:
                _check_resolutions([value] if name == "resolution" else value, f"{where}.{name}", MAX_RESOLUTION)
    _require(
        any(s.role == "train" for s in d.datasets) or not d.datasets,
        "data.datasets",
        "needs at least one source with role: train (regularisation images alone teach nothing new)",
    )
    paths = [s.path for s in d.datasets]
    dup = next((p for p in paths if paths.count(p) > 1), None)
    _require(dup is None, "data.datasets", f"{dup} is listed twice (give one source a higher repeats instead)")
    sources = resolve_sources(d)
    if need_data:
        for src in sources:
            _check_path(src.path, f"{src.field}.path" if src.field != "data.dataset" else src.field, BUILTIN_DATASETS)
            if src.mask_dir is not None:
                name = f"{src.field}.mask_dir" if src.field != "data.dataset" else "data.mask_dir"
                mask_dir = user_path(src.mask_dir, name)
                _require(mask_dir.is_dir(), name, f"{src.mask_dir} is not a folder")
                cached = (user_path(src.path, name) / "index.json").exists()
                _require(
                    not cached,
                    name,
                    f"{src.path} is a cache folder, whose masks were fixed when it was built; give the mask folder "
                    "to `data cache` (or train from the image folder)",
                )
    _require(0.0 <= d.caption_dropout < 1.0, "data.caption_dropout", f"must be in [0, 1), got {d.caption_dropout}")
    _require(d.repeats >= 1, "data.repeats", f"must be >= 1, got {d.repeats}")
    _require(
        d.repeats <= MAX_REPEATS,
        "data.repeats",
        f"must be at most {MAX_REPEATS} (copies of each image per epoch; train longer with --steps), got {d.repeats}",
    )
    _check_resolutions([d.resolution], "data.resolution", MAX_RESOLUTION)
    if d.resolutions is not None:
        _require(len(d.resolutions) > 0, "data.resolutions", "must list at least one resolution (or be unset)")
        _check_resolutions(d.resolutions, "data.resolutions", MAX_RESOLUTION)
    _require(
        len(d.bucket_aspects) > 0 and all(0.1 <= a <= 10 for a in d.bucket_aspects),
        "data.bucket_aspects",
        "must list aspect ratios between 0.1 and 10",
    )
    _require(d.holdout >= 0, "data.holdout", f"must be >= 0, got {d.holdout}")
    _require(
        1 <= d.max_references <= MAX_REFERENCES,
        "data.max_references",
        f"must be 1..{MAX_REFERENCES} (FLUX.2 takes up to {MAX_REFERENCES} reference images), got {d.max_references}",
    )
    _require(
        0.0 <= d.reference_dropout <= 1.0, "data.reference_dropout", f"must be in [0, 1], got {d.reference_dropout}"
    )
    _require(
        d.max_reference_pixels >= 64 * 64,
        "data.max_reference_pixels",
        f"must be at least 4096 (64x64, the pipeline's smallest image), got {d.max_reference_pixels}",
    )
    _require(
        d.num_workers == "auto" or d.num_workers >= 0, "data.num_workers", f"must be auto or >= 0, got {d.num_workers}"
    )
    _require(d.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {d.shuffle_buffer}")
    _require(d.prior_loss_weight >= 0, "data.prior_loss_weight", f"must be >= 0, got {d.prior_loss_weight}")
    _require(d.keep_tokens >= 0, "data.keep_tokens", f"must be >= 0, got {d.keep_tokens}")
    _require(0.0 <= d.tag_dropout < 1.0, "data.tag_dropout", f"must be in [0, 1), got {d.tag_dropout}")
    _require(
        0 <= d.caption_variants <= 64,
        "data.caption_variants",
        f"must be in 0..64 (0: 1, or {CAPTION_VARIANTS_SHUFFLED} with caption_shuffle or tag_dropout), "
        f"got {d.caption_variants}",
    )
    _require(
        not (d.caption_variants == 1 and (d.caption_shuffle or d.tag_dropout > 0)),
        "data.caption_variants",
        "is 1, so caption_shuffle / tag_dropout would fix one variant per image for the whole run; use 0 (auto, "
        f"{CAPTION_VARIANTS_SHUFFLED}) or more",
    )
    _require(
        d.caption_variants <= 1 or d.caption_shuffle or d.tag_dropout > 0,
        "data.caption_variants",
        f"is {d.caption_variants}, but without caption_shuffle or tag_dropout every variant is the same caption "
        "(set one of them, or leave caption_variants at 0)",
    )


def _check_resolutions(values: list[int], field_name: str, most: int) -> None:
    for r in values:
        _require(isinstance(r, int) and r >= 16 and r % 16 == 0, field_name, f"must be a multiple of 16, got {r}")
        _require(
            r <= most,
            field_name,
            f"must be at most {most} (FLUX.2 renders up to 4 megapixels, {most}x{most}), got {r}",
        )


def _check_path(spec: str, field_name: str, builtins: tuple[str, ...]) -> None:
    from .config import user_path

    if is_pattern(spec):
        return
    if spec.startswith("builtin:"):
        _require(spec in builtins, field_name, f"unknown builtin {spec!r} (use {' or '.join(builtins)})")
        return
    path = user_path(spec, field_name)
    _require(path.exists(), field_name, f"{spec} does not exist")
    _require(path.is_dir() or path.suffix == ".tar", field_name, f"{spec} is not a folder or a .tar shard")


def dataset_dirs(d: Any) -> list[tuple[str, Path]]:
    """(field, folder) of every source that is a local folder (for the output-inside-a-dataset check)."""
    from .config import user_path

    out = []
    for src in resolve_sources(d):
        if not is_pattern(src.path) and not src.path.startswith("builtin:"):
            name = src.field if src.field == "data.dataset" else f"{src.field}.path"
            path = user_path(src.path, name).resolve()
            if path.is_dir():
                out.append((name, path))
    return out


__all__ = [
    "ROLES",
    "Source",
    "caption_variants",
    "check_data",
    "dataset_dirs",
    "is_pattern",
    "largest_resolution",
    "resolve_sources",
]
