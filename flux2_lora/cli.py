"""`flux2-lora`: the one table of commands, and what argv and exit codes mean. Nothing below this layer imports it.

Each command is a typed function in `flux2_lora/commands/` whose signature is its flags and whose docstring is its
help (`commands/args.py` builds the parser); it calls the domain modules' plain functions and prints. A new command
is one function there and one line in COMMANDS here.

flux2-lora train --preset tiny                       # the embedded default: tiny FLUX.2 + sample data
flux2-lora train --preset character --dataset D --output O [--model.dtype bf16 ...]
flux2-lora train --config my.yaml --resume latest
flux2-lora model make-tiny --out DIR [--family dev|klein]
flux2-lora data make-sample --out DIR
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import NamedTuple

from .errors import CheckpointError, DataError, EvalError, ModelError, RecipeError, TrainingError, UsageError
from .recipe import expand_argv as _expand_argv
from .recipe import parse_recipe as parse_train
from .recipe import presets, read_yaml

CliError = UsageError  # the names tests and scripts written against earlier versions import from here
__all__ = ["COMMANDS", "CliError", "_expand_argv", "dispatch", "main", "parse_train", "presets", "read_yaml"]


class Command(NamedTuple):
    target: str  # "module:function" under flux2_lora.commands
    summary: str
    shown: str = ""  # the name as `--help` shows it, when it takes a positional (`launch MANIFEST`)


COMMANDS: dict[str, Command] = {
    "train": Command("train:train", "train a FLUX.2 LoRA from a recipe (--preset NAME | --config FILE, dotted overrides)"),
    "data validate": Command("data:validate", "report every problem in a dataset or cache folder (--fix OUT writes a cleaned copy)"),
    "data analyze": Command("data:analyze", "resolution, aspect and caption statistics, and a histogram PNG"),
    "data augment": Command("data:augment", "caption-preserving flips, crops and colour jitter for small datasets"),
    "data shard": Command("data:shard", "write webdataset tar shards of a validated folder"),
    "data cache": Command("data:cache", "run the text encoder and VAE once into cached shards that `train --dataset` reads"),
    "data make-sample": Command("data:make_sample", "write the built-in sample dataset (coloured shapes with captions)"),
    "model make-tiny": Command("train:make_tiny", "write a tiny random FLUX.2 pipeline (diffusers layout) for tests and trials"),
    "tune": Command("cluster:tune", "search LoRA hyperparameters: Ray Tune trials in parallel, Optuna proposes, ASHA prunes"),
    "system info": Command("system:info", "versions (torch, CUDA, libraries), optional libraries and what they enable, GPUs, CPU, RAM"),
    "system gpu": Command("system:gpu", "live memory per GPU (--watch SECONDS refreshes until Ctrl-C)"),
    "system presets": Command("system:presets", "the presets with their key values (model, resolution, rank, lr, steps, ...)"),
    "system optimize": Command("system:optimize", "GPU memory a recipe needs, part by part, and what to change so it fits"),
    "launch": Command("cluster:launch", "run a recipe as a manifest says: accelerate launch here, an sbatch job or a Ray job (--dry-run)", "launch MANIFEST"),
    "export": Command("interop:export", "write a LoRA as diffusers, comfyui or kohya (--format), or fuse it into its base model (--merge)"),
    "lora inspect": Command("interop:inspect", "format, rank, alpha, targets, metadata and size of a LoRA file, and which model it fits", "lora inspect FILE"),
    "eval compare": Command("eval:compare", "grid of checkpoints x prompts x seeds (same noise per column) and an HTML page"),
    "eval assess-quality": Command("eval:assess_quality", "CLIP score, diversity, overfitting and validation loss of checkpoints (JSON + table)"),
    "eval test-prompts": Command("eval:test_prompts", "a prompt suite (recontext, style, attribute, composition, trigger leakage) on one LoRA"),
    "eval select-best": Command("eval:select_best", "rank checkpoints (CKPT... or --run OUTPUT) by a weighted composite score, name the best"),
    "ui": Command("ui:ui", "the web app (Gradio) on http://127.0.0.1:7860: dataset, training, evaluation, optimization tabs"),
}  # fmt: skip

# What a group name alone (or with an unknown subcommand) says; the default lists the group's subcommands.
GROUP_HINTS = {
    "model": "model: expected `model make-tiny --out DIR [--family dev|klein]`",
    "lora": "lora: expected `lora inspect FILE [--model M] [--json]`",
}

USAGE = (
    "usage: flux2-lora COMMAND [ARGS]\n\ncommands:\n"
    + "".join(f"  {(c.shown or name).ljust(17)}  {c.summary}\n" for name, c in COMMANDS.items())
    + "\n`flux2-lora COMMAND --help` shows each command's arguments.\n"
)


def _group_error(group: str, sub: str) -> UsageError:
    if group in GROUP_HINTS:
        return UsageError(GROUP_HINTS[group])
    subs = [name.split(" ", 1)[1] for name in COMMANDS if name.startswith(group + " ")]
    if group == "system":
        from .commands.system import HELP_HINT

        what = f"unknown subcommand {sub!r}" if sub else "missing subcommand"
        return UsageError(f"system: {what}; expected one of {', '.join(subs)} ({HELP_HINT})")
    return UsageError(f"{group}: expected one of {', '.join(subs)} (see `flux2-lora --help`)")


def dispatch(argv: list[str]) -> int:
    """Find the command argv names, build its parser from its function and run it; the function's result is the
    exit code."""
    from .commands.args import run

    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        sub = rest[0] if rest else ""
        if f"{cmd} {sub}" in COMMANDS:
            cmd, rest = f"{cmd} {sub}", rest[1:]
        elif cmd == "system" and sub in ("-h", "--help"):
            from .commands.system import SYSTEM_USAGE

            print(SYSTEM_USAGE)
            return 0
        else:
            raise _group_error(cmd, sub)
    module, _, name = COMMANDS[cmd].target.partition(":")
    fn = getattr(importlib.import_module(f".commands.{module}", __package__), name)
    return run(fn, f"flux2-lora {cmd}", rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Import-time notices of torchao 0.18 under torch 2.14 (Enum pytree registration; diffusers' torchao tensor
    # lookup) say nothing about the user's run: keep them out of every command's output.
    for name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    groups = {name.split(" ", 1)[0] for name in COMMANDS}
    if argv[0] not in groups:
        print(f"flux2-lora: error: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return dispatch(argv)
    except (UsageError, RecipeError) as e:
        # The same argv gives the same mistake on every process of a launch: the first process says it once.
        if os.environ.get("RANK", "0") == "0":
            print(f"flux2-lora: error: {e}", file=sys.stderr)
        return 2
    except (DataError, ModelError, CheckpointError, EvalError) as e:  # these can differ between processes
        print(f"flux2-lora: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"flux2-lora: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("flux2-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
