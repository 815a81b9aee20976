"""The command layer: every command in cli.COMMANDS is a documented function, and commands/args.py turns a
function's signature and docstring into the parser the rules in its docstring promise."""

from __future__ import annotations

import importlib
import inspect
from typing import Literal

import pytest

from flux2_lora.cli import COMMANDS, USAGE, dispatch
from flux2_lora.commands.args import RecipeArgs, Spec, Switch, doc_parts
from flux2_lora.errors import UsageError


def target(name: str):  # type: ignore[no-untyped-def]
    module, _, fn = COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(f"flux2_lora.commands.{module}"), fn)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_a_function_whose_docstring_documents_each_flag(name: str) -> None:
    fn = target(name)
    description, _ = doc_parts(fn)
    assert description, f"{name}: no description"
    spec = Spec(fn, f"flux2-lora {name}")
    plain = [p.name for p in spec.params if p is not spec.recipe and p is not spec.recipe_args]
    assert [p for p in plain if not spec.helps.get(p)] == [], f"{name}: flags without help"
    assert (COMMANDS[name].shown or name) in USAGE


def toy(
    where: str,
    extra: list[str] | None = None,
    /,
    *,
    count: int,
    scale: float = 1.0,
    merge: bool = False,
    dry_run: Switch = False,
    seeds: list[int] = [0],  # noqa: B006 (a default the parser copies, never mutated)
    prompt: list[str] | None = None,
    kind: Literal["a", "b"] = "a",
    json_: Switch = False,
) -> dict[str, object]:
    """A toy command.

    Second paragraph: not part of the description.

    Args:
        where: The place.
        extra: More places.
        count: How many, at
            least one.
        scale: A factor.
        merge: Merge or not.
        dry_run: Only say.
        seeds: The seeds.
        prompt: Prompts, repeatable.
        kind: Which kind.
        json_: As JSON.
    """
    return dict(locals())


def call(*argv: str) -> dict[str, object]:
    result = Spec(toy, "flux2-lora toy").call(list(argv))
    assert isinstance(result, dict)
    return result


def test_the_signature_gives_the_flags() -> None:
    got = call("here", "--count", "3")
    assert got == {"where": "here", "extra": [], "count": 3, "scale": 1.0, "merge": False, "dry_run": False,
                   "seeds": [0], "prompt": None, "kind": "a", "json_": False}  # fmt: skip
    got = call("here", "x", "y", "--count=2", "--scale", "0.5", "--merge", "--dry-run", "--seeds", "1", "2",
               "--prompt", "p", "--prompt", "q", "--kind", "b", "--json")  # fmt: skip
    assert got["extra"] == ["x", "y"] and got["count"] == 2 and got["scale"] == 0.5
    assert got["merge"] is True and got["dry_run"] is True and got["json_"] is True
    assert got["seeds"] == [1, 2] and got["prompt"] == ["p", "q"] and got["kind"] == "b"
    assert call("here", "--count", "1", "--merge", "false")["merge"] is False  # bool: bare or with a value


def passing_on(flags: RecipeArgs, *, output: str, resume: Switch = False, every: int | None = None) -> object:
    """Takes recipe flags.

    Args:
        output: Where.
        resume: Again.
        every: How often.
    """
    return flags, output, resume, every


def test_recipe_flags_pass_on_unparsed() -> None:
    spec = Spec(passing_on, "flux2-lora pass")
    got = spec.call(["--preset", "tiny", "--output", "O", "--lr=1e-4", "--resume", "--every", "5", "--steps", "3"])
    assert got == (["--preset", "tiny", "--lr=1e-4", "--steps", "3"], "O", True, 5)
    with pytest.raises(UsageError, match="^--every: needs a value$"):
        spec.call(["--output", "O", "--every"])


def test_mistakes_are_one_line_naming_the_flag() -> None:
    with pytest.raises(UsageError, match=r"^--count: required \(how many, at least one\)$"):
        call("here")
    with pytest.raises(UsageError, match=r"^--count: must be a whole number \(got many\)$"):
        call("here", "--count", "many")
    with pytest.raises(UsageError, match=r"^--scale: must be a number \(got big\)$"):
        call("here", "--count", "1", "--scale", "big")
    with pytest.raises(UsageError, match="kind"):
        call("here", "--count", "1", "--kind", "c")
    with pytest.raises(UsageError, match="^--count: needs a value$"):
        call("here", "--count")


def test_the_docstring_gives_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        call("--help")
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "A toy command." in text and "Second paragraph" not in text
    assert "--count COUNT How many, at least one." in text and "--dry-run Only say." in text
    assert "--json As JSON." in text and "[--merge [{true,false}]]" in text


def test_group_names_alone_say_what_they_expect() -> None:
    for argv, message in (
        (["data"], "data: expected one of validate, analyze, augment, shard, cache, make-sample"),
        (["eval", "bogus"], "eval: expected one of compare, assess-quality, test-prompts, select-best"),
        (["model"], "model: expected `model make-tiny --out DIR [--family dev|klein]`"),
        (["system", "x"], "system: unknown subcommand 'x'; expected one of info, gpu, presets, optimize"),
    ):
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("|", r"\|")):
            dispatch(argv)


def test_no_command_function_reads_argv_itself() -> None:
    """The command functions take typed parameters; argv belongs to cli.py and commands/args.py."""
    for name in COMMANDS:
        fn = target(name)
        assert "argv" not in inspect.signature(fn).parameters, name
        assert "sys.argv" not in inspect.getsource(fn), name


def test_the_web_app_splits_a_tune_command_line_as_the_cli_does() -> None:
    """The Tune tab passes extra flags through tune.split_argv; it must know tune's flags exactly as the command."""
    from flux2_lora.tune import tune_flags

    spec = Spec(target("tune"), "flux2-lora tune")
    own = {s: a.nargs for a in spec.parser._actions for s in a.option_strings if s not in ("-h", "--help")}
    assert {flag: n != 0 for flag, n in own.items()} == tune_flags()
