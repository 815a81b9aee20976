"""Starting a recipe on one process, one node, many nodes, Slurm or Ray.

A manifest (YAML) names the recipe and its overrides, the resources, the distributed strategy, the
backend and the environment. The launcher renders, under OUTPUT/launch/:

    accelerate_config.yaml   the `accelerate launch --config_file` for this layout and strategy
    deepspeed.json           zero2 / zero3 only: the DeepSpeed config that accelerate_config points at
    job.sbatch               slurm only: launch/slurm/{single,multi}-node.sbatch with its settings filled in

then runs `accelerate launch` here (local), submits the batch script with `sbatch` (slurm), or submits
one `accelerate launch` as a Ray job with `ray job submit` (ray). `--dry-run` writes the files and prints
the commands only. With `command: tune` the same backends run a hyperparameter sweep (`flux2-lora tune`):
here, as a Ray job whose trials spread over the Ray cluster, or as a Slurm job that starts a Ray cluster on
its nodes (launch/slurm/ray-sweep.sbatch).

The train command always names the strategy (`--distributed.strategy ...`) so the trainer and the
accelerate config agree, and passes `--resume latest` (unless `resume: false`): a relaunch, a
requeued Slurm job or a resubmitted one continue from the newest checkpoint, and a fresh output
folder starts at step 0.

The parts, one job each: `manifest` reads and checks a manifest; `plan` resolves it against its recipe into the
commands to run; `render` writes the accelerate config, the DeepSpeed JSON and the batch script; `run` runs the
plan on its backend. The command itself (`flux2-lora launch`) is `commands/cluster.py`.
"""

from __future__ import annotations

from .manifest import (
    MAX_CPUS_PER_TASK,
    MAX_GPUS_PER_NODE,
    MAX_LOCAL_NODES,
    MAX_NODES,
    MAX_PROCESSES_PER_NODE,
    MAX_RESTARTS,
    MAX_SIGNAL_SECONDS,
    Manifest,
    RayOptions,
    Resources,
    SlurmOptions,
    example_manifests,
    load_manifest,
    manifest_path,
)
from .plan import Plan, make_plan, recipe_args
from .render import SLURM_DIR, accelerate_config, deepspeed_config, render_sbatch, slurm_script_name, write_files
from .run import EXIT_REQUEUE, Launch, local_commands, prepare, ray_command, run_local, slurm_command, submit_slurm

__all__ = [
    "EXIT_REQUEUE", "Launch", "MAX_CPUS_PER_TASK", "MAX_GPUS_PER_NODE", "MAX_LOCAL_NODES", "MAX_NODES",
    "MAX_PROCESSES_PER_NODE", "MAX_RESTARTS", "MAX_SIGNAL_SECONDS", "Manifest", "Plan", "RayOptions", "Resources",
    "SLURM_DIR", "SlurmOptions", "accelerate_config", "deepspeed_config", "example_manifests", "load_manifest",
    "local_commands", "make_plan", "manifest_path", "prepare", "ray_command", "recipe_args", "render_sbatch",
    "run_local", "slurm_command", "slurm_script_name", "submit_slurm", "write_files",
]  # fmt: skip
