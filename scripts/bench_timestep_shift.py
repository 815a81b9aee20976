"""Does `training.timestep_shift: auto` help? The tiny FLUX.2 models trained with none / auto / a fixed 3.0 on the
same data and seeds, compared by their final fixed-seed validation loss.

    python scripts/bench_timestep_shift.py [--models dev klein] [--steps 200] [--seeds 0 1 2]
        [--shifts none auto 3.0] [--sampling uniform] [--workdir DIR] [--json OUT]

Each run is the `tiny` preset (a random tiny FLUX.2-dev or klein transformer, `builtin:sample` coloured shapes at
64 px, 2 held-out images, rank 8 on attention+single, lr 5e-3 cosine, batch 1, fp32) for --steps steps, trained
in-process. Per model and seed the data is cached once (`flux2-lora data cache`; the holdout split follows the
seed) and every shift trains from that cache, so within a seed the runs differ only in the shift: the same
images, data order, noise and draws of sigma before the shift (the shift consumes no random numbers).

Three losses of each final LoRA on the held-out images, all with fixed noise (validation.seed):
  val_loss   the run's own validation loss: the mean over validation.sigmas (0.1, 0.3, 0.5, 0.7, 0.9), each sigma
             weighted equally: how well the LoRA denoises at fixed noise levels, not weighted by any sampler;
  per sigma  the same at each of those sigmas alone (where a shift trades low-sigma for high-sigma accuracy);
  schedule   the mean over the 50 sigmas Flux2Pipeline visits at this size by default (np.linspace(1, 1/50, 50)
             through the model's scheduler with the pipeline's compute_empirical_mu for each held-out image's
             bucket): the loss weighted as the default sampler weights the steps.
The table gives, per model and shift, the medians over seeds, the median of each seed's paired difference from
`none` and the number of seeds where the shift's val_loss was lower. About 10 minutes for dev on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that the next Trainer builds its own."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def common_flags(model: str, seed: int, steps: int, sampling: str) -> list[str]:
    return [
        "--preset", "tiny", "--model", f"builtin:tiny-{model}", "--training.seed", str(seed), "--steps", str(steps),
        "--training.timestep_sampling", sampling, "--validation.prompts", "[]", "--validation.every_n_steps", "0",
        "--validation.sigmas", json.dumps(list(SIGMAS)), "--output.checkpoint_every", "0",
        "--logging.tensorboard", "false", "--logging.log_every", str(steps),
    ]  # fmt: skip


def schedule_sigmas(recipe: Any, seq_len: int) -> list[float]:
    """The sigmas Flux2Pipeline steps through by default at a latent grid of seq_len tokens."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from flux2_lora.model import load_scheduler, resolve_model

    steps = 50
    sched = load_scheduler(resolve_model(recipe.model))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq_len, steps))
    return [min(float(s), 1 - 1e-4) for s in sched.sigmas[:-1]]


def losses_at(trainer: Any, sigmas: list[float]) -> list[float]:
    """The validation loss at each sigma alone (the run's own fixed noise and held-out items)."""
    v = trainer.recipe.validation
    kept = v.sigmas
    try:
        out = []
        for s in sigmas:
            v.sigmas = [s]
            out.append(trainer.validation_loss())
        return out
    finally:
        v.sigmas = kept


def schedule_loss(trainer: Any) -> float:
    """The mean over held-out items of each item's loss at the sigmas the pipeline visits at the item's size, with
    the item's own validation noise (item i is scored alone with validation.seed + i, as validation seeds it)."""
    v = trainer.recipe.validation
    items, seed = trainer.val_samples, v.seed
    losses = []
    try:
        for i, item in enumerate(items):
            h, w = item["latents"].shape[-2:]
            trainer.val_samples, v.seed = [item], seed + i
            losses.append(statistics.fmean(losses_at(trainer, schedule_sigmas(trainer.recipe, h * w))))
        return statistics.fmean(losses)
    finally:
        trainer.val_samples, v.seed = items, seed


def one_run(flags: list[str], shift: str, out: Path) -> dict[str, Any]:
    from flux2_lora.recipe import parse_recipe
    from flux2_lora.train import Trainer

    shutil.rmtree(out, ignore_errors=True)  # a run folder holding checkpoints would be refused
    recipe, _ = parse_recipe([*flags, "--training.timestep_shift", shift, "--output", str(out)])
    t0 = time.perf_counter()
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.fit()
    per_sigma = losses_at(trainer, list(SIGMAS))
    rec = {
        "val_loss_base": trainer.state.val_history[0][1],
        "val_loss": trainer.state.val_history[-1][1],
        "per_sigma": per_sigma,
        "schedule_loss": schedule_loss(trainer),
        "tokens": sorted({int(x["latents"].shape[-2] * x["latents"].shape[-1]) for x in trainer.val_samples}),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    assert math.isclose(statistics.fmean(per_sigma), rec["val_loss"], rel_tol=1e-5), (per_sigma, rec["val_loss"])
    del trainer
    reset_accelerate()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dev"], choices=["dev", "klein"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shifts", nargs="+", default=["none", "auto", "3.0"])
    ap.add_argument("--sampling", default="uniform", help="training.timestep_sampling of every run")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench_timestep_shift"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.shifts[0] != "none":
        sys.exit("bench_timestep_shift: --shifts must start with none (the baseline)")

    from flux2_lora.cli import main as cli

    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for model in args.models:
        for seed in args.seeds:
            flags = common_flags(model, seed, args.steps, args.sampling)
            cache = args.workdir / model / f"cache-seed{seed}"
            if not (cache / "index.json").exists():
                if cli(["data", "cache", *flags[: flags.index("--steps")], "--output", str(cache)]) != 0:
                    sys.exit(f"bench_timestep_shift: data cache failed for {model} seed {seed}")
            for shift in args.shifts:
                out = args.workdir / model / f"seed{seed}-{shift}"
                rec = one_run([*flags, "--dataset", str(cache)], shift, out)
                rec.update(model=model, seed=seed, shift=shift)
                results.append(rec)
                print(
                    f"{model} seed {seed} shift {shift:>5}: val_loss {rec['val_loss']:.4f} (base "
                    f"{rec['val_loss_base']:.4f}), schedule {rec['schedule_loss']:.4f}, {rec['seconds']} s",
                    flush=True,
                )
                if args.json:  # after every run, so that a stopped benchmark keeps what it measured
                    args.json.write_text(json.dumps(results, indent=1))
    print(f"\ntotal {time.perf_counter() - start:.0f} s; medians over seeds {args.seeds}, {args.steps} steps\n")
    cols = " | ".join(f"σ={s}" for s in SIGMAS)
    print(f"| model | shift | val_loss | vs none | lower than none | {cols} | schedule loss |")
    print("|" + " --- |" * (6 + len(SIGMAS)))
    for model in args.models:
        base = {r["seed"]: r for r in results if r["model"] == model and r["shift"] == "none"}
        for shift in args.shifts:
            rs = [r for r in results if r["model"] == model and r["shift"] == shift]
            med = statistics.median(r["val_loss"] for r in rs)
            diff = statistics.median(r["val_loss"] - base[r["seed"]]["val_loss"] for r in rs)
            wins = sum(r["val_loss"] < base[r["seed"]]["val_loss"] for r in rs)
            sig = " | ".join(f"{statistics.median(r['per_sigma'][i] for r in rs):.4f}" for i in range(len(SIGMAS)))
            sched = statistics.median(r["schedule_loss"] for r in rs)
            print(f"| {model} | {shift} | {med:.4f} | {diff:+.4f} | {wins}/{len(rs)} | {sig} | {sched:.4f} |")


if __name__ == "__main__":
    main()
