"""`flux2-lora launch MANIFEST` and `flux2-lora tune`."""

from __future__ import annotations

from pathlib import Path

from .args import RecipeArgs, Switch


def launch(manifest: str, /, *, output: str | None = None, dry_run: Switch = False) -> int:
    """Start a recipe as the MANIFEST says: `accelerate launch` here (local), an sbatch job (slurm) or a Ray job
    (ray). `command: tune` runs a sweep (Slurm: a Ray cluster in the job). Files go to OUTPUT/launch/. Examples
    ship with the package: {examples} (`flux2-lora launch NAME --dry-run`).

    Args:
        manifest: Manifest YAML, or the name of an example (fields: see the examples and the README).
        output: Use this output folder instead of the manifest's.
        dry_run: Write the files and print the commands; run nothing.
    """
    from ..launch import load_manifest, make_plan, manifest_path, prepare, write_files

    path = manifest_path(manifest)
    if path != Path(manifest).expanduser():
        print(f"example manifest: {path}")
    pl = make_plan(load_manifest(path, output=output or None))
    files = write_files(pl)
    for name, written in files.items():
        print(f"wrote {name}: {written}")
    print(pl.summary())
    job = prepare(pl, files)
    print("\n".join(job.shown))
    if dry_run:
        return 0
    if job.notice:
        print(job.notice)
    return job.start()


def tune(
    recipe_flags: RecipeArgs,
    *,
    output: str,
    trials: int = 50,
    max_steps: int = 500,
    concurrent: int | None = None,
    gpus_per_trial: float = 1.0,
    cpus_per_trial: int | None = None,
    ray_address: str | None = None,
    space: str | None = None,
    report_every: int | None = None,
    grace_steps: int | None = None,
    reduction_factor: int = 2,
    search_seed: int = 0,
    storage: str | None = None,
    resume: Switch = False,
) -> int:
    """Search LoRA hyperparameters: Ray Tune runs the trials in parallel, Optuna (TPE) proposes, ASHA stops weak
    trials early. Every `train` flag (--preset, --config, --dataset, dotted fields) sets the base recipe.

    Args:
        output: Sweep folder (outputs, trials, Ray state).
        trials: Trials in total.
        max_steps: Optimizer steps per trial (ASHA's max).
        concurrent: Trials at once (default: what fits).
        gpus_per_trial: GPUs per trial (ignored without GPUs).
        cpus_per_trial: CPUs per trial (default: shared out).
        ray_address: `auto` or HOST:PORT of a Ray cluster.
        space: Search space YAML (default: recipes/tune/space.yaml).
        report_every: Validate and report every N steps.
        grace_steps: ASHA: steps before a trial can be stopped.
        reduction_factor: ASHA: keep 1/N of the trials at each rung.
        search_seed: Seed of Optuna's sampler.
        storage: Optuna storage URL (default: O/optuna.journal).
        resume: Continue the sweep in --output (same recipe and space).
    """
    from ..tune import TuneOptions, fmt_value, run_tune

    options = TuneOptions(
        trials=trials, max_steps=max_steps, concurrent=concurrent, gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial, ray_address=ray_address, space=space, report_every=report_every,
        grace_steps=grace_steps, reduction_factor=reduction_factor, search_seed=search_seed, storage=storage,
    )  # fmt: skip
    out, summary = run_tune(list(recipe_flags), output, options, resume=resume)
    best = summary.get("best_trial")
    if best is None:
        print(f"no trial finished with a validation loss; see {out / 'trials_data.json'} for their errors")
        return 1
    found = ", ".join(f"{k}={fmt_value(v)}" for k, v in summary["best_params"].items())
    print(f"best trial {best}: val_loss {summary['best_value']:.5f} with {found}")
    print(f"train it with: flux2-lora train --config {out / 'best_config.yaml'}")
    return 0
