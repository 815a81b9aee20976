"""`flux2-lora tune` without Ray: the search space, the flags, and the outputs written from a sweep's trials.

The sweeps themselves (Ray Tune + Optuna + ASHA on the tiny model) are in tests/integration/test_tune.py
(`pytest -m cluster`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flux2_lora.cli import CliError, parse_train
from flux2_lora.tune import (
    Param,
    Sweep,
    _best,
    load_space,
    override_args,
    parse_space,
    split_argv,
    write_outputs,
)


def test_default_space_is_the_documented_one() -> None:
    space = {p.name: p for p in load_space(None)}
    assert space["lora.rank"] == Param("lora.rank", "int", 4, 128, True)
    assert space["lora.alpha"] == Param("lora.alpha", "int", 4, 128, True)
    assert space["training.lr"] == Param("training.lr", "float", 1e-6, 1e-2, True)
    assert space["training.batch_size"].choices == [1, 2, 4, 8, 16]
    assert space["training.gradient_accumulation"].choices == [1, 2, 4, 8]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"lora.rnak": {"type": "int", "low": 1, "high": 4}}, "lora.rnak: not a recipe field"),
        ({"data.resolution": {"type": "categorical", "choices": [512]}}, "data.resolution: cannot be searched"),
        ({"output.dir": {"type": "categorical", "choices": ["a"]}}, "output.dir: cannot be searched"),
        ({"training.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}, "training.lr: low must be < high"),
        ({"training.lr": {"type": "float", "low": 0, "high": 1e-4, "log": True}}, "log range needs low > 0"),
        ({"lora.rank": {"type": "int", "low": 1.5, "high": 4}}, "int bounds must be whole numbers"),
        ({"lora.rank": {"type": "normal", "low": 1, "high": 4}}, "type must be one of int, float, categorical"),
        ({"lora.targets": {"type": "categorical", "choices": []}}, "needs a non-empty `choices` list"),
        ({"lora.rank": {"type": "int", "low": 1, "high": 4, "step": 2}}, "unknown key(s) ['step']"),
        ([1, 2], "must map dotted recipe fields"),
    ],
)
def test_space_errors_name_the_field(raw: object, message: str) -> None:
    with pytest.raises(CliError, match=None) as e:
        parse_space(raw, "space.yaml")
    assert message in str(e.value) and str(e.value).startswith("space.yaml")
    assert "\n" not in str(e.value)


def test_space_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="--space: .*missing.yaml does not exist"):
        load_space(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora.rank: {type: int, low: 4\n")
    with pytest.raises(CliError, match="is not valid YAML"):
        load_space(str(bad))


def test_flags_split_and_trial_overrides_parse_as_train_flags() -> None:
    ours, rest = split_argv(
        ["--preset", "tiny", "--trials", "4", "--concurrent=2", "--lora.dropout", "0.1", "--resume", "--output", "o"]
    )
    assert ours == ["--trials", "4", "--concurrent=2", "--resume", "--output", "o"]
    assert rest == ["--preset", "tiny", "--lora.dropout", "0.1"]
    params = {"lora.rank": 32, "training.lr": 3e-4, "lora.targets": "all-linear", "model.gradient_checkpointing": False}
    recipe, _ = parse_train(["--preset", "tiny", *override_args(params)], need_data=False)
    assert (recipe.lora.rank, recipe.training.lr, recipe.lora.targets) == (32, 3e-4, "all-linear")
    assert recipe.model.gradient_checkpointing is False


def _trial(number: int, state: str, curve: list[list[float]], **params: object) -> dict[str, object]:
    values = [v for _, v in curve]
    return {
        "number": number,
        "trial_id": f"t{number}",
        "params": {"lora.rank": 8, "training.lr": 1e-3, **params},
        "state": state,
        "curve": curve,
        "last_step": int(curve[-1][0]) if curve else 0,
        "final_value": values[-1] if values else None,
        "best_value": min(values) if values else None,
        "error": "lora.rank: must be >= 1, got 0" if state == "error" else None,
        "path": f"/ray/run_trial_t{number}_{number}_x",
    }


def test_best_is_the_completed_trial_with_the_lowest_final_loss() -> None:
    trials = [
        _trial(1, "completed", [[0, 1.5], [8, 1.2]]),
        _trial(2, "pruned", [[0, 1.5], [4, 0.9]]),  # lower, but stopped early: not comparable
        _trial(3, "completed", [[0, 1.5], [8, 1.1]]),
        _trial(4, "error", []),
    ]
    assert _best(trials)["trial_id"] == "t3"  # type: ignore[index]
    assert _best([trials[1], trials[3]])["trial_id"] == "t2"  # type: ignore[index]
    assert _best([trials[3]]) is None


def test_outputs_of_a_sweep(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    params = load_space(None)
    argv = ["--preset", "tiny", "--model.name_or_path", str(tiny_dev), "--data.dataset", str(sample_data)]
    sweep = Sweep(argv, [], 4, 8, 4, 4, 2, 0, None)
    trials = [
        _trial(2, "completed", [[0, 1.46], [4, 1.40], [8, 1.30]], **{"lora.rank": 16, "training.lr": 2e-3}),
        _trial(1, "pruned", [[0, 1.46], [4, 1.45]], **{"lora.rank": 4, "training.lr": 1e-6}),
        _trial(3, "completed", [[0, 1.46], [4, 1.43], [8, 1.41]], **{"lora.rank": 64, "training.lr": 1e-4}),
        _trial(4, "error", [], **{"lora.rank": 8, "training.lr": 1e-5}),
    ]
    summary = write_outputs(tmp_path, sweep, params, trials, wall_s=12.0)
    assert summary["best_trial"] == "t2" and summary["best_value"] == pytest.approx(1.30)
    assert summary["trials"] == {"completed": 2, "pruned": 1, "error": 1, "not started": 0}
    assert summary["budget"]["steps_trained"] == 8 + 4 + 8 and summary["budget"]["steps_if_none_stopped"] == 32

    saved = json.loads((tmp_path / "optimization_results.json").read_text())
    assert saved["best_params"] == {"lora.rank": 16, "training.lr": 2e-3}
    data = json.loads((tmp_path / "trials_data.json").read_text())
    assert [t["number"] for t in data] == [1, 2, 3, 4]  # in the order Ray created them
    assert data[3]["state"] == "error" and "lora.rank" in data[3]["error"]

    # best_config.yaml is a full recipe that `train --config` accepts, with the best parameters in it.
    best = tmp_path / "best_config.yaml"
    recipe, _ = parse_train(["--config", str(best)])
    assert (recipe.lora.rank, recipe.training.lr, recipe.training.max_steps) == (16, 2e-3, 8)
    assert recipe.data.dataset == str(sample_data) and recipe.output.dir == str(tmp_path / "best")
    assert yaml.safe_load(best.read_text())["lora"]["rank"] == 16

    from PIL import Image

    for name in ("optimization_history.png", "param_importances.png", "validation_curves.png"):
        with Image.open(tmp_path / name) as im:
            assert im.width > 300 and im.height > 100


def test_a_second_call_adds_the_wall_time(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    """A resumed sweep's budget counts the time of every invocation."""
    argv = ["--preset", "tiny", "--model.name_or_path", str(tiny_dev), "--data.dataset", str(sample_data)]
    sweep = Sweep(argv, [], 1, 4, 4, 4, 2, 0, None)
    trials = [_trial(1, "completed", [[0, 1.4], [4, 1.3]])]
    write_outputs(tmp_path, sweep, load_space(None), [dict(t) for t in trials], wall_s=10.0)
    summary = write_outputs(tmp_path, sweep, load_space(None), [dict(t) for t in trials], wall_s=5.0)
    assert summary["budget"]["wall_time_s"] == 15.0
