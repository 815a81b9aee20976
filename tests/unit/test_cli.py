"""Recipes and the command line: presets, overrides, short forms, and bad values that fail fast in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flux2_lora.cli import _expand_argv, parse_train, presets
from tests.conftest import run_cli


def test_presets_have_the_documented_values(sample_data: Path) -> None:
    assert {"base", "character", "style", "concept", "tiny"} <= set(presets())
    ds = ["--dataset", str(sample_data)]
    character, _ = parse_train(["--preset", "character", *ds])
    assert (character.lora.rank, character.lora.alpha, character.training.lr) == (128, 128, 1e-4)
    style, _ = parse_train(["--preset", "style", *ds])
    assert (style.lora.rank, style.training.lr) == (64, 5e-5)
    concept, _ = parse_train(["--preset", "concept", *ds])
    assert (concept.lora.rank, concept.training.lr) == (32, 5e-5)
    tiny, _ = parse_train(["--preset", "tiny"])
    assert tiny.model.name_or_path == "builtin:tiny-dev" and tiny.data.dataset == "builtin:sample"


def test_base_recipe_documents_every_field() -> None:
    """recipes/base.yaml parses to the dataclass defaults and has a comment for every field."""
    from flux2_lora.config import Recipe

    base_file = Path(__file__).parents[2] / "recipes" / "base.yaml"
    text = base_file.read_text()
    data = yaml.safe_load(text)
    defaults = Recipe().to_dict()
    assert set(data) == set(defaults)
    for group, fields in defaults.items():
        assert set(data[group]) == set(fields), group
        for name in fields:
            # The line before each field (or the field line itself) carries a comment.
            lines = text.splitlines()
            idx = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"{name}:"))
            assert lines[idx - 1].strip().startswith("#") or "#" in lines[idx], f"{group}.{name} is undocumented"


def test_overrides_and_short_forms(sample_data: Path, tmp_path: Path) -> None:
    recipe, resume = parse_train(
        [
            "--steps",
            "7",
            "--preset",
            "tiny",
            "--lr",
            "0.01",
            "--batch-size",
            "2",
            "--rank",
            "4",
            "--dtype",
            "bf16",
            "--output",
            str(tmp_path),
            "--dataset",
            str(sample_data),
            "--force-cpu-loading",
            "--lora.dropout",
            "0.1",
            "--resume",
            "latest",
            "--model=builtin:tiny-klein",
        ]
    )
    assert recipe.training.max_steps == 7  # given before --preset, still wins: presets load first
    assert recipe.training.lr == 0.01 and recipe.training.batch_size == 2 and recipe.lora.rank == 4
    assert recipe.model.dtype == "bf16" and recipe.model.force_cpu_loading and recipe.lora.dropout == 0.1
    assert recipe.output.dir == str(tmp_path) and recipe.data.dataset == str(sample_data)
    assert recipe.model.name_or_path == "builtin:tiny-klein" and resume == "latest"
    assert _expand_argv(["--preset=tiny"])[0] == "--config"


def test_config_file_and_print_config(tmp_path: Path, sample_data: Path) -> None:
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({"lora": {"rank": 3}, "data": {"dataset": str(sample_data)}}))
    recipe, _ = parse_train(["--config", str(cfg)])
    assert recipe.lora.rank == 3
    res = run_cli("train", "--preset", "tiny", "--rank", "5", "--print_config")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    assert printed["lora"]["rank"] == 5 and printed["model"]["name_or_path"] == "builtin:tiny-dev"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--preset", "nosuch"], "--preset"),
        (["--preset", "tiny", "--rank", "0"], "lora.rank"),
        (["--preset", "tiny", "--lr", "0"], "training.lr"),
        (["--preset", "tiny", "--lr", "-1e-4"], "training.lr"),
        (["--preset", "tiny", "--dtype", "fp64"], "model.dtype"),
        (["--preset", "base"], "data.dataset"),
        (["--preset", "tiny", "--dataset", "/no/such/folder"], "data.dataset"),
        (["--preset", "tiny", "--steps", "abc"], "training.max_steps"),
        (["--preset", "tiny", "--data.resolution", "100"], "data.resolution"),
        (["--preset", "tiny", "--lora.targets", "everything"], "lora.targets"),
    ],
)
def test_bad_values_fail_fast_in_one_line(args: list[str], field: str, tmp_path: Path) -> None:
    """Exit 2, one stderr line naming the field, no traceback, and no model built or loaded."""
    home = tmp_path / "home"
    res = run_cli("train", *args, env={"FLUX2_LORA_HOME": str(home)}, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert field in lines[0] and "Traceback" not in res.stderr
    assert not (home / "models").exists()


def test_unknown_command_and_help() -> None:
    res = run_cli("frobnicate")
    assert res.returncode == 2 and "unknown command" in res.stderr
    res = run_cli("--help")
    assert res.returncode == 0 and "train" in res.stdout
