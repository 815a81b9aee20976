"""The trials on Ray: join (or start) the cluster, share its resources out, run each trial as an actor that
trains the base recipe with its parameters and reports the validation loss; Optuna's TPE proposes, ASHA stops
weak trials at its rungs. One line per finished trial.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..recipe import parse_recipe
from .report import collect, error_line, fmt_value
from .settings import Sweep, TuneOptions
from .space import METRIC, Param, override_args, ray_space

# Environment a trial needs on every node (model cache, offline mode, our home), passed to Ray's runtime env.
PASS_ENV = ("FLUX2_LORA_HOME", "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE")


@dataclass
class TrialSetup:
    """What every trial needs; passed to the actors through Ray's object store."""

    base_recipe: str  # O/trial_recipe.yaml: the resolved recipe with the sweep's settings
    trials_dir: str
    threads: int


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One trial (inside a Ray actor): train the base recipe with `config`, reporting each validation loss.

    The trial's folder holds a normal run; a trial restarted by `--resume` continues from its own checkpoint."""
    import torch
    from ray import tune

    from ..train import Trainer

    ctx = tune.get_context()
    out = Path(setup.trials_dir) / ctx.get_trial_id()
    recipe, _ = parse_recipe(["--config", setup.base_recipe, *override_args(config), "--output.dir", str(out)])
    torch.set_num_threads(max(1, setup.threads))
    trainer = Trainer(recipe, resume="latest")

    def report(step: int, val: float) -> None:
        tune.report({METRIC: val if math.isfinite(val) else float("inf"), "step": step})

    # The last validation is reported after fit() returns: ASHA ends a trial at its max steps, and by then the
    # trial's final LoRA must be written.
    trainer.on_validation.append(lambda step, val: report(step, val) if step < recipe.training.max_steps else None)
    trainer.setup()
    trainer.fit()
    if trainer.state.val_history and trainer.state.val_history[-1][0] == recipe.training.max_steps:
        report(*trainer.state.val_history[-1])


def ray_environment(ray_address: str | None) -> None:
    """Set what Ray reads when it is imported. No usage report (and no prompt about it). A cluster of our own runs
    with token authentication (Ray's default), set explicitly so that Ray does not warn about it. Joining a
    cluster: token mode when RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set, else Ray's own rule (~/.ray/auth_token).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    token_given = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if not ray_address or token_given:
        # Ray enables token mode for a client only when the mode is set; a token given in the environment means it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def connect_ray(address: str | None, num_cpus: int | None) -> bool:
    """Join the cluster at `address`, or start a local one (True: we started it, so we stop it)."""
    import ray
    from ray.exceptions import AuthenticationError

    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    kwargs: dict[str, Any] = dict(
        runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING, configure_logging=True
    )
    try:
        if address:
            ray.init(address=address, **kwargs)
            return False
        # address="local": always a new cluster of our own, never one that `ray start` left on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
        return True
    except AuthenticationError:
        raise UsageError(
            f"--ray-address: the cluster at {address} requires its token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH "
            "to the token file (`ray get-auth-token` on the head prints it)"
        ) from None
    except ConnectionError as e:
        first = (str(e).strip().splitlines() or ["no answer"])[0]
        raise UsageError(
            f"--ray-address: cannot connect to a Ray cluster at {address} ({first}); check that it runs, and if it "
            "uses token authentication set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to its token"
        ) from None


def _resources(o: TuneOptions, total_cpus: float, total_gpus: float) -> tuple[dict[str, float], int]:
    """(resources per trial, trials at once)."""
    if total_gpus > 0:
        if o.gpus_per_trial <= 0:
            raise UsageError("--gpus-per-trial: must be > 0 on a cluster with GPUs")
        fit = max(1, int(total_gpus // o.gpus_per_trial))
        concurrent = o.concurrent or fit
        cpus = o.cpus_per_trial or max(1, int(total_cpus // max(concurrent, 1)) - 1)
        return {"cpu": cpus, "gpu": o.gpus_per_trial}, concurrent
    concurrent = o.concurrent or 1
    cpus = o.cpus_per_trial or max(1, int(total_cpus // concurrent))
    return {"cpu": cpus}, concurrent


def run_sweep(
    sweep: Sweep, params: list[Param], base: Path, out: Path, options: TuneOptions, resume: bool = False
) -> list[dict[str, Any]]:
    """Run the trials of `sweep` (a resumed one: continue Ray's experiment in O/ray/sweep) on the cluster the
    options name, or on a local one started for it; every trial as `collect` reads it."""
    import optuna
    import ray
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    o = options
    started = connect_ray(o.ray_address, o.cpus_per_trial * (o.concurrent or 1) if o.cpus_per_trial else None)
    try:
        res = ray.cluster_resources()
        per_trial, concurrent = _resources(o, res.get("CPU", 1), res.get("GPU", 0))
        print(
            f"ray   {'local cluster' if started else o.ray_address}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} "
            f"GPUs; {sweep.trials} trials, {concurrent} at once, each {per_trial}"
        )
        setup = TrialSetup(str(base), str(out / "trials"), int(per_trial["cpu"]))
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), per_trial)
        space = ray_space(params)
        path = out / "ray" / "sweep"
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # our own one line per trial instead
        logging.getLogger("ray.train").setLevel(logging.CRITICAL)
        progress = _Progress(sweep.trials, sweep.max_steps)
        if resume and tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(
                str(path), trainable=trainable, param_space=space, resume_unfinished=True, resume_errored=False,
                restart_errored=False,
            )  # fmt: skip
            print(f"resume {path}: finished trials are kept, unfinished ones continue from their checkpoints")
        else:
            from optuna.storages.journal import JournalFileBackend

            storage: Any = sweep.storage or optuna.storages.JournalStorage(
                JournalFileBackend(str(out / "optuna.journal"))
            )
            searcher = OptunaSearch(seed=sweep.search_seed, storage=storage, study_name="flux2-lora")
            scheduler = ASHAScheduler(
                time_attr="step", max_t=sweep.max_steps, grace_period=sweep.grace_steps,
                reduction_factor=sweep.reduction_factor,
            )  # fmt: skip
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=METRIC,
                    mode="min",
                    search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent),
                    scheduler=scheduler,
                    num_samples=sweep.trials,
                    reuse_actors=False,
                ),  # fmt: skip
                run_config=tune.RunConfig(
                    name="sweep",
                    storage_path=str(out / "ray"),
                    verbose=0,
                    callbacks=[progress],
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                ),  # fmt: skip
            )
        grid = tuner.fit()
        return collect(grid, sweep.max_steps)
    finally:
        if started:
            ray.shutdown()


class _Progress:
    """One line per finished trial (Ray's own table is off); built lazily as a ray.tune.Callback."""

    def __new__(cls, total: int, max_steps: int) -> Any:
        from ray.tune import Callback

        class Progress(Callback):  # type: ignore[misc]
            def __init__(self) -> None:
                self.done = 0

            def _line(self, trial: Any, what: str) -> None:
                self.done += 1
                params = ", ".join(f"{k.split('.')[-1]}={fmt_value(v)}" for k, v in trial.config.items())
                print(f"trial {self.done}/{total} {trial.trial_id}: {what} ({params})", flush=True)

            def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                last = trial.last_result or {}
                step, val = last.get("step", 0), last.get(METRIC, float("nan"))
                kind = "finished" if step >= max_steps else "stopped early by ASHA"
                self._line(trial, f"{kind} at step {step}, val_loss {val:.5f}")

            def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                self._line(trial, "failed: " + error_line(getattr(trial, "error_file", None)))

        return Progress()
