"""A command's parser from its function: the signature gives the flags, the docstring the help.

The rules, so that a new command needs nothing but a typed function with a docstring:

- The docstring's first paragraph is the description; its `Args:` section (`name: text`, continued on indented
  lines) gives each flag's help. Flags several commands of one module share are documented once, in that
  module's `FLAG_HELP` dict.
- Positional-only parameters (before `/`) are positional arguments; the others are `--flag-with-dashes` options
  whose value lands in the parameter of the same name. No default: required.
- `bool` is a yes/no flag given bare or with a value (`--merge`, `--merge false`); `Switch` is one given bare only
  (`--dry-run`, so that it never swallows a positional after it).
- `list[T]` takes one or more values (`--seeds 0 1 2`); with default None the flag can be repeated and the values add
  up (`--prompt a --prompt b`). `Literal[...]` lists the choices.
- A `Recipe` parameter adds `--config`, `--preset` and every recipe field (`--training.lr`, the short forms); the
  function gets the validated recipe. `DraftRecipe` is one whose dataset may be missing (estimates, plans).
- A `RecipeArgs` parameter takes the recipe flags as they were given, unparsed (for commands that pass them on;
  such a command has no positionals, since a positional could not be told from a flag's value).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, NewType, Union

from ..config import Recipe
from ..errors import UsageError
from ..recipe import add_recipe_arguments, expand_argv, new_parser, parse_args, recipe_from, split_flags

SWITCH = "switch"
NO_DATA = "dataset optional"
Switch = Annotated[bool, SWITCH]
DraftRecipe = Annotated[Recipe, NO_DATA]
RecipeArgs = NewType("RecipeArgs", list)


def doc_parts(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """(description, {parameter: help}) from a Google-style docstring."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    head, _, args = doc.partition("\nArgs:\n")
    description = " ".join(head.split("\n\n", 1)[0].split())
    if "{presets}" in description:  # descriptions that list what is installed: the presets, the example manifests
        from ..recipe import presets

        description = description.replace("{presets}", ", ".join(presets()))
    if "{examples}" in description:
        from ..launch import example_manifests

        description = description.replace("{examples}", ", ".join(example_manifests()))
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        m = re.match(r"^\s{2,8}(\w+):\s*(.*)$", line)
        if m and (name is None or len(line) - len(line.lstrip()) <= 4):
            name, text = m.groups()
            helps[name] = text
        elif name is not None and line.strip():
            helps[name] += " " + line.strip()
        elif not line.strip() and name is not None and helps[name]:
            continue
    return description, {k: " ".join(v.split()) for k, v in helps.items()}


def _optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) < len(typing.get_args(hint)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return hint, False


def flag(name: str) -> str:
    """`max_file_mb` -> `--max-file-mb`; a trailing underscore (`json_`, a name Python keeps) is dropped."""
    return "--" + name.rstrip("_").replace("_", "-")


class Spec:
    """What `parser_for` built: the parser and how to turn a parsed namespace into the function's arguments."""

    def __init__(self, fn: Callable[..., Any], prog: str):
        self.fn, self.prog = fn, prog
        self.description, own_help = doc_parts(fn)
        # Flags shared by several commands of a module are documented once there, in its FLAG_HELP.
        self.helps = {**getattr(inspect.getmodule(fn), "FLAG_HELP", {}), **own_help}
        self.hints = typing.get_type_hints(fn, include_extras=True)
        self.params = list(inspect.signature(fn).parameters.values())
        self.recipe: inspect.Parameter | None = None
        self.recipe_args: inspect.Parameter | None = None
        self.own: list[str] = []
        self.parser = new_parser(prog, self.description)
        for p in self.params:
            self._add(p)
        positional = [p for p in self.params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
        assert not (positional and self.recipe_args), f"{prog}: recipe flags passed on cannot follow positionals"

    def _add(self, p: inspect.Parameter) -> None:
        hint = self.hints.get(p.name, str)
        base = typing.get_origin(hint) is Annotated and typing.get_args(hint)
        marks = base[1:] if base else ()
        bare = base[0] if base else hint
        if bare is Recipe:
            self.recipe = p
            add_recipe_arguments(self.parser)
            return
        if bare is RecipeArgs:
            self.recipe_args = p
            return
        kind, optional = _optional(bare)
        required = p.default is inspect.Parameter.empty
        kw: dict[str, Any] = {"help": self.helps.get(p.name, "")}
        if not required:
            kw["default"] = p.default
        origin = typing.get_origin(kind)
        if kind is bool:
            kw.update(type=bool, nargs="?", const=True) if SWITCH not in marks else kw.update(action="store_true")
            kw.setdefault("default", False)
        elif origin is list:
            (item,) = typing.get_args(kind)
            kw["type"] = item
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                kw["nargs"] = "+" if required else "*"
            else:
                kw["nargs"] = "+"
                if p.default is None:
                    kw["action"] = "extend"
        elif origin is Literal:
            choices = list(typing.get_args(kind))
            kw.update(type=type(choices[0]) | None if optional else type(choices[0]), choices=choices)
            if optional:
                kw["choices"] = [*choices, None]
        else:
            kw["type"] = kind | None if optional else kind
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            if not required and "nargs" not in kw:
                kw["nargs"] = "?"
            self.parser.add_argument(p.name, **kw)
        else:
            if required:
                kw["required"] = True
            self.own.append(flag(p.name))
            self.parser.add_argument(flag(p.name), dest=p.name, **kw)

    def call(self, argv: list[str]) -> Any:
        """Parse argv and call the function with what it asked for."""
        rest: list[str] = []
        if self.recipe_args is not None:
            argv, rest = self.split(argv)
        if self.recipe is not None:
            argv = expand_argv(argv, own=self.own)
        try:
            ns = parse_args(self.parser, argv)
        except UsageError as e:
            text = str(e)
            m = re.match(r"^argument (--[\w-]+): expected (?:one|at least one) argument", text)
            raise (
                self.missing(text) or self.numeric(text) or (UsageError(f"{m.group(1)}: needs a value") if m else e)
            ) from None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for p in self.params:
            if p is self.recipe:
                hint = self.hints[p.name]
                need_data = not (typing.get_origin(hint) is Annotated and NO_DATA in typing.get_args(hint))
                value: Any = recipe_from(self.parser, ns, need_data)
            elif p is self.recipe_args:
                value = RecipeArgs(rest)
            else:
                value = ns[p.name]
            if p.kind is inspect.Parameter.POSITIONAL_ONLY:
                args.append(value)
            else:
                kwargs[p.name] = value
        return self.fn(*args, **kwargs)

    def missing(self, message: str) -> UsageError | None:
        """`--flag: required (its help)` for the first missing required flag, in place of argparse's list."""
        head = "the following arguments are required: "
        if not message.startswith(head):
            return None
        name = message[len(head) :].split(",")[0].strip()
        p = next((q for q in self.params if q.name == name), None)
        if p is None:
            return None
        shown = name if p.kind is inspect.Parameter.POSITIONAL_ONLY else flag(name)
        why = self.helps.get(name, "").rstrip(".")
        if why.split(" ")[0][1:].islower():  # "Dataset folder" -> "dataset folder", but "LoRA file" stays
            why = why[0].lower() + why[1:]
        return UsageError(f"{shown}: required" + (f" ({why})" if why else ""))

    def numeric(self, message: str) -> UsageError | None:
        """`--flag: must be a number (got X)` for a command's own number flag, in the words users read elsewhere."""
        m = re.match(r"^(\w+): must be an? (int|float) \(got (.*)\)$", message)
        if m is None or m.group(1) not in {p.name for p in self.params}:
            return None
        kind = "a whole number" if m.group(2) == "int" else "a number"
        return UsageError(f"{flag(m.group(1))}: must be {kind} (got {m.group(3)})")

    def split(self, argv: list[str]) -> tuple[list[str], list[str]]:
        """(this command's own flags, the recipe flags) of argv: a flag this parser knows takes its values along."""
        return split_flags(argv, {s: a.nargs for a in self.parser._actions for s in a.option_strings})


def run(fn: Callable[..., Any], prog: str, argv: list[str]) -> int:
    """Parse argv for fn, call it; its return value (None: 0) is the exit code."""
    code = Spec(fn, prog).call(argv)
    return 0 if code is None else int(code)
