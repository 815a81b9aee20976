"""Hyperparameter search over a recipe (`flux2-lora tune`), trials run in parallel by Ray Tune.

    flux2-lora tune --preset P --dataset D --output O [--trials 50] [--max-steps 500] [--concurrent N]
                    [--gpus-per-trial 1] [--ray-address auto|HOST:PORT] [--space space.yaml] [--resume]

How a sweep runs:
1. The recipe is resolved like `train` resolves it (every train flag works here). The text encoder and VAE
   run once: the dataset is cached into O/cache/<fingerprint>/ and every trial reads the same shards.
2. Ray Tune starts each trial as its own actor with the resources it needs (`--gpus-per-trial`, or CPUs on a
   machine without GPUs). Optuna's TPE sampler proposes the parameters (`OptunaSearch`); ASHA stops trials
   whose fixed-seed validation loss, reported every `--report-every` steps, falls behind at a rung.
3. A trial that raises is recorded with its error and the sweep goes on. Ray keeps the experiment state in
   O/ray/sweep/ and Optuna's study in O/optuna.journal, so `--resume` continues a stopped sweep: finished
   trials are kept, unfinished ones continue from their own last checkpoint, new ones are proposed.
4. Outputs in O: best_config.yaml (a full recipe for `train --config`), optimization_results.json,
   trials_data.json, and PNG plots (optimization history, parameter importances, validation curves).

Trials train in O/trials/<trial id>/ (the usual run folder: metrics.jsonl, checkpoints, lora.safetensors).

The parts, one job each: `space` the search space; `settings` a sweep's options and saved settings; `sweep` the
trials on Ray (Optuna proposes, ASHA prunes); `report` the results, the best trial and the files and plots in O;
`driver` a sweep from start to end. The command itself (`flux2-lora tune`) is `commands/cluster.py`.
"""

from __future__ import annotations

from .driver import prepare_base, run_tune
from .report import _best, collect, error_line, fmt_value, param_importances, tune_plots, write_outputs
from .settings import Sweep, TuneOptions, split_argv, sweep_settings, tune_flags
from .space import (
    FIXED_FIELDS,
    FIXED_GROUPS,
    METRIC,
    SPACE_TYPES,
    Param,
    default_space_file,
    load_space,
    override_args,
    parse_space,
    ray_space,
    recipe_fields,
)
from .sweep import PASS_ENV, TrialSetup, connect_ray, ray_environment, run_sweep, run_trial

__all__ = [
    "FIXED_FIELDS", "FIXED_GROUPS", "METRIC", "PASS_ENV", "SPACE_TYPES", "Param", "Sweep", "TrialSetup", "TuneOptions",
    "_best", "collect", "connect_ray", "default_space_file", "error_line", "fmt_value", "load_space", "override_args",
    "param_importances", "parse_space", "prepare_base", "ray_environment", "ray_space", "recipe_fields", "run_sweep",
    "run_trial", "run_tune", "split_argv", "sweep_settings", "tune_flags", "tune_plots", "write_outputs",
]  # fmt: skip
