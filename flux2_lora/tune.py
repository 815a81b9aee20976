"""`flux2-lora tune`: hyperparameter search over a recipe, trials run in parallel by Ray Tune.

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
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .cli import CliError, _parse, command_parser, parse_train, read_yaml
from .config import Recipe

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
METRIC = "val_loss"
# Environment a trial needs on every node (model cache, offline mode, our home), passed to Ray's runtime env.
PASS_ENV = ("FLUX2_LORA_HOME", "HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE")


# ---------------------------------------------------------------------------------------- search space
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
        raise CliError(f"{where}: must map dotted recipe fields to distributions, e.g. lora.rank: {{type: int, ...}}")
    known = recipe_fields()
    params = []
    for name, spec in raw.items():
        at = f"{where}: {name}"
        if name not in known:
            raise CliError(f"{at}: not a recipe field (see recipes/base.yaml)")
        if name in FIXED_FIELDS or name.startswith(FIXED_GROUPS):
            raise CliError(
                f"{at}: cannot be searched (it changes the cached data or where trials write); set it in the recipe"
            )
        if not isinstance(spec, dict):
            raise CliError(f"{at}: must be a mapping like {{type: float, low: 1e-5, high: 1e-3, log: true}}")
        unknown = set(spec) - {"type", "low", "high", "log", "choices"}
        if unknown:
            raise CliError(f"{at}: unknown key(s) {sorted(unknown)} (type, low, high, log, choices)")
        kind = spec.get("type", "categorical" if "choices" in spec else None)
        if kind not in SPACE_TYPES:
            raise CliError(f"{at}: type must be one of {', '.join(SPACE_TYPES)} (got {kind})")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise CliError(f"{at}: categorical needs a non-empty `choices` list")
            params.append(Param(name, kind, choices=list(choices)))
            continue
        low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or isinstance(low, bool):
            raise CliError(f"{at}: {kind} needs numeric `low` and `high`")
        if not low < high:
            raise CliError(f"{at}: low must be < high (got {low}, {high})")
        if log and low <= 0:
            raise CliError(f"{at}: a log range needs low > 0 (got {low})")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise CliError(f"{at}: int bounds must be whole numbers (got {low}, {high})")
        params.append(Param(name, kind, float(low), float(high), log))
    return params


def default_space_file() -> Path:
    from .cli import recipes_dir

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


# ----------------------------------------------------------------------------------------------- trial
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

    from .train import Trainer

    ctx = tune.get_context()
    out = Path(setup.trials_dir) / ctx.get_trial_id()
    recipe, _ = parse_train(["--config", setup.base_recipe, *override_args(config), "--output.dir", str(out)])
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


# ---------------------------------------------------------------------------------------------- driver
TUNE_FLAGS = {
    "--output": True,
    "--trials": True,
    "--max-steps": True,
    "--concurrent": True,
    "--gpus-per-trial": True,
    "--cpus-per-trial": True,
    "--ray-address": True,
    "--space": True,
    "--report-every": True,
    "--grace-steps": True,
    "--reduction-factor": True,
    "--search-seed": True,
    "--storage": True,
    "--resume": False,
}


def tune_parser() -> Any:
    p = command_parser(
        "tune",
        "Search LoRA hyperparameters: Ray Tune runs the trials in parallel, Optuna (TPE) proposes, ASHA stops "
        "weak trials early. Every `train` flag (--preset, --config, --dataset, dotted fields) sets the base recipe.",
    )
    p.add_argument("--output", type=str, required=True, help="Sweep folder (outputs, trials, Ray state).")
    p.add_argument("--trials", type=int, default=50, help="Trials in total.")
    p.add_argument("--max-steps", type=int, default=500, help="Optimizer steps per trial (ASHA's max).")
    p.add_argument("--concurrent", type=int | None, default=None, help="Trials at once (default: what fits).")
    p.add_argument("--gpus-per-trial", type=float, default=1.0, help="GPUs per trial (ignored without GPUs).")
    p.add_argument("--cpus-per-trial", type=int | None, default=None, help="CPUs per trial (default: shared out).")
    p.add_argument("--ray-address", type=str | None, default=None, help="`auto` or HOST:PORT of a Ray cluster.")
    p.add_argument(
        "--space", type=str | None, default=None, help="Search space YAML (default: recipes/tune/space.yaml)."
    )
    p.add_argument("--report-every", type=int | None, default=None, help="Validate and report every N steps.")
    p.add_argument("--grace-steps", type=int | None, default=None, help="ASHA: steps before a trial can be stopped.")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/N of the trials at each rung.")
    p.add_argument("--search-seed", type=int, default=0, help="Seed of Optuna's sampler.")
    p.add_argument("--storage", type=str | None, default=None, help="Optuna storage URL (default: O/optuna.journal).")
    p.add_argument("--resume", action="store_true", help="Continue the sweep in --output (same recipe and space).")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(tune flags, train flags): tune's own flags are taken out, every other flag sets the recipe."""
    ours: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key, eq, _ = argv[i].partition("=")
        if key in ("-h", "--help"):
            ours.append(key)
        elif key in TUNE_FLAGS:
            ours.append(argv[i])
            if TUNE_FLAGS[key] and not eq:
                if i + 1 >= len(argv):
                    raise CliError(f"{key}: needs a value")
                ours.append(argv[i + 1])
                i += 1
        else:
            rest.append(argv[i])
        i += 1
    return ours, rest


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


def _options(a: Any, recipe_argv: list[str], params: list[Param]) -> Sweep:
    if a.trials < 1:
        raise CliError(f"--trials: must be >= 1, got {a.trials}")
    if a.max_steps < 1:
        raise CliError(f"--max-steps: must be >= 1, got {a.max_steps}")
    if a.reduction_factor < 2:
        raise CliError(f"--reduction-factor: must be >= 2, got {a.reduction_factor}")
    if a.concurrent is not None and a.concurrent < 1:
        raise CliError(f"--concurrent: must be >= 1, got {a.concurrent}")
    report = a.report_every or max(1, a.max_steps // 10)
    if not 1 <= report <= a.max_steps:
        raise CliError(f"--report-every: must be in 1..--max-steps ({a.max_steps}), got {report}")
    grace = a.grace_steps or report
    if not report <= grace <= a.max_steps:
        raise CliError(f"--grace-steps: must be in --report-every..--max-steps ({report}..{a.max_steps}), got {grace}")
    return Sweep(
        recipe_argv, [dataclasses.asdict(p) for p in params], a.trials, a.max_steps, report, grace, a.reduction_factor,
        a.search_seed, a.storage,
    )  # fmt: skip


def cmd_tune(argv: list[str]) -> int:
    ours, rest = split_argv(argv)
    a = _parse(tune_parser(), ours)
    # Ray reads these when it is imported. No usage report (and no prompt about it). A cluster of our own runs
    # with token authentication (Ray's default), set explicitly so that Ray does not warn about it. Joining a
    # cluster: token mode when RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH is set, else Ray's own rule (~/.ray/auth_token).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    token_given = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if not a.ray_address or token_given:
        # Ray enables token mode for a client only when the mode is set; a token given in the environment means it.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    out = Path(a.output).expanduser().resolve()
    state_file = out / "sweep.json"
    if a.resume:
        if not state_file.exists():
            raise CliError(f"--resume: {out} holds no sweep (no sweep.json); start one without --resume")
        sweep = Sweep(**json.loads(state_file.read_text()))
        if rest:
            raise CliError(f"--resume: continues with the saved recipe; drop the recipe flags ({' '.join(rest)})")
        params = [Param(**p) for p in sweep.space]
    else:
        if state_file.exists():
            raise CliError(
                f"--output: {out} already holds a sweep; continue it with --resume or choose another --output"
            )
        params = load_space(a.space)
        sweep = _options(a, rest, params)
    recipe, _ = parse_train([*sweep.recipe_argv, "--output.dir", str(out / "base")])
    out.mkdir(parents=True, exist_ok=True)
    base = prepare_base(recipe, sweep, out)
    if not a.resume:
        state_file.write_text(json.dumps(dataclasses.asdict(sweep), indent=1))
    started = time.time()
    trials = run_sweep(a, sweep, params, base, out)
    summary = write_outputs(out, sweep, params, trials, time.time() - started)
    best = summary.get("best_trial")
    if best is None:
        print(f"no trial finished with a validation loss; see {out / 'trials_data.json'} for their errors")
        return 1
    print(
        f"best trial {best}: val_loss {summary['best_value']:.5f} with "
        + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["best_params"].items())
    )
    print(f"train it with: flux2-lora train --config {out / 'best_config.yaml'}")
    return 0


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def prepare_base(recipe: Recipe, sweep: Sweep, out: Path) -> Path:
    """Cache the dataset once and write O/trial_recipe.yaml: the recipe every trial starts from."""
    import torch

    from .data.cache import build_cache, check_settings, dataset_source, read_index, settings_for
    from .model import encoder_dtype, quiet_libraries, resolve_model

    quiet_libraries()
    src = resolve_model(recipe.model)
    settings = settings_for(src, recipe)
    spec = recipe.data.dataset or ""
    if spec != "builtin:sample" and (Path(spec).expanduser() / "index.json").exists():
        index = read_index(Path(spec).expanduser())
        check_settings(index, settings)
    else:
        source, source_id = dataset_source(spec, recipe.data.instance_prompt)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        index = build_cache(
            out / "cache" / settings.digest(source_id), settings, source, device,
            encoder_dtype(recipe.model.dtype, device), force_cpu_loading=recipe.model.force_cpu_loading,
            text_encoder_device=recipe.model.text_encoder_device,
        )  # fmt: skip
    if not index.val:
        raise CliError(
            f"data.holdout: the sweep ranks trials by the held-out validation loss; {spec} has no held-out images"
        )
    d = recipe.to_dict()
    d["data"]["dataset"] = str(index.root)
    d["training"]["max_steps"] = sweep.max_steps
    d["validation"].update(every_n_steps=sweep.report_every, prompts=[])  # no sample images in trials
    d["output"].update(checkpoint_every=sweep.report_every, keep_last=1)
    d["callbacks"]["early_stopping_patience"] = 0  # ASHA decides
    d["distributed"]["strategy"] = "auto"
    d["logging"]["wandb"] = False
    d["data"]["num_workers"] = 0 if not torch.cuda.is_available() else d["data"]["num_workers"]
    path = out / "trial_recipe.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    print(f"cache {index.root}: {index.num_train} training, {len(index.val)} validation shard(s); every trial reads it")
    return path


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
        raise CliError(
            f"--ray-address: the cluster at {address} requires its token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH "
            "to the token file (`ray get-auth-token` on the head prints it)"
        ) from None
    except ConnectionError as e:
        first = (str(e).strip().splitlines() or ["no answer"])[0]
        raise CliError(
            f"--ray-address: cannot connect to a Ray cluster at {address} ({first}); check that it runs, and if it "
            "uses token authentication set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to its token"
        ) from None


def _resources(a: Any, total_cpus: float, total_gpus: float) -> tuple[dict[str, float], int]:
    """(resources per trial, trials at once)."""
    if total_gpus > 0:
        if a.gpus_per_trial <= 0:
            raise CliError("--gpus-per-trial: must be > 0 on a cluster with GPUs")
        fit = max(1, int(total_gpus // a.gpus_per_trial))
        concurrent = a.concurrent or fit
        cpus = a.cpus_per_trial or max(1, int(total_cpus // max(concurrent, 1)) - 1)
        return {"cpu": cpus, "gpu": a.gpus_per_trial}, concurrent
    concurrent = a.concurrent or 1
    cpus = a.cpus_per_trial or max(1, int(total_cpus // concurrent))
    return {"cpu": cpus}, concurrent


def run_sweep(a: Any, sweep: Sweep, params: list[Param], base: Path, out: Path) -> list[dict[str, Any]]:
    import optuna
    import ray
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    started = connect_ray(a.ray_address, a.cpus_per_trial * (a.concurrent or 1) if a.cpus_per_trial else None)
    try:
        res = ray.cluster_resources()
        per_trial, concurrent = _resources(a, res.get("CPU", 1), res.get("GPU", 0))
        print(
            f"ray   {'local cluster' if started else a.ray_address}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} "
            f"GPUs; {sweep.trials} trials, {concurrent} at once, each {per_trial}"
        )
        setup = TrialSetup(str(base), str(out / "trials"), int(per_trial["cpu"]))
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), per_trial)
        space = ray_space(params)
        path = out / "ray" / "sweep"
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # our own one line per trial instead
        logging.getLogger("ray.train").setLevel(logging.CRITICAL)
        progress = _Progress(sweep.trials, sweep.max_steps)
        if a.resume and tune.Tuner.can_restore(str(path)):
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
                params = ", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in trial.config.items())
                print(f"trial {self.done}/{total} {trial.trial_id}: {what} ({params})", flush=True)

            def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                last = trial.last_result or {}
                step, val = last.get("step", 0), last.get(METRIC, float("nan"))
                kind = "finished" if step >= max_steps else "stopped early by ASHA"
                self._line(trial, f"{kind} at step {step}, val_loss {val:.5f}")

            def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
                self._line(trial, "failed: " + _error_line(getattr(trial, "error_file", None)))

        return Progress()


def _error_line(error_file: str | None) -> str:
    """The last line of a trial's error file: the exception's own message."""
    if not error_file or not Path(error_file).exists():
        return "error (no message recorded)"
    lines = [ln.strip() for ln in Path(error_file).read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "error"


def collect(grid: Any, max_steps: int) -> list[dict[str, Any]]:
    """Every trial of a finished (or stopped) sweep: parameters, validation curve, state, error."""
    trials = []
    for r in grid:
        curve: dict[int, float] = {}
        df = None
        try:
            df = r.metrics_dataframe
        except Exception:  # a trial that never reported has no result file
            df = None
        if df is not None and METRIC in df and "step" in df:
            for s, v in zip(df["step"], df[METRIC], strict=True):
                if s == s:  # rows without a report carry NaN
                    curve[int(s)] = float(v)  # a trial continued after --resume reports some steps again
        points = sorted(curve.items())
        number, trial_id = _trial_name(Path(r.path).name)
        trial_id = (r.metrics or {}).get("trial_id") or trial_id
        if r.error is not None:
            state, error = "error", _error_line(str(Path(r.path) / "error.txt"))
        elif points and points[-1][0] >= max_steps:
            state, error = "completed", None
        elif points:
            state, error = "pruned", None
        else:
            state, error = "not started", None
        trials.append(
            {
                "number": number,
                "trial_id": trial_id,
                "params": dict(r.config or {}),
                "state": state,
                "curve": [[s, v] for s, v in points],
                "last_step": points[-1][0] if points else 0,
                "final_value": points[-1][1] if points else None,
                "best_value": min(v for _, v in points) if points else None,
                "error": error,
                "path": str(r.path),
            }
        )
    return trials


def _best(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the lowest final validation loss (else the best of any trial that reported)."""
    for pool in (
        [t for t in trials if t["state"] == "completed"],
        [t for t in trials if t["final_value"] is not None],
    ):
        pool = [t for t in pool if t["final_value"] is not None and math.isfinite(t["final_value"])]
        if pool:
            return min(pool, key=lambda t: t["final_value"])
    return None


def write_outputs(
    out: Path, sweep: Sweep, params: list[Param], trials: list[dict[str, Any]], wall_s: float
) -> dict[str, Any]:
    from .train import _write_recipe

    trials.sort(key=lambda t: t["number"])
    best = _best(trials)
    counts = {s: sum(t["state"] == s for t in trials) for s in ("completed", "pruned", "error", "not started")}
    previous = out / "optimization_results.json"
    wall_before = json.loads(previous.read_text()).get("budget", {}).get("wall_time_s", 0.0) if previous.exists() else 0
    summary: dict[str, Any] = {
        "metric": METRIC,
        "mode": "min",
        "best_trial": best["trial_id"] if best else None,
        "best_value": best["final_value"] if best else None,
        "best_params": best["params"] if best else {},
        "best_step": best["last_step"] if best else None,
        "trials": counts,
        "budget": {
            "trials_requested": sweep.trials,
            "trials_run": len(trials),
            "steps_trained": sum(t["last_step"] for t in trials),
            "steps_if_none_stopped": len(trials) * sweep.max_steps,
            "max_steps_per_trial": sweep.max_steps,
            "wall_time_s": round(wall_before + wall_s, 1),
        },
        "search_space": [p.describe() for p in params],
        "sampler": f"optuna TPE (seed {sweep.search_seed})",
        "scheduler": (
            f"ASHA on {METRIC} every {sweep.report_every} steps (grace {sweep.grace_steps}, "
            f"reduction factor {sweep.reduction_factor})"
        ),
    }
    (out / "trials_data.json").write_text(json.dumps(trials, indent=1))
    (out / "optimization_results.json").write_text(json.dumps(summary, indent=1))
    if best is not None:
        recipe, _ = parse_train(
            [*sweep.recipe_argv, *override_args(best["params"]), "--training.max_steps", str(sweep.max_steps),
             "--output.dir", str(out / "best")]
        )  # fmt: skip
        path = out / "best_config.yaml"
        _write_recipe(path, recipe)
        header = (
            f"# flux2-lora tune: best of {len(trials)} trials (trial {best['trial_id']}, {METRIC} "
            f"{best['final_value']:.5f} at step {best['last_step']}).\n# Train it: flux2-lora train --config {path}\n"
        )
        path.write_text(header + path.read_text())
    for p in tune_plots(trials, params, out):
        print(f"wrote {p}")
    c = counts
    print(f"{len(trials)} trials: {c['completed']} completed, {c['pruned']} stopped early, {c['error']} failed")
    return summary


def _trial_name(folder: str) -> tuple[int, str]:
    """(number, id) from Ray's trial folder name `<trainable>_<id>_<number>_<params>_<date>`."""
    m = re.search(r"_([0-9a-f]{5,})_(\d+)_", folder)
    return (int(m.group(2)), m.group(1)) if m else (0, folder)


# ------------------------------------------------------------------------------------------------ plots
def param_importances(trials: list[dict[str, Any]], params: list[Param]) -> tuple[dict[str, float], str]:
    """Optuna's fANOVA importances over the completed trials (all reporting trials when fewer than 3 completed)."""
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

    dists: dict[str, BaseDistribution] = {}
    for p in params:
        if p.type == "categorical":
            dists[p.name] = CategoricalDistribution(p.choices or [])
        elif p.type == "int":
            dists[p.name] = IntDistribution(int(p.low or 0), int(p.high or 0), log=p.log)
        else:
            dists[p.name] = FloatDistribution(float(p.low or 0), float(p.high or 0), log=p.log)
    done = [t for t in trials if t["state"] == "completed" and _finite(t["final_value"])]
    pool, label = (done, "completed trials") if len(done) >= 3 else (
        [t for t in trials if _finite(t["final_value"])], "all trials, last reported value"
    )  # fmt: skip
    if len(pool) < 2:
        return {}, label
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for t in pool:
        values = {k: v for k, v in t["params"].items() if k in dists}
        used = {k: dists[k] for k in values}
        study.add_trial(optuna.trial.create_trial(params=values, distributions=used, value=t["final_value"]))
    try:
        return optuna.importance.get_param_importances(study), label
    except (RuntimeError, ValueError):  # e.g. every trial had the same parameters
        return {}, label


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def tune_plots(trials: list[dict[str, Any]], params: list[Param], out: Path) -> list[Path]:
    """optimization_history.png, param_importances.png and validation_curves.png in `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = {"completed": "tab:blue", "pruned": "tab:orange", "error": "tab:red", "not started": "tab:gray"}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    best, xs, ys = math.inf, [], []
    for t in trials:
        if _finite(t["final_value"]):
            ax.scatter(t["number"], t["final_value"], color=colors[t["state"]], label=t["state"], zorder=3)
            best = min(best, t["final_value"]) if t["state"] == "completed" else best
        elif t["state"] == "error":
            ax.axvline(t["number"], color=colors["error"], alpha=0.3, label="error")
        if math.isfinite(best):
            xs.append(t["number"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="black", label="best completed")
    _legend(ax)
    ax.set(xlabel="trial", ylabel=f"{METRIC} (last reported)", title="Optimization history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    paths.append(_save(fig, out / "optimization_history.png"))

    importances, label = param_importances(trials, params)
    fig, ax = plt.subplots(figsize=(8, 0.6 * max(len(params), 2) + 1.5))
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set(xlabel="importance (fANOVA)", title=f"Parameter importances ({label})")
    else:
        ax.text(0.5, 0.5, "not enough finished trials to rank parameters", ha="center", va="center")
        ax.set_axis_off()
    paths.append(_save(fig, out / "param_importances.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for t in trials:
        if t["curve"]:
            steps, vals = zip(*t["curve"], strict=True)
            style = "-" if t["state"] == "completed" else "--"
            ax.plot(steps, vals, style, marker="o", ms=3, color=colors[t["state"]], label=t["state"], alpha=0.8)
    _legend(ax)
    ax.set(xlabel="step", ylabel=METRIC, title="Validation loss of every trial (dashed: stopped early)")
    paths.append(_save(fig, out / "validation_curves.png"))
    return paths


def _legend(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys())


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
