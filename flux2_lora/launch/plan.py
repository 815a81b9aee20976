"""The plan: a checked manifest resolved against its recipe (the recipe is parsed here, before anything is
written or submitted), with the commands every backend runs: the train flags, `accelerate launch`, `flux2-lora
tune`.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RecipeError, UsageError
from ..recipe import parse_recipe, presets
from .manifest import Manifest


@dataclass
class Plan:
    """Everything a backend needs, computed once from a manifest."""

    manifest: Manifest
    out: Path
    launch_dir: Path
    python: str
    nodes: int
    per_node: int
    mixed_precision: str
    train_args: list[str]  # after `-m flux2_lora train`, without --output.dir/--resume
    accelerate_config: Path
    deepspeed_json: Path | None
    env: dict[str, str]
    batch_size: int = 1  # the recipe's training values DeepSpeed needs
    accumulation: int = 1
    max_grad_norm: float = 1.0

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    def summary(self) -> str:
        """One line: the layout (or the sweep's nodes), the strategy and the backend."""
        m = self.manifest
        if m.command == "tune":
            return f"sweep on {self.nodes} node(s), one process per trial, backend {m.backend}"
        return (
            f"{self.nodes} node(s) x {self.per_node} process(es) = {self.world_size}, strategy {m.strategy}, "
            f"mixed precision {self.mixed_precision}, backend {m.backend}"
        )

    def launch_args(self) -> list[str]:
        """accelerate launch flags beside the config file. Mixed precision goes here, not only in the config: with
        a DeepSpeed config file, accelerate refuses a mixed_precision that comes from its own config."""
        return ["--mixed_precision", self.mixed_precision]

    def train_command(self) -> list[str]:
        resume = ["--resume", "latest"] if self.manifest.resume or self.manifest.backend == "slurm" else []
        return ["-m", "flux2_lora", "train", *self.train_args, "--output.dir", str(self.out), *resume]

    def tune_command(self, ray_address: str | None = None) -> list[str]:
        """`flux2-lora tune` for command: tune; a sweep already in OUTPUT is resumed (its recipe is saved there)."""
        if (self.out / "sweep.json").exists():
            args = ["--output", str(self.out), "--resume"]
        else:
            args = [*recipe_args(self.manifest), "--output", str(self.out), *self.manifest.tune_args]
        return [
            self.python,
            "-m",
            "flux2_lora",
            "tune",
            *args,
            *(["--ray-address", ray_address] if ray_address else []),
        ]

    def accelerate_command(self, machine_rank: int = 0, main_ip: str = "127.0.0.1") -> list[str]:
        cmd = [self.python, "-m", "accelerate.commands.launch", "--config_file", str(self.accelerate_config)]
        cmd += self.launch_args()
        if self.nodes > 1:
            cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_ip]
        return cmd + self.train_command()


def flag_value(v: Any) -> str:
    """A YAML/JSON value as a jsonargparse command-line value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def recipe_args(m: Manifest) -> list[str]:
    """`--preset NAME` or `--config FILE`, then the overrides, as train flags."""
    if m.recipe in presets() and not Path(m.recipe).suffix:
        args = ["--preset", m.recipe]
    else:
        path = _expand(m.recipe, "recipe")
        if path.is_dir():
            raise UsageError(f"recipe: {m.recipe} is a folder, not a recipe YAML file")
        if not path.is_file():
            if path.suffix or "/" in m.recipe:
                where = "" if path.is_absolute() else f" (a relative path is read from {Path.cwd()})"
                raise UsageError(f"recipe: {m.recipe} does not exist{where}")
            raise UsageError(
                f"recipe: {m.recipe} is neither a recipe file nor a preset (presets: {', '.join(presets())})"
            )
        args = ["--config", str(path.resolve())]
    for key, val in m.overrides.items():
        args += [f"--{key}", flag_value(val)]
    return args


def _expand(path: str, name: str) -> Path:
    """`~` and `~user` expanded; an unknown user is a one-line mistake, not a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise UsageError(f"{name}: {path}: no such user's home folder") from None


def _recipe_error(text: str, m: Manifest) -> str:
    """A recipe/override mistake, named as the manifest field that holds it."""
    unknown = re.search(r"unrecognized arguments: --(\S+)", text)
    if unknown:
        return f"overrides.{unknown.group(1)}: not a recipe field (every field: recipes/base.yaml)"
    key = text.split(":", 1)[0]
    if key == "output.dir":  # the manifest's output (or --output) is the recipe's output.dir
        return "output" + text[len(key) :]
    if key in m.overrides:
        return f"overrides.{text}"
    return f"recipe {m.recipe}: {text}"


def make_plan(m: Manifest) -> Plan:
    """Resolve the manifest against its recipe (checked here, before anything is submitted)."""
    r = m.resources
    per_node = r.processes_per_node or r.gpus_per_node or 1
    args = recipe_args(m)
    out = _expand(m.output, "output").resolve()
    try:
        recipe, _ = parse_recipe([*args, "--output.dir", str(out)], need_data=False)
    except (UsageError, RecipeError) as e:
        raise UsageError(_recipe_error(str(e), m)) from None
    mp = m.mixed_precision
    if mp == "auto":
        mp = recipe.training.mixed_precision
    if mp == "auto":  # as the trainer resolves it: the model's 16-bit dtype on GPUs, none on CPUs
        mp = recipe.model.dtype if r.gpus_per_node > 0 and recipe.model.dtype in ("bf16", "fp16") else "no"
    args += [
        "--distributed.strategy", m.strategy,
        "--distributed.shard_base", flag_value(m.shard_base),
        "--distributed.offload", m.offload,
        "--training.mixed_precision", mp,
    ]  # fmt: skip
    launch_dir = out / "launch"
    env = {k: flag_value(v) for k, v in m.env.items()}
    env.setdefault("PYTHONUNBUFFERED", "1")
    if r.gpus_per_node == 0 and m.strategy in ("ddp", "fsdp"):
        # accelerate's multi-process launcher does not pass `use_cpu` on: without this each CPU process would
        # build a single-process Accelerator (gloo DDP needs it, DESIGN.md). Not for DeepSpeed: under it
        # accelerate would wrap the model in DDP; ZeRO runs on CPUs with gloo without it.
        env.setdefault("ACCELERATE_USE_CPU", "1")
    return Plan(
        manifest=m,
        out=out,
        launch_dir=launch_dir,
        python=m.python or sys.executable,
        nodes=r.nodes,
        per_node=per_node,
        mixed_precision=mp,
        train_args=args,
        accelerate_config=launch_dir / "accelerate_config.yaml",
        deepspeed_json=launch_dir / "deepspeed.json" if m.strategy in ("zero2", "zero3") else None,
        env=env,
        batch_size=recipe.training.batch_size,
        accumulation=recipe.training.gradient_accumulation,
        max_grad_norm=recipe.training.max_grad_norm,
    )
