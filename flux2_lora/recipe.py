"""Loading a recipe: presets, `--preset` / `--config`, dotted overrides and short forms from argv, user YAML files,
and jsonargparse's errors turned into one line.

`config.py` says what a recipe is (the dataclasses and their checks); this module says how one is read. Every
part of the product that takes a recipe (train, tune, launch, eval, system, the web app) reads it here, so a
mistake reads the same wherever it is made.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .config import GROUPS, Recipe, validate
from .errors import RecipeError, UsageError
from .references import check_prompt_entries
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


def load_yaml(text: str, where: str) -> Any:
    """YAML parsed safely, refusing a key given twice in one mapping (`where`: the file, for the message).

    PyYAML keeps the last of two equal keys without a word; a recipe or manifest with `lr` twice is a mistake
    to point out, not a value to guess. Raises ValueError('<where> line N: ...')."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, (list, dict, set)):
                raise ValueError(f"{where} line {line}: a key must be a plain name, not a {type(key).__name__}")
            if key in seen:
                raise ValueError(f"{where} line {line}: duplicate key {key!r} (first at line {seen[key]})")
            seen[key] = line
        return loader.construct_mapping(node)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a recipe or manifest") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{where}{at} is not valid YAML ({first})") from None


def check_groups(values: dict[str, Any], where: str = "") -> None:
    """Every recipe group (`model`, `training`, ...) in `values` is a mapping of its fields (or empty).

    A group given as a list or a number would otherwise be dropped or kept as a bare value, and the run would
    train on the defaults without a word."""
    for name, value in values.items():
        if name in GROUPS and value is not None and not isinstance(value, dict) and not dataclasses.is_dataclass(value):
            raise RecipeError(
                f"{name}: must be a mapping of {name}.* fields (e.g. `{name}:` then indented `key: value` lines), "
                f"got {value!r}{where}"
            )


def check_recipe_file(path: Path) -> None:
    """A recipe YAML (`--config`/`--preset`) is readable, a mapping, has no key twice and every group is a mapping."""
    try:
        data = load_yaml(path.read_text(), str(path))
    except OSError as e:
        raise RecipeError(f"--config: {path} cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"--config: {path} is not a text file") from None
    except ValueError as e:
        raise RecipeError(f"--config: {e}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise RecipeError(f"--config: {path} must be a mapping of recipe groups (model:, data:, training:, ...)")
    check_groups(data, f" in {path}")
    check_prompt_entries(data, f" in {path}")


def presets() -> list[str]:
    """The names `--preset NAME` accepts: every recipes/*.yaml (or $FLUX2_LORA_RECIPES/*.yaml)."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The recipe file of a preset, checked; an unknown name is a UsageError listing the presets."""
    path = recipes_dir() / f"{name}.yaml"
    if not path.exists():
        raise UsageError(f"--preset: unknown preset {name!r} (available: {', '.join(presets())})")
    check_recipe_file(path)
    return path


def expand_argv(argv: list[str], own: Collection[str] = ()) -> list[str]:
    """Map short forms and move --preset to the front (as --config) so later flags override it.

    `own`: flags the command declares itself, left as they are even where a short form has the same name."""
    out: list[str] = []
    front: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, val = arg.partition("=")
        if key in own:
            out.append(arg)
        elif key == "--preset":
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError("--preset: needs a name (" + ", ".join(presets()) + ")")
                val = argv[i + 1]
                i += 1
            front += ["--config", str(preset_path(val))]
        elif key == "--config":
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError("--config: needs a recipe YAML file")
                val = argv[i + 1]
                i += 1
            path = Path(val).expanduser()
            if not path.is_file():
                raise UsageError(f"--config: {val} does not exist")
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


def split_flags(argv: list[str], nargs: Mapping[str, int | str | None]) -> tuple[list[str], list[str]]:
    """(a command's own flags, the recipe flags) of argv, for commands that pass recipe flags on (tune, data cache).

    `nargs`: each own flag with how many values it takes, as argparse says it (0: none, None: one, "?": one if
    given, "+"/"*": those up to the next flag). `-h`/`--help` are always the command's own."""
    ours: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        key, eq, _ = argv[i].partition("=")
        if key not in nargs and key not in ("-h", "--help"):
            rest.append(argv[i])
            i += 1
            continue
        ours.append(argv[i])
        i += 1
        n = nargs.get(key, 0)
        if eq or n == 0:
            continue
        if n is None and (i >= len(argv) or argv[i].startswith("--")):
            raise UsageError(f"{key}: needs a value")
        while i < len(argv) and not argv[i].startswith("--"):
            ours.append(argv[i])
            i += 1
            if n in (None, "?"):
                break
    return ours, rest


def read_yaml(path: Path, field: str) -> Any:
    """A user's YAML file (manifest, search space, prompt suite); a missing or malformed one is a one-line
    UsageError naming `field`."""
    if not path.is_file():
        raise UsageError(f"{field}: {path} does not exist")
    try:
        return load_yaml(path.read_text(), str(path))
    except UnicodeDecodeError as e:
        raise UsageError(f"{field}: {path} is not valid YAML ({e})") from None
    except ValueError as e:
        raise UsageError(f"{field}: {e}") from None


def new_parser(prog: str, description: str) -> Any:
    """A jsonargparse parser whose errors raise (for `parse_args`) and that reads no environment defaults."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=prog, exit_on_error=False, default_env=False, description=description)


def add_recipe_arguments(parser: Any) -> None:
    """`--config FILE` and every recipe field as a dotted flag (`--training.lr`)."""
    from jsonargparse import ActionConfigFile

    parser.add_argument("--config", action=ActionConfigFile, help="Recipe YAML file (or --preset NAME).")
    parser.add_class_arguments(Recipe, as_group=False)


def recipe_parser() -> Any:
    """The `train` parser: a recipe and `--resume`."""
    p = new_parser(
        "flux2-lora train",
        "Train a FLUX.2 LoRA. Presets: " + ", ".join(presets()) + ". Every field: recipes/base.yaml.",
    )
    add_recipe_arguments(p)
    p.add_argument("--resume", type=str | None, default=None, help="`latest` or a checkpoints/step-N folder.")
    return p


def condense(err: BaseException) -> str:
    """One line from a jsonargparse error: `field: what is expected (got VALUE)`."""
    text = str(err)
    m = re.search(r'[Kk]ey "([^"]+)"', text)
    got = re.search(r"(?:Got|Given) value:\s*(.*)", text)
    lit = re.search(r"Literal\[([^\]]*)\]", text)
    cls = re.search(r"Expected a <class '(\w+)'>", text)
    if m:
        value = got.group(1).strip() if got else ""
        if lit and cls and cls.group(1) in ("float", "int"):  # a Union such as Literal["none", "auto"] | float
            number = "a finite number" if cls.group(1) == "float" else "an integer"
            reason = "must be one of " + lit.group(1).replace("'", "") + " or " + number
        elif lit:
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


def parse_args(parser: Any, argv: list[str]) -> Any:
    """parse_args with jsonargparse errors turned into one-line UsageErrors (--help still exits normally)."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        raise
    except Exception as e:  # jsonargparse.ArgumentError and the errors it wraps
        raise UsageError(condense(e)) from None


def recipe_from(parser: Any, ns: Any, need_data: bool = True) -> Recipe:
    """The validated Recipe in a namespace parsed by a parser with `add_recipe_arguments`."""
    ns.pop("config", None)
    ns.pop("__path__", None)
    built = parser.instantiate_classes(ns)
    recipe = Recipe(**{k: built[k] for k in GROUPS})
    validate(recipe, need_data)
    return recipe


def parse_recipe(argv: list[str], need_data: bool = True) -> tuple[Recipe, str | None]:
    """A validated recipe (and `--resume`) from `train`-style argv: `--preset`/`--config`, dotted overrides, short
    forms. Mistakes raise one-line UsageError or RecipeError."""
    parser = recipe_parser()
    ns = parse_args(parser, expand_argv(argv))
    resume = ns.pop("resume", None)
    return recipe_from(parser, ns, need_data), resume
