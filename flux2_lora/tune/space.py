"""The search space: which recipe fields a sweep may search and how (int, float, categorical), read from a YAML
file and checked in one-line errors; the same parameters as Ray Tune domains and as train flags. And what a sweep
minimises.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Recipe
from ..errors import UsageError
from ..recipe import read_yaml
from ..resources import recipes_dir

SPACE_TYPES = ("int", "float", "categorical")
# Fields that change the cached data (or where a trial writes): a sweep caches once, so they are fixed.
FIXED_FIELDS = (
    "data.dataset",
    "data.trigger",
    "data.instance_prompt",
    "data.resolution",
    "data.buckets",
    "data.bucket_aspects",
    "data.random_flip",
    "data.holdout",
    "model.name_or_path",
    "model.family",
    "model.text_encoder_layers",
    "model.max_sequence_length",
    "model.revision",
    "validation.seed",
    "validation.sigmas",
)
FIXED_GROUPS = ("output.", "distributed.")
METRIC = "val_loss"  # what a sweep minimises: the fixed-seed held-out validation loss


@dataclass
class Param:
    """One searched recipe field."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    def describe(self) -> str:
        if self.type == "categorical":
            return f"{self.name} in {self.choices}"
        return f"{self.name} {self.type} {self.low}..{self.high}{' (log)' if self.log else ''}"


def recipe_fields() -> dict[str, Any]:
    """Dotted recipe field -> its default value."""
    out: dict[str, Any] = {}
    for group in dataclasses.fields(Recipe):
        default = group.default_factory()  # type: ignore[misc,operator]
        for f in dataclasses.fields(default):
            out[f"{group.name}.{f.name}"] = getattr(default, f.name)
    return out


def parse_space(raw: Any, where: str) -> list[Param]:
    """Check a search space (dotted field -> {type, low, high, log} or {type: categorical, choices}); one-line errors."""
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{where}: must map dotted recipe fields to distributions, e.g. lora.rank: {{type: int, ...}}")
    known = recipe_fields()
    params = []
    for name, spec in raw.items():
        at = f"{where}: {name}"
        if name not in known:
            raise UsageError(f"{at}: not a recipe field (see recipes/base.yaml)")
        if name in FIXED_FIELDS or name.startswith(FIXED_GROUPS):
            raise UsageError(
                f"{at}: cannot be searched (it changes the cached data or where trials write); set it in the recipe"
            )
        if not isinstance(spec, dict):
            raise UsageError(f"{at}: must be a mapping like {{type: float, low: 1e-5, high: 1e-3, log: true}}")
        unknown = set(spec) - {"type", "low", "high", "log", "choices"}
        if unknown:
            raise UsageError(f"{at}: unknown key(s) {sorted(unknown)} (type, low, high, log, choices)")
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        if kind not in SPACE_TYPES:
            raise UsageError(f"{at}: type must be one of {', '.join(SPACE_TYPES)} (got {kind})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UsageError(f"{at}: categorical needs a non-empty `choices` list")
            params.append(Param(name, kind, choices=list(choices)))
            continue
        low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or isinstance(low, bool):
            raise UsageError(f"{at}: {kind} needs numeric `low` and `high`")
        if not low < high:
            raise UsageError(f"{at}: low must be < high (got {low}, {high})")
        if log and low <= 0:
            raise UsageError(f"{at}: a log range needs low > 0 (got {low})")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise UsageError(f"{at}: int bounds must be whole numbers (got {low}, {high})")
        params.append(Param(name, kind, float(low), float(high), log))
    return params


def default_space_file() -> Path:
    return recipes_dir() / "tune" / "space.yaml"


def load_space(path: str | None) -> list[Param]:
    """The search space in a YAML file (default: recipes/tune/space.yaml)."""
    p = Path(path).expanduser() if path else default_space_file()
    return parse_space(read_yaml(p, "--space"), f"--space {p}")


def ray_space(params: list[Param]) -> dict[str, Any]:
    """Ray Tune domains (OptunaSearch turns them into Optuna distributions)."""
    from ray import tune

    out: dict[str, Any] = {}
    for p in params:
        if p.type == "categorical":
            out[p.name] = tune.choice(p.choices or [])
        elif p.type == "int":
            lo, hi = int(p.low or 0), int(p.high or 0)
            out[p.name] = tune.lograndint(lo, hi + 1) if p.log else tune.randint(lo, hi + 1)
        else:
            lo_f, hi_f = float(p.low or 0), float(p.high or 0)
            out[p.name] = tune.loguniform(lo_f, hi_f) if p.log else tune.uniform(lo_f, hi_f)
    return out


def override_args(params: dict[str, Any]) -> list[str]:
    """A trial's parameters as train flags."""
    args: list[str] = []
    for name, value in params.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        args += [f"--{name}", text]
    return args
