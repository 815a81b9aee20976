"""A sweep's results: every trial as Ray left it (parameters, validation curve, state, error), the best one, and
the outputs in O: best_config.yaml, optimization_results.json, trials_data.json and the PNG plots (optimization
history, parameter importances from Optuna's fANOVA, validation curves).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..recipe import parse_recipe
from .settings import Sweep
from .space import METRIC, Param, override_args


def fmt_value(v: Any) -> str:
    """A parameter value as the progress lines show it (a float to 3 significant digits)."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def error_line(error_file: str | None) -> str:
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
            state, error = "error", error_line(str(Path(r.path) / "error.txt"))
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
    from ..run_files import write_recipe

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
        recipe, _ = parse_recipe(
            [*sweep.recipe_argv, *override_args(best["params"]), "--training.max_steps", str(sweep.max_steps),
             "--output.dir", str(out / "best")]
        )  # fmt: skip
        path = out / "best_config.yaml"
        write_recipe(path, recipe)
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
