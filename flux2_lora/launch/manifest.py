"""Reading and checking a manifest: the dataclasses that say what one holds, the example manifests shipped with
the package, and the reader that turns the YAML into them. Every mistake is a one-line UsageError naming the
field and the file: the types and shapes in `_Reader`, the ranges and combinations in `_check`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import UsageError
from ..recipe import presets, read_yaml
from ..resources import launch_dir


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


def load_manifest(path: str | Path, output: str | None = None) -> Manifest:
    """Read and check a manifest (`output`: the command line's --output, in place of the manifest's). Every
    mistake raises a one-line UsageError('<field>: <reason>'): the types and shapes here, naming the file; the
    ranges and combinations in _check."""
    path = Path(path)
    try:
        raw = read_yaml(path, "MANIFEST")
    except (TypeError, RecursionError) as e:  # a list as a key; nesting too deep for the YAML parser
        reason = "nested too deeply" if isinstance(e, RecursionError) else f"a key that is a list or mapping: {e}"
        raise UsageError(f"MANIFEST: {path} is not a manifest YAML ({reason})") from None
    except OSError as e:
        raise UsageError(f"MANIFEST: cannot read {path} ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else _kind(raw)
        raise UsageError(f"MANIFEST: {path} must be a YAML mapping of manifest fields (got {got})")
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
        """UsageError('<name>: <reason> (got <what it is>: <value>; <note>) in <manifest>')."""
        if got is _NOTHING:
            what = f" ({note})" if note else ""
        else:
            value = "null" if got is None else f"{_kind(got)}: {_shown(got)}" if kind else _shown(got)
            what = f" (got {value}{'; ' + note if note else ''})"
        raise UsageError(f"{name}: {reason}{what} in {self.path}")

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


def need(cond: bool, name: str, reason: str) -> None:
    if not cond:
        raise UsageError(f"{name}: {reason}")


def _at_most(value: float | None, limit: int, name: str) -> None:
    if value is not None:
        need(value <= limit, name, f"must be at most {limit} (got {value})")


def _check(m: Manifest) -> None:
    """Ranges and combinations of the typed manifest (types: _Reader)."""
    r = m.resources
    need(r.nodes >= 1, "resources.nodes", f"must be at least 1 (got {r.nodes})")
    _at_most(r.nodes, MAX_NODES, "resources.nodes")
    need(r.gpus_per_node >= 0, "resources.gpus_per_node", f"must be 0 or more (got {r.gpus_per_node})")
    _at_most(r.gpus_per_node, MAX_GPUS_PER_NODE, "resources.gpus_per_node")
    if r.processes_per_node is not None:
        need(
            r.processes_per_node >= 1,
            "resources.processes_per_node",
            f"must be at least 1 (got {r.processes_per_node})",
        )
        _at_most(r.processes_per_node, MAX_PROCESSES_PER_NODE, "resources.processes_per_node")
        need(
            r.gpus_per_node == 0 or r.processes_per_node <= r.gpus_per_node,
            "resources.processes_per_node",
            f"{r.processes_per_node} processes on {r.gpus_per_node} GPU(s): at most one process per GPU",
        )
    if r.cpus_per_task is not None:
        need(r.cpus_per_task >= 1, "resources.cpus_per_task", f"must be at least 1 (got {r.cpus_per_task})")
        _at_most(r.cpus_per_task, MAX_CPUS_PER_TASK, "resources.cpus_per_task")
    if r.time is not None:
        need(
            bool(_TIME.fullmatch(r.time)),
            "resources.time",
            f"must be a Slurm time like 24:00:00 or 2-00:00:00 (got {r.time})",
        )
    if r.mem is not None:
        need(bool(re.fullmatch(r"\d+[KMGT]?", r.mem)), "resources.mem", f"must be like 512G or 0 (got {r.mem})")
    need(1 <= m.main_port <= 65535, "main_port", f"must be a port number (got {m.main_port})")
    if m.offload != "none":
        need(m.strategy in ("zero2", "zero3"), "offload", f"only zero2 and zero3 offload (strategy is {m.strategy})")
    if m.offload == "all":
        need(
            m.strategy == "zero3",
            "offload",
            "`all` (parameters too) needs strategy zero3; zero2 offloads the optimizer",
        )
    if m.backend == "ray" and m.command == "train":
        need(r.nodes == 1, "resources.nodes", "a training run as a Ray job runs on one node (a sweep may use many)")
    if m.command == "tune":
        need(m.strategy == "ddp", "strategy", "a sweep runs each trial as one process; leave strategy at ddp")
        for flag in m.tune_args:
            need(
                flag.split("=")[0] not in ("--output", "--ray-address", "--resume"),
                "tune_args",
                f"{flag} is set by the launcher (output, the job's Ray cluster, resume)",
            )
    else:
        need(not m.tune_args, "tune_args", "only with command: tune")
    need(
        not (m.slurm.script == "single-node" and r.nodes > 1),
        "slurm.script",
        f"single-node cannot run resources.nodes={r.nodes}; use multi-node or auto",
    )
    need(m.slurm.signal_seconds >= 0, "slurm.signal_seconds", f"must be 0 or more (got {m.slurm.signal_seconds})")
    _at_most(m.slurm.signal_seconds, MAX_SIGNAL_SECONDS, "slurm.signal_seconds")
    need(m.slurm.max_restarts >= 0, "slurm.max_restarts", f"must be 0 or more (got {m.slurm.max_restarts})")
    _at_most(m.slurm.max_restarts, MAX_RESTARTS, "slurm.max_restarts")
    for i, arg in enumerate(m.slurm.sbatch_args):
        need(arg.startswith("-"), f"slurm.sbatch_args[{i}]", f"must be an sbatch option like --qos=high (got {arg})")
    for key, limit in (("entrypoint_num_gpus", MAX_GPUS_PER_NODE), ("entrypoint_num_cpus", MAX_CPUS_PER_TASK)):
        value = getattr(m.ray, key)
        if value is not None:
            need(value >= 0, f"ray.{key}", f"must be 0 or more (got {value})")
            _at_most(value, limit, f"ray.{key}")
    if m.backend == "local":
        need(
            r.nodes <= MAX_LOCAL_NODES,
            "resources.nodes",
            f"the local backend starts one launcher per machine rank on this host (a rendezvous test): at most "
            f"{MAX_LOCAL_NODES} (got {r.nodes}); use slurm or ray for real nodes",
        )
    for key in m.env:
        need(bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)), f"env.{key}", "not a valid environment variable name")
    for key in m.overrides:
        need(
            bool(re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", key)),
            f"overrides.{key}",
            "must be a dotted recipe field like training.max_steps",
        )
        need(
            key not in ("output.dir",) and not key.startswith("distributed."),
            f"overrides.{key}",
            "set by the manifest itself (output, strategy, shard_base, offload)",
        )
