"""`flux2-lora launch MANIFEST`: start a recipe on one process, one node, many nodes, Slurm or Ray.

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
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .cli import CliError, _parse, command_parser, parse_train, presets, read_yaml
from .config import RecipeError
from .resources import launch_dir

SLURM_DIR = launch_dir() / "slurm"  # the batch-script templates (inside the installed package, or the checkout's)


def example_manifests() -> dict[str, Path]:
    """The example manifests shipped with the package, by name (`flux2-lora launch NAME` runs one)."""
    return {p.stem: p for p in sorted((launch_dir() / "manifests").glob("*.yaml"))}


def manifest_path(spec: str) -> Path:
    """MANIFEST as given: a file, or the name of an example manifest (`slurm-4nodes-fsdp`)."""
    path = Path(spec).expanduser()
    examples = example_manifests()
    if not path.exists() and path.parent == Path(".") and path.stem in examples and path.suffix in ("", ".yaml"):
        return examples[path.stem]
    return path


EXIT_REQUEUE = 75  # the trainer's exit code after a SIGUSR1/SIGTERM stop with a checkpoint written
# Slurm --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds (minutes and seconds below 60, hours below 24 after days)
_TIME = re.compile(r"(\d+)|(\d+):([0-5]\d)|(\d+):([0-5]\d):([0-5]\d)|(\d+)-([01]?\d|2[0-3])(:[0-5]\d){0,2}")
# Upper bounds: far above any real cluster, low enough that a typo (an extra zero, a pasted number) is refused.
MAX_NODES = 10_000
MAX_LOCAL_NODES = 16  # the local backend starts one launcher per machine rank on this host
MAX_GPUS_PER_NODE = 64
MAX_PROCESSES_PER_NODE = 1024
MAX_CPUS_PER_TASK = 10_000
MAX_SIGNAL_SECONDS = 65535  # sbatch --signal's own limit
MAX_RESTARTS = 10_000
_SETTINGS_BEGIN = "# ---- settings"
_SETTINGS_END = "# ---- end settings"


@dataclass
class Resources:
    """What the job asks for. Without GPUs (`gpus_per_node: 0`) the processes run on CPUs with gloo."""

    nodes: int = 1
    """Machines. With the local backend and nodes > 1, one `accelerate launch` per machine rank is started on
    this host: a test of the multi-node rendezvous, not a way to train faster."""
    gpus_per_node: int = 0
    """GPUs per node (0: CPU processes)."""
    processes_per_node: int | None = None
    """Training processes per node (default: gpus_per_node, or 1 without GPUs)."""
    cpus_per_task: int | None = None
    """Slurm --cpus-per-task (one task per node runs the node's accelerate launcher and its processes)."""
    mem: str | None = None
    """Slurm --mem per node, e.g. `512G` (`0`: all of it)."""
    time: str | None = None
    """Slurm --time, e.g. `24:00:00` or `2-00:00:00`."""
    partition: str | None = None
    """Slurm --partition."""
    account: str | None = None
    """Slurm --account."""


@dataclass
class SlurmOptions:
    """Slurm batch script settings (backend: slurm)."""

    script: Literal["auto", "single-node", "multi-node"] = "auto"
    """Template under launch/slurm/ (`auto`: single-node for one node, else multi-node)."""
    job_name: str = "flux2-lora"
    """Slurm --job-name."""
    signal_seconds: int = 300
    """SIGUSR1 this many seconds before the time limit: the trainer checkpoints and the job requeues itself."""
    max_restarts: int = 20
    """Stop requeueing after this many restarts of one job."""
    log: str | None = None
    """Slurm --output (default: OUTPUT/launch/slurm-%j.out; appended to across requeues)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra #SBATCH options, e.g. ["--qos=high", "--constraint=h100", "--exclusive"]."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run at the start of every attempt, e.g. ["module load cuda/12.8", "source ~/venv/bin/activate"]."""


@dataclass
class RayOptions:
    """Ray job submission (backend: ray): a training run on one node, or a sweep over the whole Ray cluster."""

    address: str = "http://127.0.0.1:8265"
    """Ray dashboard address of the cluster (`ray job submit --address`)."""
    working_dir: str | None = None
    """runtime_env working_dir uploaded with the job (default: none; the package must be installed on the cluster)."""
    entrypoint_num_gpus: float | None = None
    """GPUs reserved for the entrypoint (default: resources.gpus_per_node)."""
    entrypoint_num_cpus: float | None = None
    """CPUs reserved for the entrypoint (default: resources.cpus_per_task)."""
    no_wait: bool = False
    """Return after submitting instead of following the job's logs."""


@dataclass
class Manifest:
    """Where and how a recipe runs."""

    recipe: str
    """A recipe YAML file or a preset name (`flux2-lora --help` lists presets)."""
    output: str
    """Output folder (the recipe's output.dir); launch files go to OUTPUT/launch/. On a cluster it must be on a
    file system every node sees."""
    command: Literal["train", "tune"] = "train"
    """train: one training run; tune: a hyperparameter sweep (`flux2-lora tune`), one process per trial, the trials
    spread over the nodes by Ray (slurm: launch/slurm/ray-sweep.sbatch starts a Ray cluster in the job)."""
    tune_args: list[str] = field(default_factory=list)
    """command tune: `flux2-lora tune` flags, e.g. [--trials, 50, --max-steps, 500, --gpus-per-trial, 1]."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted recipe fields and their values, e.g. {training.max_steps: 2000, data.dataset: /data/shards}."""
    resources: Resources = field(default_factory=Resources)
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"
    """ddp replicates the model; fsdp is FSDP2; zero2/zero3 are DeepSpeed ZeRO stages (pip install 'flux2-lora[deepspeed]')."""
    shard_base: bool = True
    """fsdp and zero3: shard the frozen transformer across processes."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """zero2/zero3: CPU offload of the optimizer state (`optimizer`), with zero3 also of the parameters (`all`)."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`auto`: the recipe's training.mixed_precision; if that is auto too, the model's dtype (bf16/fp16) on GPUs
    and `no` on CPUs, as the trainer would choose."""
    backend: Literal["local", "slurm", "ray"] = "local"
    """local: `accelerate launch` here; slurm: sbatch a rendered batch script; ray: `ray job submit`."""
    env: dict[str, str | int | float | bool] = field(default_factory=dict)
    """Environment variables for the training processes, e.g. {HF_HOME: /shared/hf, NCCL_DEBUG: WARN}."""
    main_port: int = 29500
    """Rendezvous port on the main (rank 0) machine."""
    resume: bool = True
    """Pass `--resume latest`: continue from the newest checkpoint in OUTPUT (or start fresh). Slurm jobs always do."""
    python: str | None = None
    """Python interpreter on the nodes (default: the one running `flux2-lora launch`)."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    ray: RayOptions = field(default_factory=RayOptions)


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


# ------------------------------------------------------------------------------------------- manifest
def load_manifest(path: str | Path, output: str | None = None) -> Manifest:
    """Read and check a manifest (`output`: the command line's --output, in place of the manifest's). Every
    mistake raises a one-line CliError('<field>: <reason>'): the types and shapes here, naming the file; the
    ranges and combinations in _check."""
    path = Path(path)
    try:
        raw = read_yaml(path, "MANIFEST")
    except (TypeError, RecursionError) as e:  # a list as a key; nesting too deep for the YAML parser
        reason = "nested too deeply" if isinstance(e, RecursionError) else f"a key that is a list or mapping: {e}"
        raise CliError(f"MANIFEST: {path} is not a manifest YAML ({reason})") from None
    except OSError as e:
        raise CliError(f"MANIFEST: cannot read {path} ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else _kind(raw)
        raise CliError(f"MANIFEST: {path} must be a YAML mapping of manifest fields (got {got})")
    if output is not None:
        raw = {**raw, "output": output}
    m = Manifest(**_Reader(path).section(raw, Manifest, ""))
    _check(m)
    return m


_NOTHING = object()
_TOO_MANY = 100_000  # values in one override: a YAML alias bomb expands to far more
_TOO_DEEP = 50  # lists in lists in one override


def _kind(v: Any) -> str:
    """What a YAML value is, in the user's words."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return f"a {type(v).__name__}"  # a date, bytes (!!binary), a set (!!set)


def _shown(v: Any, limit: int = 60) -> str:
    """A value as YAML would spell it (JSON style), cut short: never more than `limit` characters are built, so a
    YAML alias bomb or a list that holds itself costs nothing."""
    parts: list[str] = []
    size = 0

    def put(text: str) -> bool:
        nonlocal size
        parts.append(text)
        size += len(text)
        return size <= limit

    def walk(x: Any, depth: int) -> bool:
        if depth > 20:
            return put("...")
        if isinstance(x, list):
            if not put("["):
                return False
            for i, item in enumerate(x):
                if (i and not put(", ")) or not walk(item, depth + 1):
                    return False
            return put("]")
        if isinstance(x, dict):
            if not put("{"):
                return False
            for i, (key, item) in enumerate(x.items()):
                if (i and not put(", ")) or not walk(key, depth + 1) or not put(": ") or not walk(item, depth + 1):
                    return False
            return put("}")
        if x is None:
            return put("null")
        if isinstance(x, bool):
            return put("true" if x else "false")
        if isinstance(x, (int, float)):
            return put(str(x))
        return put(json.dumps(x if isinstance(x, str) else str(x)))

    done = walk(v, 0)
    text = "".join(parts)
    return text if done and len(text) <= limit else text[: limit - 3] + "..."


def _numeric_text(v: Any) -> str:
    """The note for a number that YAML read as text: quoted, or 1e9 (YAML 1.1 wants 1.0e+9)."""
    if not isinstance(v, str):
        return ""
    try:
        float(v)
    except ValueError:
        return ""
    number = float(v)
    if not _is_finite(number):
        return ""
    if "e" in v.lower():  # YAML 1.1 floats need a dot and a signed exponent: 1.0e+9
        mantissa, exponent = v.lower().split("e", 1)
        plain = str(int(number)) if number.is_integer() and abs(number) < 1e16 else repr(number)
        sign = "-" if exponent.startswith("-") else "+"
        exact = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{sign}{exponent.lstrip('+-')}"
        return f"YAML reads {v} as text; write {plain} or {exact}"
    return "a number in quotes is text; leave the quotes out"


def _is_finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


class _Reader:
    """The raw manifest checked against the dataclasses' annotations and turned into them: a section that is not
    a mapping, a field of the wrong type, a key no section has, NaN and infinity are one-line errors naming the
    field and the file. (jsonargparse would read a string section as a config file to load, and crash on a list
    or null one.) A new field with a type not handled in value() fails every load: add its check there."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, name: str, reason: str, got: Any = _NOTHING, kind: bool = True, note: str = "") -> Any:
        """CliError('<name>: <reason> (got <what it is>: <value>; <note>) in <manifest>')."""
        if got is _NOTHING:
            what = f" ({note})" if note else ""
        else:
            value = "null" if got is None else f"{_kind(got)}: {_shown(got)}" if kind else _shown(got)
            what = f" (got {value}{'; ' + note if note else ''})"
        raise CliError(f"{name}: {reason}{what} in {self.path}")

    def section(self, raw: dict[Any, Any], cls: Any, prefix: str) -> dict[str, Any]:
        import dataclasses
        import typing

        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        names = ", ".join(sorted(fields))
        for key in raw:
            if not isinstance(key, str) or key not in fields:
                # (unknown keys name themselves; jsonargparse would say `Option ... is not accepted`)
                self.fail(f"{prefix}{_shown(key) if not isinstance(key, str) else key}",
                          f"not a manifest field (expected one of {names})")  # fmt: skip
        for name, f in fields.items():
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and name not in raw:
                what = {"recipe": "a recipe YAML file or a preset name (" + ", ".join(presets()) + ")",
                        "output": "the output folder"}.get(name, "a value")  # fmt: skip
                self.fail(prefix + name, f"required: {what}")
        return {key: self.value(val, hints[key], prefix + key) for key, val in raw.items()}

    def value(self, val: Any, hint: Any, name: str) -> Any:
        import dataclasses
        import types
        import typing

        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            if val is None:
                return None
            (hint,) = [a for a in args if a is not type(None)]
            return self.value(val, hint, name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(val, dict):
                fields = ", ".join(f.name for f in dataclasses.fields(hint))
                note = "leave the section out for the defaults" if val is None else ""
                self.fail(name, f"must be a mapping of {fields}", val, note=note)
            return hint(**self.section(val, hint, name + "."))
        if origin is typing.Literal:
            if not isinstance(val, str) or val not in args:
                self.fail(name, "must be one of " + ", ".join(args), val, kind=not isinstance(val, str))
            return val
        if hint is bool:
            if not isinstance(val, bool):
                self.fail(name, "must be true or false", val)
            return val
        if hint is int:
            if isinstance(val, float) and not _is_finite(val):
                self.fail(name, "must be a finite whole number", val, kind=False)
            if isinstance(val, float) and val.is_integer():
                return int(val)
            if not isinstance(val, int) or isinstance(val, bool):
                self.fail(name, "must be a whole number", val, note=_numeric_text(val))
            return val
        if hint is float:
            if not isinstance(val, (int, float)) or isinstance(val, bool):
                self.fail(name, "must be a number", val, note=_numeric_text(val))
            if not _is_finite(val):
                self.fail(name, "must be a finite number", val, kind=False)
            return val
        if hint is str:
            return self.text(val, name)
        if origin is list:
            if not isinstance(val, list):
                self.fail(name, "must be a list of strings", val)
            return [self.text(v, f"{name}[{i}]", quote_numbers=True) for i, v in enumerate(val)]
        if origin is dict:
            if not isinstance(val, dict):
                what = "environment variables" if name == "env" else "dotted recipe fields"
                note = "write {} for none" if val is None else ""
                self.fail(name, f"must be a mapping of {what} and their values", val, note=note)
            for key in val:
                if not isinstance(key, str):
                    self.fail(f"{name}.{_shown(key)}", "the name must be a string", key)
            if name == "env":
                for key, v in val.items():
                    if not isinstance(v, (str, int, float)) or (isinstance(v, float) and not _is_finite(v)):
                        self.fail(f"env.{key}", "must be a string, number or boolean", v)
                    if isinstance(v, str) and "\0" in v:
                        self.fail(f"env.{key}", "must not hold a NUL character")
            else:
                for key, v in val.items():
                    self.plain(v, f"{name}.{key}", [0], f"{name}.{key}")
            return dict(val)
        raise AssertionError(f"{name}: no check for {hint}")  # a new Manifest field needs its check here

    def text(self, val: Any, name: str, quote_numbers: bool = False) -> str:
        if not isinstance(val, str):
            number = isinstance(val, (int, float)) and not isinstance(val, bool)
            reason, note = "must be a string", f'quote it: "{_shown(val)}"' if quote_numbers and number else ""
            if name == "resources.time" and number:
                reason = 'must be a Slurm time in quotes, like "24:00:00" or "2-00:00:00"'
                note = "YAML reads an unquoted 24:00:00 as a number of seconds"
            elif name == "resources.mem" and number:
                reason, note = 'must be a size in quotes, like "512G" or "0"', ""
            self.fail(name, reason, val, note=note)
        if not val.strip():
            self.fail(name, "must not be empty" + ("" if name in ("recipe", "output") else " (leave it out)"))
        if any(c in val for c in "\n\r\0"):
            self.fail(name, "must be one line (no newline or NUL characters)", val)
        return val

    def plain(self, v: Any, name: str, count: list[int], root: str, depth: int = 0) -> None:
        """An override value (`root`: its field): what JSON can say (it goes to the trainer as a command-line
        value), finite, of a sane size."""
        count[0] += 1
        if count[0] > _TOO_MANY:
            self.fail(root, f"holds more than {_TOO_MANY} values")
        if depth > _TOO_DEEP:
            self.fail(root, f"nests lists or mappings more than {_TOO_DEEP} deep")
        if isinstance(v, float) and not _is_finite(v):
            self.fail(name, "must be a finite number", v, kind=False)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if item is v:
                    self.fail(name, "holds itself (a YAML alias inside its own anchor)")
                self.plain(item, f"{name}[{i}]", count, root, depth + 1)
        elif isinstance(v, dict):
            for key, item in v.items():
                if not isinstance(key, str) or item is v:
                    self.fail(f"{name}.{_shown(key)}", "must be a mapping with string keys", v)
                self.plain(item, f"{name}.{key}", count, root, depth + 1)
        elif not (v is None or isinstance(v, (str, int, float))):
            self.fail(name, "must be a string, number, true/false, null, list or mapping", v)


def _need(cond: bool, name: str, reason: str) -> None:
    if not cond:
        raise CliError(f"{name}: {reason}")


def _at_most(value: float | None, limit: int, name: str) -> None:
    if value is not None:
        _need(value <= limit, name, f"must be at most {limit} (got {value})")


def _check(m: Manifest) -> None:
    """Ranges and combinations of the typed manifest (types: _Reader)."""
    r = m.resources
    _need(r.nodes >= 1, "resources.nodes", f"must be at least 1 (got {r.nodes})")
    _at_most(r.nodes, MAX_NODES, "resources.nodes")
    _need(r.gpus_per_node >= 0, "resources.gpus_per_node", f"must be 0 or more (got {r.gpus_per_node})")
    _at_most(r.gpus_per_node, MAX_GPUS_PER_NODE, "resources.gpus_per_node")
    if r.processes_per_node is not None:
        _need(
            r.processes_per_node >= 1,
            "resources.processes_per_node",
            f"must be at least 1 (got {r.processes_per_node})",
        )
        _at_most(r.processes_per_node, MAX_PROCESSES_PER_NODE, "resources.processes_per_node")
        _need(
            r.gpus_per_node == 0 or r.processes_per_node <= r.gpus_per_node,
            "resources.processes_per_node",
            f"{r.processes_per_node} processes on {r.gpus_per_node} GPU(s): at most one process per GPU",
        )
    if r.cpus_per_task is not None:
        _need(r.cpus_per_task >= 1, "resources.cpus_per_task", f"must be at least 1 (got {r.cpus_per_task})")
        _at_most(r.cpus_per_task, MAX_CPUS_PER_TASK, "resources.cpus_per_task")
    if r.time is not None:
        _need(
            bool(_TIME.fullmatch(r.time)),
            "resources.time",
            f"must be a Slurm time like 24:00:00 or 2-00:00:00 (got {r.time})",
        )
    if r.mem is not None:
        _need(bool(re.fullmatch(r"\d+[KMGT]?", r.mem)), "resources.mem", f"must be like 512G or 0 (got {r.mem})")
    _need(1 <= m.main_port <= 65535, "main_port", f"must be a port number (got {m.main_port})")
    if m.offload != "none":
        _need(m.strategy in ("zero2", "zero3"), "offload", f"only zero2 and zero3 offload (strategy is {m.strategy})")
    if m.offload == "all":
        _need(
            m.strategy == "zero3",
            "offload",
            "`all` (parameters too) needs strategy zero3; zero2 offloads the optimizer",
        )
    if m.backend == "ray" and m.command == "train":
        _need(r.nodes == 1, "resources.nodes", "a training run as a Ray job runs on one node (a sweep may use many)")
    if m.command == "tune":
        _need(m.strategy == "ddp", "strategy", "a sweep runs each trial as one process; leave strategy at ddp")
        for flag in m.tune_args:
            _need(
                flag.split("=")[0] not in ("--output", "--ray-address", "--resume"),
                "tune_args",
                f"{flag} is set by the launcher (output, the job's Ray cluster, resume)",
            )
    else:
        _need(not m.tune_args, "tune_args", "only with command: tune")
    _need(
        not (m.slurm.script == "single-node" and r.nodes > 1),
        "slurm.script",
        f"single-node cannot run resources.nodes={r.nodes}; use multi-node or auto",
    )
    _need(m.slurm.signal_seconds >= 0, "slurm.signal_seconds", f"must be 0 or more (got {m.slurm.signal_seconds})")
    _at_most(m.slurm.signal_seconds, MAX_SIGNAL_SECONDS, "slurm.signal_seconds")
    _need(m.slurm.max_restarts >= 0, "slurm.max_restarts", f"must be 0 or more (got {m.slurm.max_restarts})")
    _at_most(m.slurm.max_restarts, MAX_RESTARTS, "slurm.max_restarts")
    for i, arg in enumerate(m.slurm.sbatch_args):
        _need(arg.startswith("-"), f"slurm.sbatch_args[{i}]", f"must be an sbatch option like --qos=high (got {arg})")
    for key, limit in (("entrypoint_num_gpus", MAX_GPUS_PER_NODE), ("entrypoint_num_cpus", MAX_CPUS_PER_TASK)):
        value = getattr(m.ray, key)
        if value is not None:
            _need(value >= 0, f"ray.{key}", f"must be 0 or more (got {value})")
            _at_most(value, limit, f"ray.{key}")
    if m.backend == "local":
        _need(
            r.nodes <= MAX_LOCAL_NODES,
            "resources.nodes",
            f"the local backend starts one launcher per machine rank on this host (a rendezvous test): at most "
            f"{MAX_LOCAL_NODES} (got {r.nodes}); use slurm or ray for real nodes",
        )
    for key in m.env:
        _need(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)), f"env.{key}", "not a valid environment variable name")
    for key in m.overrides:
        _need(
            bool(re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", key)),
            f"overrides.{key}",
            "must be a dotted recipe field like training.max_steps",
        )
        _need(
            key not in ("output.dir",) and not key.startswith("distributed."),
            f"overrides.{key}",
            "set by the manifest itself (output, strategy, shard_base, offload)",
        )


def _value(v: Any) -> str:
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
            raise CliError(f"recipe: {m.recipe} is a folder, not a recipe YAML file")
        if not path.is_file():
            if path.suffix or "/" in m.recipe:
                where = "" if path.is_absolute() else f" (a relative path is read from {Path.cwd()})"
                raise CliError(f"recipe: {m.recipe} does not exist{where}")
            raise CliError(
                f"recipe: {m.recipe} is neither a recipe file nor a preset (presets: {', '.join(presets())})"
            )
        args = ["--config", str(path.resolve())]
    for key, val in m.overrides.items():
        args += [f"--{key}", _value(val)]
    return args


def _expand(path: str, name: str) -> Path:
    """`~` and `~user` expanded; an unknown user is a one-line mistake, not a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise CliError(f"{name}: {path}: no such user's home folder") from None


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


def plan(m: Manifest) -> Plan:
    """Resolve the manifest against its recipe (checked here, before anything is submitted)."""
    r = m.resources
    per_node = r.processes_per_node or r.gpus_per_node or 1
    args = recipe_args(m)
    out = _expand(m.output, "output").resolve()
    try:
        recipe, _ = parse_train([*args, "--output.dir", str(out)], need_data=False)
    except (CliError, RecipeError) as e:
        raise CliError(_recipe_error(str(e), m)) from None
    mp = m.mixed_precision
    if mp == "auto":
        mp = recipe.training.mixed_precision
    if mp == "auto":  # as the trainer resolves it: the model's 16-bit dtype on GPUs, none on CPUs
        mp = recipe.model.dtype if r.gpus_per_node > 0 and recipe.model.dtype in ("bf16", "fp16") else "no"
    args += [
        "--distributed.strategy", m.strategy,
        "--distributed.shard_base", _value(m.shard_base),
        "--distributed.offload", m.offload,
        "--training.mixed_precision", mp,
    ]  # fmt: skip
    launch_dir = out / "launch"
    env = {k: _value(v) for k, v in m.env.items()}
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


# ------------------------------------------------------------------------------------- rendered files
def accelerate_config(p: Plan) -> dict[str, Any]:
    """The accelerate config (what `accelerate config` would write) for the plan's layout and strategy."""
    m = p.manifest
    cpu = m.resources.gpus_per_node == 0 and m.strategy in ("ddp", "fsdp")  # see plan(): not for DeepSpeed
    if m.strategy == "zero2" or m.strategy == "zero3":
        dist = "DEEPSPEED"
    elif m.strategy == "fsdp":
        dist = "FSDP"
    else:
        dist = "MULTI_GPU" if p.world_size > 1 else "NO"
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": dist,
        "num_machines": p.nodes,
        "num_processes": p.world_size,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": p.mixed_precision,
        "use_cpu": cpu,
        "gpu_ids": "all",
        "downcast_bf16": "no",
        "rdzv_backend": "static",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if p.nodes > 1 or p.world_size > 1:
        cfg["main_process_port"] = m.main_port
    if p.nodes > 1:
        cfg["main_process_ip"] = "127.0.0.1"  # every launch passes the real one (--main_process_ip)
    if p.deepspeed_json is not None:
        cfg["deepspeed_config"] = {
            "deepspeed_config_file": str(p.deepspeed_json),
            # One launcher per node started by us (srun, or a loop on localhost), not DeepSpeed's pdsh runner.
            "deepspeed_multinode_launcher": "standard",
            # The trainer loads the frozen transformer itself (straight to its device) and ZeRO-3 partitions it
            # in prepare(); zero.Init at load time would also partition the cache stage's text encoder.
            "zero3_init_flag": False,
        }
    if m.strategy == "fsdp":
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "Flux2TransformerBlock,Flux2SingleTransformerBlock",
            "fsdp_reshard_after_forward": m.shard_base,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": False,
        }
    return cfg


def deepspeed_config(p: Plan) -> dict[str, Any]:
    """DeepSpeed JSON for zero2/zero3: concrete values from the recipe; `train_batch_size` is left to accelerate."""
    m = p.manifest
    stage = 3 if m.strategy == "zero3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if m.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": m.resources.gpus_per_node > 0}
    if stage == 3:
        if m.offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": m.resources.gpus_per_node > 0}
        # Full 16-bit weights on save: the LoRA is exported whole from rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": "auto",  # accelerate: micro batch x accumulation x processes
        "train_micro_batch_size_per_gpu": p.batch_size,
        "gradient_accumulation_steps": p.accumulation,
        "gradient_clipping": p.max_grad_norm,
        "bf16": {"enabled": p.mixed_precision == "bf16"},
        "fp16": {"enabled": p.mixed_precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def _settings_block(p: Plan, script: str) -> list[str]:
    """The template's settings block filled in: the script's own variables, then the environment and setup lines."""
    m = p.manifest
    q = shlex.quote

    def array(name: str, args: list[str]) -> str:
        return f"{name}=(" + " ".join(q(a) for a in args) + ")"

    if script == "ray-sweep":
        own = [f"RAY_PORT={m.main_port}", f"MAX_RESTARTS={m.slurm.max_restarts}",
               array("RECIPE_ARGS", recipe_args(m)), array("TUNE_ARGS", m.tune_args)]  # fmt: skip
    else:
        own = [f"ACCELERATE_CONFIG={q(str(p.accelerate_config))}", f"MAIN_PORT={m.main_port}",
               f"MAX_RESTARTS={m.slurm.max_restarts}", array("LAUNCH_ARGS", p.launch_args()),
               array("TRAIN_ARGS", p.train_args)]  # fmt: skip
    return [
        f"{_SETTINGS_BEGIN}: written by `flux2-lora launch`; edit them to use this script by hand ----",
        f"PYTHON={q(p.python)}",
        f"OUTPUT_DIR={q(str(p.out))}",
        *own,
        *(f"export {k}={q(v)}" for k, v in p.env.items()),
        *m.slurm.setup,
        f"{_SETTINGS_END} ----",
    ]


def _sbatch_lines(p: Plan, script: str) -> list[str]:
    m, r = p.manifest, p.manifest.resources
    log = m.slurm.log or str(p.launch_dir / "slurm-%j.out")
    lines = [
        f"--job-name={m.slurm.job_name}",
        f"--nodes={p.nodes}",
    ]
    if script in ("multi-node", "ray-sweep"):
        lines.append("--ntasks-per-node=1")  # one accelerate launcher per node starts the node's processes
    else:
        lines.append("--ntasks=1")
    optional = {"gpus-per-node": r.gpus_per_node, "cpus-per-task": r.cpus_per_task, "mem": r.mem, "time": r.time,
                "partition": r.partition, "account": r.account}  # fmt: skip
    lines += [f"--{flag}={value}" for flag, value in optional.items() if value]
    lines += [f"--output={log}", "--open-mode=append", "--requeue"]
    if m.slurm.signal_seconds:
        lines.append(f"--signal=B:USR1@{m.slurm.signal_seconds}")
    lines += list(m.slurm.sbatch_args)
    return ["#SBATCH " + ln for ln in lines]


def slurm_script_name(p: Plan) -> str:
    if p.manifest.command == "tune":
        return "ray-sweep"
    s = p.manifest.slurm.script
    return ("single-node" if p.nodes == 1 else "multi-node") if s == "auto" else s


def render_sbatch(p: Plan, template_dir: Path = SLURM_DIR) -> str:
    """The launch/slurm/ template with its #SBATCH header and settings block replaced."""
    name = slurm_script_name(p)
    template = (template_dir / f"{name}.sbatch").read_text().splitlines()
    out: list[str] = []
    in_settings = header_done = False
    for line in template:
        if line.startswith("#SBATCH"):
            if not header_done:
                out += _sbatch_lines(p, name)
                header_done = True
            continue
        if line.startswith(_SETTINGS_BEGIN):
            in_settings = True
            out += _settings_block(p, name)
            continue
        if in_settings:
            in_settings = not line.startswith(_SETTINGS_END)
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def write_files(p: Plan) -> dict[str, Path]:
    p.launch_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if p.manifest.command == "train":  # a sweep's trials are single processes: no accelerate config
        files["accelerate_config"] = p.accelerate_config
        p.accelerate_config.write_text(yaml.safe_dump(accelerate_config(p), sort_keys=False))
    if p.deepspeed_json is not None:
        p.deepspeed_json.write_text(json.dumps(deepspeed_config(p), indent=2) + "\n")
        files["deepspeed"] = p.deepspeed_json
    if p.manifest.backend == "slurm":
        path = p.launch_dir / "job.sbatch"
        path.write_text(render_sbatch(p))
        path.chmod(0o755)
        files["sbatch"] = path
    return files


# ------------------------------------------------------------------------------------------- backends
def _show(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + shlex.join(cmd)


def local_commands(p: Plan) -> list[list[str]]:
    """One accelerate launch per machine rank, all on this host (nodes > 1 tests the multi-node rendezvous)."""
    return [p.accelerate_command(rank, "127.0.0.1") for rank in range(p.nodes)]


def _ignore_usr1() -> None:
    # The launchers (accelerate, torchrun) have no SIGUSR1 handler and would die of it; the trainer installs its
    # own handler over the inherited "ignore".
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (torchrun starts each worker in a session of its own, so a
    process-group signal would not reach the trainers)."""
    import psutil  # an accelerate dependency

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run_local(p: Plan) -> int:
    """Run the launchers, stream their output (prefixed by machine rank when there are several), return the code.

    SIGUSR1/SIGTERM sent to `flux2-lora launch` reach every training process as SIGUSR1 (checkpoint and stop);
    the launch then exits 75 like the trainer, so a wrapper can relaunch it and resume.
    """
    env = {**os.environ, **p.env}
    procs: list[subprocess.Popen[str]] = []
    stopping: list[str] = []

    def forward(signum: int, frame: Any) -> None:
        stopping.append(signal.Signals(signum).name)
        print(f"flux2-lora launch: received {signal.Signals(signum).name}; asking the trainers to checkpoint and stop")
        for proc in procs:
            _signal_tree(proc.pid, signal.SIGUSR1)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    threads = []
    try:
        for rank, cmd in enumerate(local_commands(p)):
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                start_new_session=True, preexec_fn=_ignore_usr1,
            )  # fmt: skip
            procs.append(proc)
            prefix = f"[node {rank}] " if p.nodes > 1 else ""
            t = threading.Thread(target=_pump, args=(proc, prefix), daemon=True)
            t.start()
            threads.append(t)
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait()
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    # accelerate launch reports a failed worker as exit 1; after a stop we asked for, that is the requeue case.
    if EXIT_REQUEUE in bad or stopping:
        return EXIT_REQUEUE
    return bad[0]


def _pump(proc: subprocess.Popen[str], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def slurm_command(files: dict[str, Path]) -> list[str]:
    return ["sbatch", "--parsable", str(files["sbatch"])]


def submit_slurm(cmd: list[str]) -> int:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CliError(f"sbatch: {(res.stderr or res.stdout).strip() or f'exit {res.returncode}'}")
    job = res.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job}")
    return 0


def ray_command(p: Plan) -> list[str]:
    m = p.manifest
    runtime: dict[str, Any] = {"env_vars": p.env}
    if m.ray.working_dir:
        runtime["working_dir"] = m.ray.working_dir
    cmd = ["ray", "job", "submit", "--address", m.ray.address, "--runtime-env-json", json.dumps(runtime)]
    gpus = m.ray.entrypoint_num_gpus if m.ray.entrypoint_num_gpus is not None else m.resources.gpus_per_node
    cpus = m.ray.entrypoint_num_cpus if m.ray.entrypoint_num_cpus is not None else m.resources.cpus_per_task
    if gpus:
        cmd += ["--entrypoint-num-gpus", _value(gpus)]
    if cpus:
        cmd += ["--entrypoint-num-cpus", _value(cpus)]
    if m.ray.no_wait:
        cmd.append("--no-wait")
    # On the cluster the interpreter is the job's own `python`, not this machine's path.
    launch = p.tune_command("auto") if m.command == "tune" else p.accelerate_command()
    launch[0] = m.python or "python"
    return [*cmd, "--", *launch]


# ----------------------------------------------------------------------------------------------- CLI
def cmd_launch(argv: list[str]) -> int:
    p = command_parser(
        "launch",
        "Start a recipe as the MANIFEST says: `accelerate launch` here (local), an sbatch job (slurm) or a Ray job "
        "(ray). `command: tune` runs a sweep (Slurm: a Ray cluster in the job). Files go to OUTPUT/launch/. "
        "Examples ship with the package: " + ", ".join(example_manifests()) + " (`flux2-lora launch NAME --dry-run`).",
    )
    p.add_argument(
        "manifest", type=str, help="Manifest YAML, or the name of an example (fields: see the examples and the README)."
    )
    p.add_argument("--output", type=str | None, default=None, help="Use this output folder instead of the manifest's.")
    p.add_argument("--dry-run", action="store_true", help="Write the files and print the commands; run nothing.")
    a = _parse(p, argv)
    path = manifest_path(a.manifest)
    if path != Path(a.manifest).expanduser():
        print(f"example manifest: {path}")
    m = load_manifest(path, output=a.output or None)
    pl = plan(m)
    try:
        files = write_files(pl)
    except OSError as e:
        raise CliError(f"output: cannot write {pl.launch_dir} ({e.strerror or e})") from None
    for name, path in files.items():
        print(f"wrote {name}: {path}")
    if m.command == "tune":
        print(f"sweep on {pl.nodes} node(s), one process per trial, backend {m.backend}")
    else:
        print(
            f"{pl.nodes} node(s) x {pl.per_node} process(es) = {pl.world_size}, strategy {m.strategy}, "
            f"mixed precision {pl.mixed_precision}, backend {m.backend}"
        )
    if m.backend == "local" and m.command == "tune":
        _need(pl.nodes == 1, "resources.nodes", "a local sweep runs on this machine; use slurm or ray for more nodes")
        cmd = pl.tune_command()
        print("run: " + _show(cmd, pl.env))
        return 0 if a.dry_run else subprocess.call(cmd, env={**os.environ, **pl.env})
    if m.backend == "local":
        cmds = local_commands(pl)
        for cmd in cmds:
            print("run: " + _show(cmd, pl.env))
        if a.dry_run:
            return 0
        if pl.nodes > 1:
            print(f"local: {pl.nodes} machine ranks on this host (a rendezvous test, not a multi-node speed-up)")
        return run_local(pl)
    if m.backend == "slurm":
        if m.command == "tune":
            runs = shlex.join(pl.tune_command("$HEAD_IP:$RAY_PORT"))
            print(f"the job starts Ray on {pl.nodes} node(s) and runs: {runs}")
        else:
            print(
                f"each node runs: {shlex.join(pl.accelerate_command(0, '$MAIN_ADDR'))}".replace(
                    "--machine_rank 0", "--machine_rank $SLURM_NODEID"
                )
                if pl.nodes > 1
                else f"the job runs: {shlex.join(pl.accelerate_command())}"
            )
        cmd = slurm_command(files)
        print("run: " + _show(cmd))
        if a.dry_run:
            return 0
        return submit_slurm(cmd)
    cmd = ray_command(pl)
    print("run: " + _show(cmd))
    if a.dry_run:
        return 0
    return subprocess.call(cmd)
