"""A sweep from start to end: a new one's settings checked and saved (or a stopped one's read back), the base
recipe resolved, the dataset cached once into O/cache/ and O/trial_recipe.yaml written, the trials run, the
outputs written.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import Recipe
from ..errors import UsageError
from ..recipe import parse_recipe
from .report import write_outputs
from .settings import Sweep, TuneOptions, sweep_settings
from .space import Param, load_space
from .sweep import ray_environment, run_sweep


def run_tune(
    recipe_argv: list[str], output: str, options: TuneOptions, resume: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Run a sweep of the recipe that `recipe_argv` (train flags) gives into `output`, or with `resume` continue
    the one there (then `recipe_argv` must be empty); (the output folder, the summary write_outputs wrote).

    Prints its progress: the cache, the cluster, one line per trial, the files written."""
    ray_environment(options.ray_address)
    out = Path(output).expanduser().resolve()
    state_file = out / "sweep.json"
    if resume:
        if not state_file.exists():
            raise UsageError(f"--resume: {out} holds no sweep (no sweep.json); start one without --resume")
        sweep = Sweep(**json.loads(state_file.read_text()))
        if recipe_argv:
            raise UsageError(
                f"--resume: continues with the saved recipe; drop the recipe flags ({' '.join(recipe_argv)})"
            )
        params = [Param(**p) for p in sweep.space]
    else:
        if state_file.exists():
            raise UsageError(
                f"--output: {out} already holds a sweep; continue it with --resume or choose another --output"
            )
        params = load_space(options.space)
        sweep = sweep_settings(options, list(recipe_argv), params)
    recipe, _ = parse_recipe([*sweep.recipe_argv, "--output.dir", str(out / "base")])
    out.mkdir(parents=True, exist_ok=True)
    base = prepare_base(recipe, sweep, out)
    if not resume:
        state_file.write_text(json.dumps(dataclasses.asdict(sweep), indent=1))
    started = time.time()
    trials = run_sweep(sweep, params, base, out, options, resume)
    return out, write_outputs(out, sweep, params, trials, time.time() - started)


def prepare_base(recipe: Recipe, sweep: Sweep, out: Path) -> Path:
    """Cache the dataset once and write O/trial_recipe.yaml: the recipe every trial starts from.

    Every source is cached at every resolution (data/mix.py `prepare_mix`, as a training run would); the trial
    recipe names those caches, one source each, with the source's role, repeats and caption dropout."""
    import torch

    from ..data.mix import prepare_mix
    from ..model import encoder_dtype, quiet_libraries, resolve_model

    quiet_libraries()
    src = resolve_model(recipe.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mix = prepare_mix(recipe, src, out / "cache", device, encoder_dtype(recipe.model.dtype, device))
    if not any(e.source.holdout for e in mix.entries):
        raise UsageError(
            "data.holdout: the sweep ranks trials by the held-out validation loss; the dataset has no held-out images"
        )
    index = mix.index
    d = recipe.to_dict()
    if len(mix.entries) == 1 and not recipe.data.datasets:
        d["data"]["dataset"] = str(index.root)
    else:
        d["data"]["dataset"], d["data"]["resolutions"] = None, None
        d["data"]["datasets"] = mix.cached_sources()
    d["training"]["max_steps"] = sweep.max_steps
    d["validation"].update(every_n_steps=sweep.report_every, prompts=[])  # no sample images in trials
    d["output"].update(checkpoint_every=sweep.report_every, keep_last=1)
    d["callbacks"]["early_stopping_patience"] = 0  # ASHA decides
    d["distributed"]["strategy"] = "auto"
    d["logging"]["wandb"] = False
    d["data"]["num_workers"] = 0 if not torch.cuda.is_available() else d["data"]["num_workers"]
    path = out / "trial_recipe.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    for line in mix.describe():
        print(f"cache {line}; every trial reads it")
    return path
