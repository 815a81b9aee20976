"""A sweep's settings: the options `flux2-lora tune` takes (`TuneOptions`), their checks, and what is saved in
O/sweep.json for `--resume` (`Sweep`). Also which flags of a tune command line are tune's own (`split_argv`):
every other flag sets the base recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..recipe import split_flags
from .space import Param


@dataclass
class TuneOptions:
    """The options of a sweep besides its output folder and `--resume` (each one a `flux2-lora tune` flag:
    `max_steps` is `--max-steps`). The search settings are saved with a new sweep; a resumed one keeps its own and
    takes only where it runs from here (ray_address, concurrent, gpus_per_trial, cpus_per_trial)."""

    trials: int = 50
    max_steps: int = 500
    concurrent: int | None = None
    gpus_per_trial: float = 1.0
    cpus_per_trial: int | None = None
    ray_address: str | None = None
    space: str | None = None
    report_every: int | None = None
    grace_steps: int | None = None
    reduction_factor: int = 2
    search_seed: int = 0
    storage: str | None = None


@dataclass
class Sweep:
    """A sweep's settings as saved in O/sweep.json (what --resume reads back)."""

    recipe_argv: list[str]
    space: list[dict[str, Any]]
    trials: int
    max_steps: int
    report_every: int
    grace_steps: int
    reduction_factor: int
    search_seed: int
    storage: str | None


def tune_flags() -> dict[str, bool]:
    """Tune's own flags -> whether each takes a value (every TuneOptions field, --output and --resume)."""
    flags = {"--output": True}
    flags.update({"--" + f.name.replace("_", "-"): True for f in dataclasses.fields(TuneOptions)})
    flags["--resume"] = False
    return flags


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(tune flags, train flags): tune's own flags are taken out, every other flag sets the recipe."""
    return split_flags(argv, {flag: None if takes_value else 0 for flag, takes_value in tune_flags().items()})


def sweep_settings(o: TuneOptions, recipe_argv: list[str], params: list[Param]) -> Sweep:
    """A new sweep's settings from the options, checked (one-line UsageErrors naming the flag)."""
    if o.trials < 1:
        raise UsageError(f"--trials: must be >= 1, got {o.trials}")
    if o.max_steps < 1:
        raise UsageError(f"--max-steps: must be >= 1, got {o.max_steps}")
    if o.reduction_factor < 2:
        raise UsageError(f"--reduction-factor: must be >= 2, got {o.reduction_factor}")
    if o.concurrent is not None and o.concurrent < 1:
        raise UsageError(f"--concurrent: must be >= 1, got {o.concurrent}")
    report = o.report_every or max(1, o.max_steps // 10)
    if not 1 <= report <= o.max_steps:
        raise UsageError(f"--report-every: must be in 1..--max-steps ({o.max_steps}), got {report}")
    grace = o.grace_steps or report
    if not report <= grace <= o.max_steps:
        raise UsageError(
            f"--grace-steps: must be in --report-every..--max-steps ({report}..{o.max_steps}), got {grace}"
        )
    return Sweep(
        recipe_argv, [dataclasses.asdict(p) for p in params], o.trials, o.max_steps, report, grace, o.reduction_factor,
        o.search_seed, o.storage,
    )  # fmt: skip
