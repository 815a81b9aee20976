"""`flux2-lora` command line (jsonargparse). The recipe dataclasses are the `train` arguments.

flux2-lora train --preset tiny                       # the embedded default: tiny FLUX.2 + sample data
flux2-lora train --preset character --dataset D --output O [--model.dtype bf16 ...]
flux2-lora train --config my.yaml --resume latest
flux2-lora model make-tiny --out DIR [--family dev|klein]
flux2-lora data make-sample --out DIR
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from .config import Recipe, RecipeError, check_recipe_file, validate
from .resources import recipes_dir

# Short forms users know from other trainers -> dotted recipe fields.
SHORT_FORMS = {
    "--dataset": "--data.dataset",
    "--output": "--output.dir",
    "--model": "--model.name_or_path",
    "--steps": "--training.max_steps",
    "--lr": "--training.lr",
    "--batch-size": "--training.batch_size",
    "--rank": "--lora.rank",
    "--dtype": "--model.dtype",
    "--trigger": "--data.trigger",
    "--init-lora": "--lora.init_from",
}
FLAG_FORMS = {"--force-cpu-loading": ["--model.force_cpu_loading", "true"]}

USAGE = """usage: flux2-lora COMMAND [ARGS]

commands:
  train              train a FLUX.2 LoRA from a recipe (--preset NAME | --config FILE, dotted overrides)
  data validate      report every problem in a dataset or cache folder (--fix OUT writes a cleaned copy)
  data analyze       resolution, aspect and caption statistics, and a histogram PNG
  data augment       caption-preserving flips, crops and colour jitter for small datasets
  data shard         write webdataset tar shards of a validated folder
  data cache         run the text encoder and VAE once into cached shards that `train --dataset` reads
  data make-sample   write the built-in sample dataset (coloured shapes with captions)
  model make-tiny    write a tiny random FLUX.2 pipeline (diffusers layout) for tests and trials
  tune               search LoRA hyperparameters: Ray Tune trials in parallel, Optuna proposes, ASHA prunes
  system info        versions (torch, CUDA, libraries), optional libraries and what they enable, GPUs, CPU, RAM
  system gpu         live memory per GPU (--watch SECONDS refreshes until Ctrl-C)
  system presets     the presets with their key values (model, resolution, rank, lr, steps, ...)
  system optimize    GPU memory a recipe needs, part by part, and what to change so it fits
  launch MANIFEST    run a recipe as a manifest says: accelerate launch here, an sbatch job or a Ray job (--dry-run)
  export             write a LoRA as diffusers, comfyui or kohya (--format), or fuse it into its base model (--merge)
  lora inspect FILE  format, rank, alpha, targets, metadata and size of a LoRA file, and which model it fits
  eval compare       grid of checkpoints x prompts x seeds (same noise per column) and an HTML page
  eval assess-quality  CLIP score, diversity, overfitting and validation loss of checkpoints (JSON + table)
  eval test-prompts  a prompt suite (recontext, style, attribute, composition, trigger leakage) on one LoRA
  eval select-best   rank checkpoints (CKPT... or --run OUTPUT) by a weighted composite score, name the best
  ui                 the web app (Gradio) on http://127.0.0.1:7860: dataset, training, evaluation, optimization tabs

`flux2-lora COMMAND --help` shows each command's arguments.
"""


class CliError(Exception):
    """A command-line mistake: printed as one line, exit code 2."""


def presets() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _expand_argv(argv: list[str]) -> list[str]:
    """Map short forms and move --preset to the front (as --config) so later flags override it."""
    out: list[str] = []
    front: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, val = arg.partition("=")
        if key == "--preset":
            if not eq:
                if i + 1 >= len(argv):
                    raise CliError("--preset: needs a name (" + ", ".join(presets()) + ")")
                val = argv[i + 1]
                i += 1
            path = recipes_dir() / f"{val}.yaml"
            if not path.exists():
                raise CliError(f"--preset: unknown preset {val!r} (available: {', '.join(presets())})")
            check_recipe_file(path)
            front += ["--config", str(path)]
        elif key == "--config":
            if not eq:
                if i + 1 >= len(argv):
                    raise CliError("--config: needs a recipe YAML file")
                val = argv[i + 1]
                i += 1
            path = Path(val).expanduser()
            if not path.is_file():
                raise CliError(f"--config: {val} does not exist")
            check_recipe_file(path)  # duplicate keys, groups that are not mappings: one line before parsing
            out += ["--config", val]
        elif key in SHORT_FORMS:
            out.append(SHORT_FORMS[key] + (eq + val if eq else ""))
        elif key in FLAG_FORMS:
            out += FLAG_FORMS[key]
        else:
            out.append(arg)
        i += 1
    return front + out


def read_yaml(path: Path, field: str) -> Any:
    """A user's YAML file (manifest, search space, prompt suite); a missing or malformed one is a one-line
    CliError naming `field`."""
    from .config import load_yaml

    if not path.is_file():
        raise CliError(f"{field}: {path} does not exist")
    try:
        return load_yaml(path.read_text(), str(path))
    except UnicodeDecodeError as e:
        raise CliError(f"{field}: {path} is not valid YAML ({e})") from None
    except ValueError as e:
        raise CliError(f"{field}: {e}") from None


def train_parser() -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(
        prog="flux2-lora train",
        description="Train a FLUX.2 LoRA. Presets: " + ", ".join(presets()) + ". Every field: recipes/base.yaml.",
        exit_on_error=False,
        default_env=False,
    )
    p.add_argument("--config", action=ActionConfigFile, help="Recipe YAML file (or --preset NAME).")
    p.add_class_arguments(Recipe, as_group=False)
    p.add_argument("--resume", type=str | None, default=None, help="`latest` or a checkpoints/step-N folder.")
    return p


def _condense(err: BaseException) -> str:
    """One line from a jsonargparse error: `field: what is expected (got VALUE)`."""
    text = str(err)
    m = re.search(r'[Kk]ey "([^"]+)"', text)
    got = re.search(r"(?:Got|Given) value:\s*(.*)", text)
    lit = re.search(r"Literal\[([^\]]*)\]", text)
    cls = re.search(r"Expected a <class '(\w+)'>", text)
    if m:
        value = got.group(1).strip() if got else ""
        if lit:
            reason = "must be one of " + lit.group(1).replace("'", "")
        elif cls and cls.group(1) in ("float", "int") and value.lower().lstrip("+-.") in ("nan", "inf", "infinity"):
            reason = "must be a finite number"
        elif cls:
            reason = f"must be {'an' if cls.group(1)[0] in 'aeiou' else 'a'} {cls.group(1)}"
        else:
            # The reason is the text after the key, on its line or the next ones, without the "Got value" part.
            rest = re.sub(r'.*?[Kk]ey "[^"]+"\s*:?', "", text, count=1, flags=re.S)
            rest = re.sub(r"Got value:.*", "", rest, flags=re.S)
            reason = " ".join(ln.strip() for ln in rest.splitlines() if ln.strip()).rstrip(".") or "invalid value"
            reason = reason[0].lower() + reason[1:]
        return f"{m.group(1)}: {reason}" + (f" (got {got.group(1).strip()})" if got else "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def parse_train(argv: list[str], need_data: bool = True) -> tuple[Recipe, str | None]:
    parser = train_parser()
    ns = _parse(parser, _expand_argv(argv))
    resume = ns.pop("resume", None)
    ns.pop("config", None)
    ns.pop("__path__", None)
    recipe = parser.instantiate_classes(ns)
    recipe = Recipe(
        **{
            k: recipe[k]
            for k in (
                "model",
                "lora",
                "data",
                "training",
                "validation",
                "output",
                "logging",
                "callbacks",
                "distributed",
            )
        }
    )
    validate(recipe, need_data)
    return recipe, resume


def cmd_train(argv: list[str]) -> int:
    recipe, resume = parse_train(argv)
    from .train import Trainer, run

    trainer = Trainer(recipe, resume)
    final = run(trainer)
    return 0 if final is not None else trainer.signals.exit_code


def command_parser(name: str, description: str) -> Any:
    """The jsonargparse parser every `flux2-lora` subcommand starts from (errors raise, no env defaults)."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=f"flux2-lora {name}", exit_on_error=False, default_env=False, description=description)


def _parse(parser: Any, argv: list[str]) -> Any:
    """parse_args with jsonargparse errors turned into one-line CliErrors (--help still exits normally)."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise
    except Exception as e:  # jsonargparse.ArgumentError and the errors it wraps
        raise CliError(_condense(e)) from None


def cmd_model(argv: list[str]) -> int:
    if not argv or argv[0] != "make-tiny":
        raise CliError("model: expected `model make-tiny --out DIR [--family dev|klein]`")
    p = command_parser("model make-tiny", "Write a tiny random FLUX.2 pipeline.")
    p.add_argument("--out", type=str, required=True, help="Folder to write (diffusers save_pretrained layout).")
    p.add_argument("--family", type=str, default="dev", choices=["dev", "klein"], help="FLUX.2 family.")
    p.add_argument("--seed", type=int, default=0, help="Weight seed.")
    a = _parse(p, argv[1:])
    from .model import make_tiny_pipeline

    print(make_tiny_pipeline(a.out, family=a.family, seed=a.seed))
    return 0


def cmd_data(argv: list[str]) -> int:
    sub, rest = (argv[0], argv[1:]) if argv else ("", [])
    if sub == "validate":
        from .data.validate import cmd_validate

        return cmd_validate(rest)
    if sub == "analyze":
        from .data.analyze import cmd_analyze

        return cmd_analyze(rest)
    if sub == "augment":
        from .data.augment import cmd_augment

        return cmd_augment(rest)
    if sub == "shard":
        return _data_shard(rest)
    if sub == "cache":
        return _data_cache(rest)
    if sub == "make-sample":
        return _data_make_sample(rest)
    raise CliError(
        "data: expected one of validate, analyze, augment, shard, cache, make-sample (see `flux2-lora --help`)"
    )


def _data_make_sample(argv: list[str]) -> int:
    p = command_parser("data make-sample", "Write the sample dataset.")
    p.add_argument("--out", type=str, required=True, help="Folder to write.")
    p.add_argument("--count", type=int, default=12, help="Number of images.")
    a = _parse(p, argv)
    from .data.sample import make_sample_dataset

    print(make_sample_dataset(a.out, count=a.count))
    return 0


def _data_shard(argv: list[str]) -> int:
    p = command_parser("data shard", "Write webdataset tar shards of a dataset folder.")
    p.add_argument("--dataset", type=str, required=True, help="Image folder (validated first).")
    p.add_argument("--output", type=str, required=True, help="Folder for data-NNNNNN.tar shards.")
    p.add_argument("--shard-size", type=int, default=1000, help="Samples per shard.")
    p.add_argument("--instance-prompt", type=str | None, default=None, help="Caption for images without one.")
    p.add_argument("--min-resolution", type=int, default=256, help="Smallest short side accepted by validation.")
    a = _parse(p, argv)
    from .data.folder import scan_folder
    from .data.shards import write_raw_shards
    from .data.validate import format_report, validate_dataset

    report = validate_dataset(Path(a.dataset), min_resolution=a.min_resolution, instance_prompt=a.instance_prompt)
    if report.has_errors:
        print(format_report(report))
        raise CliError(f"--dataset: {a.dataset} has errors (listed above); fix them or run `data validate --fix OUT`")
    items = scan_folder(a.dataset, a.instance_prompt)
    paths = write_raw_shards(items, Path(a.dataset), Path(a.output), a.shard_size)
    print(f"wrote {len(items)} samples in {len(paths)} shards to {a.output}")
    return 0


def _data_cache(argv: list[str]) -> int:
    """`data cache --shards S|--dataset D --output C [--shard-size N] [recipe flags]`: the cache stage alone.

    Training reads the cache folder as `--dataset C`. Write at least (processes x workers) shards so that every
    process and worker gets some (`--shard-size`, default 1000 samples per shard)."""
    out, rest, i, shard_size = None, [], 0, 1000
    while i < len(argv):
        key, eq, val = argv[i].partition("=")
        if key in ("--output", "--shards", "--shard-size"):
            if not eq:
                if i + 1 >= len(argv):
                    raise CliError(f"{key}: needs a value")
                val, i = argv[i + 1], i + 1
            if key == "--output":
                out = val
            elif key == "--shard-size":
                if not val.isdigit() or int(val) < 1:
                    raise CliError(f"--shard-size: must be a whole number >= 1 (got {val})")
                shard_size = int(val)
            else:
                rest += ["--data.dataset", val]
        else:
            rest.append(argv[i])
        i += 1
    if out is None:
        raise CliError("--output: required (the cache folder to write)")
    recipe, _ = parse_train(rest)
    import torch

    from .data.cache import build_cache, dataset_source, settings_for
    from .model import encoder_dtype, resolve_model

    src = resolve_model(recipe.model)
    source, _ = dataset_source(recipe.data.dataset or "", recipe.data.instance_prompt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    index = build_cache(
        Path(out), settings_for(src, recipe), source, device, encoder_dtype(recipe.model.dtype, device),
        shard_size=shard_size, force_cpu_loading=recipe.model.force_cpu_loading,
        text_encoder_device=recipe.model.text_encoder_device,
    )  # fmt: skip
    print(
        f"cache {index.root}: {index.num_train} training samples in {len(index.train)} shards, {len(index.val)} val shard(s)"
    )
    print(f"train from it with: flux2-lora train --dataset {index.root} [same recipe flags]")
    return 0


def cmd_system(argv: list[str]) -> int:
    from .system import cmd_system as run

    return run(argv)


def cmd_eval(argv: list[str]) -> int:
    from .evaluate import EvalError
    from .evaluate.commands import cmd_eval as run

    try:
        return run(argv)
    except EvalError as e:
        raise CliError(str(e)) from None


def cmd_launch(argv: list[str]) -> int:
    from .launch import cmd_launch as run

    return run(argv)


def cmd_tune(argv: list[str]) -> int:
    from .tune import cmd_tune as run

    return run(argv)


COMMANDS = {
    "train": cmd_train,
    "model": cmd_model,
    "data": cmd_data,
    "system": cmd_system,
    "launch": cmd_launch,
    "tune": cmd_tune,
}
COMMANDS["eval"] = cmd_eval


def cmd_export(argv: list[str]) -> int:
    from .interop import cmd_export as run

    return run(argv)


def cmd_lora(argv: list[str]) -> int:
    from .interop import cmd_lora as run

    return run(argv)


COMMANDS["export"] = cmd_export
COMMANDS["lora"] = cmd_lora


def cmd_ui(argv: list[str]) -> int:
    from .ui.app import cmd_ui as run

    return run(argv)


COMMANDS["ui"] = cmd_ui


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
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"flux2-lora: error: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from .callbacks import TrainingError
    from .checkpoint import CheckpointError
    from .data.folder import DataError
    from .model import ModelError

    try:
        return COMMANDS[cmd](rest)
    except (CliError, RecipeError) as e:
        # The same argv gives the same mistake on every process of a launch: the first process says it once.
        if os.environ.get("RANK", "0") == "0":
            print(f"flux2-lora: error: {e}", file=sys.stderr)
        return 2
    except (DataError, ModelError, CheckpointError) as e:  # these can differ between processes: each says its own
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
