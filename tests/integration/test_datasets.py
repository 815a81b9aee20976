"""Several sources in one recipe: repeats per source, regularisation images, several resolutions (issue 20).

Runs in-process on the tiny FLUX.2-dev model with small folders (a few seconds of cache stage each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from flux2_lora.cli import parse_train
from flux2_lora.errors import RecipeError
from flux2_lora.train import Trainer
from tests.conftest import first_images, run_cli

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, tiny_dev: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("sources")
    images = sorted(sample_data.glob("*.png"))
    out = {"a": first_images(sample_data, base / "a", 4), "b": base / "b", "reg": base / "reg"}
    for name, chosen in (("b", images[4:6]), ("reg", images[6:9])):
        out[name].mkdir()
        for image in chosen:
            for f in (image, image.with_suffix(".txt")):
                (out[name] / f.name).write_bytes(f.read_bytes())
    return out


def _recipe(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"data": {"dataset": None, **data}}))
    return path


def _trainer(out: Path, config: Path, *extra: str) -> Trainer:
    recipe, resume = parse_train(
        ["--preset", "tiny", "--config", str(config), "--output", str(out), "--validation.prompts", "[]"]
        + ["--validation.every_n_steps", "0", "--logging.log_every", "1", *extra]
    )
    trainer = Trainer(recipe, resume)
    trainer.setup()
    return trainer


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_sources_train_in_proportion_to_repeats_and_regularisation_is_logged_apart(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    sources = [
        {"path": str(folders["a"]), "repeats": 3, "holdout": 1},
        {"path": str(folders["b"]), "repeats": 1, "holdout": 0},
        {"path": str(folders["reg"]), "role": "regularisation"},
    ]
    config = _recipe(tmp_path / "mix.yaml", {"datasets": sources, "prior_loss_weight": 0.5})
    # a: 3 training images x 3 repeats, b: 2 x 1, reg: 3 x 1 -> 14 copies per epoch; 2 epochs
    trainer = _trainer(tmp_path / "run", config, "--steps", "28")
    assert trainer.plan.epoch_samples == 14 and trainer.plan.steps_per_epoch == 14
    # Regularisation images are never held out, and never validated on; a's one held-out image is.
    assert [e.index.num_train for e in trainer.data.entries] == [3, 2, 3]
    assert len(trainer.val_samples) == 1 + min(4, 2)  # a's holdout + b's stand-ins (no holdout: first training ones)
    reg_keys = {p.stem for p in folders["reg"].glob("*.png")}
    assert not reg_keys & {s["key"] for s in trainer.val_samples}
    trainer.fit()
    records = _metrics(tmp_path / "run")
    epochs = [r for r in records if "samples_per_source" in r]
    assert [r["samples_per_source"] for r in epochs] == [[9, 2, 3], [9, 2, 3]]  # 3 x 3 : 2 x 1, counted by the loop
    losses = [r for r in records if "loss" in r]
    # batch 1: each step's sample is of one role, and its loss is logged under that role's name
    assert all(("loss_train" in r) != ("loss_regularisation" in r) for r in losses)
    assert sum("loss_regularisation" in r for r in losses) == 2 * 3

    # Adding a source rebuilds nothing: the caches of a and b are reused as they are.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cache").iterdir()}
    more = sources + [{"path": str(folders["b"]) + "/", "repeats": 2, "resolution": 96, "holdout": 0}]
    config2 = _recipe(tmp_path / "mix2.yaml", {"datasets": more, "prior_loss_weight": 0.5})
    recipe, _ = parse_train(
        ["--preset", "tiny", "--config", str(config2), "--output", str(tmp_path / "run2"), "--steps", "1"]
    )
    from flux2_lora.data.mix import prepare_mix
    from flux2_lora.model import resolve_model

    mix = prepare_mix(
        recipe, resolve_model(recipe.model), tmp_path / "run" / "cache", torch.device("cpu"), torch.float32
    )
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cache").iterdir()}
    assert len(after) == len(before) + 1 and all(after[k] == v for k, v in before.items())
    assert [e.resolution for e in mix.entries] == [64, 64, 64, 96]


def _fit_spied(trainer: Trainer, monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, ...]]:
    """Train, recording each micro-batch's loss as backward gets it with its per-sample losses and roles."""
    seen: dict[str, Any] = {"steps": []}
    flow_loss, backward = trainer._flow_loss, trainer.accelerator.backward

    def spy_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen["per_sample"] = out = flow_loss(*args, **kwargs)
        seen["reg"] = args[6]
        return out

    def spy_backward(loss: torch.Tensor, **kwargs: Any) -> None:
        seen["steps"].append((loss.detach().clone(), seen["per_sample"].detach(), seen["reg"]))
        backward(loss, **kwargs)

    monkeypatch.setattr(trainer, "_flow_loss", spy_loss)
    monkeypatch.setattr(trainer.accelerator, "backward", spy_backward)
    trainer.fit()
    return seen["steps"]


def test_regularisation_loss_is_weighted_and_towards_the_base_model(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    for name, n in (("b", 2), ("reg", 3)):  # one bucket: every step trains all 5 samples together
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (64, 64), (40 * i, 200 if name == "b" else 20, 90)).save(tmp_path / name / f"{i}.png")
            (tmp_path / name / f"{i}.txt").write_text(f"a {'red' if name == 'b' else 'plain'} square number {i}")
    sources = [{"path": str(tmp_path / "b"), "holdout": 0}, {"path": str(tmp_path / "reg"), "role": "regularisation"}]
    for target in ("image", "base"):
        config = _recipe(tmp_path / f"{target}.yaml", {"datasets": sources, "prior_loss_weight": 0.25})
        trainer = _trainer(
            tmp_path / target, config, "--steps", "5", "--batch-size", "5", "--data.prior_target", target
        )
        steps = _fit_spied(trainer, monkeypatch)
        for loss, per_sample, reg in steps:  # one global batch of all 5 samples: weight 1/5 each
            assert reg.tolist().count(True) == 3
            hand = (per_sample * torch.where(reg, 0.25, 1.0)).sum() / 5
            torch.testing.assert_close(loss, hand)
        first_reg = steps[0][1][steps[0][2]]
        last_reg = steps[-1][1][steps[-1][2]]
        if target == "base":
            # The LoRA starts as the identity (lora_B = 0): the base model's prediction is the target, exactly.
            assert torch.all(first_reg == 0) and bool((last_reg > 0).all())
            assert _metrics(tmp_path / target)[1]["loss_regularisation"] == 0.0
        else:
            assert bool((first_reg > 0.1).all())


def test_several_resolutions_cache_each_image_at_each_and_train(tmp_path: Path, folders: dict[str, Path]) -> None:
    config = _recipe(tmp_path / "res.yaml", {"dataset": str(folders["a"]), "resolutions": [64, 96], "holdout": 1})
    trainer = _trainer(tmp_path / "run", config, "--steps", "6", "--batch-size", "3")
    sizes = {e.resolution: {b for (b, _) in e.index.samples().groups} for e in trainer.data.entries}
    assert sorted(sizes) == [64, 96] and sizes[64] == {(64, 64)} and sizes[96] == {(96, 96)}
    # The same image held out at both resolutions; 3 x 2 training copies, each global batch one bucket.
    assert [e.index.num_train for e in trainer.data.entries] == [3, 3]
    assert len({s["key"] for s in trainer.val_samples}) == 1 and len(trainer.val_samples) == 2
    for batch in trainer.plan.epoch(0):
        assert len({trainer.data.samples().group[int(s)] for s, _ in batch[0]}) == 1
    trainer.fit()
    assert (tmp_path / "run" / "lora.safetensors").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"role": "teacher"}, "data.datasets[0].role"),
        ({"repeats": -1}, "data.datasets[0].repeats: must be in 1..10000, got -1"),
        ({"resolution": 100}, "data.datasets[0].resolution: must be a multiple of 16"),
        ({"resolutions": [64, 1000]}, "data.datasets[0].resolutions: must be a multiple of 16"),
        ({"path": "/nonexistent/photos"}, "data.datasets[0].path: /nonexistent/photos does not exist"),
        ({"role": "regularisation"}, "data.datasets: needs at least one source with role: train"),
    ],
)
def test_a_bad_source_is_one_line_naming_its_field(
    tmp_path: Path, folders: dict[str, Path], source: dict[str, Any], message: str
) -> None:
    config = _recipe(tmp_path / "bad.yaml", {"datasets": [{"path": str(folders["a"]), **source}]})
    res = run_cli("train", "--preset", "tiny", "--config", str(config), "--output", str(tmp_path / "o"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr


def test_both_forms_at_once_are_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "both.yaml"
    config.write_text(yaml.safe_dump({"data": {"datasets": [{"path": str(folders["a"])}]}}))
    with pytest.raises(RecipeError, match="data.datasets: give either data.dataset .*'builtin:sample'.*dataset: null"):
        parse_train(["--preset", "tiny", "--config", str(config), "--output", str(tmp_path / "o")])


def test_a_bad_mask_is_one_line_before_the_text_encoder_runs(tmp_path: Path, folders: dict[str, Path]) -> None:
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(folders["b"].iterdir()):
        (data / f.name).write_bytes(f.read_bytes())
    first = sorted(data.glob("*.png"))[0]
    Image.new("L", (10, 10), 255).save(data / f"{first.stem}.mask.png")
    res = run_cli("train", "--preset", "tiny", "--dataset", str(data), "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "cache: prompts" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].endswith("mask is 10x10, its image " + "x".join(
        map(str, Image.open(first).size)) + " (a mask must have its image's size; `flux2-lora data validate` lists "
        "every problem)")  # fmt: skip
    config = _recipe(tmp_path / "r.yaml", {"datasets": [{"path": str(folders["a"]), "mask_dir": str(tmp_path / "no")}]})
    res = run_cli("train", "--preset", "tiny", "--config", str(config), "--output", str(tmp_path / "o2"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"flux2-lora: error: data.datasets[0].mask_dir: {tmp_path / 'no'} is not a folder"
    ]


def test_a_sweep_caches_every_source_once_and_its_trials_read_them(tmp_path: Path, folders: dict[str, Path]) -> None:
    from flux2_lora.tune.driver import prepare_base
    from flux2_lora.tune.settings import Sweep

    sources = [
        {"path": str(folders["a"]), "repeats": 2, "holdout": 1},
        {"path": str(folders["reg"]), "role": "regularisation", "resolutions": [64, 96]},
    ]
    config = _recipe(tmp_path / "mix.yaml", {"datasets": sources})
    recipe, _ = parse_train(["--preset", "tiny", "--config", str(config), "--output", str(tmp_path / "o")])
    sweep = Sweep([], [], trials=2, max_steps=4, report_every=2, grace_steps=2, reduction_factor=2, search_seed=0,
                  storage=None)  # fmt: skip
    trial = yaml.safe_load(prepare_base(recipe, sweep, tmp_path / "sweep").read_text())
    assert trial["data"]["dataset"] is None
    got = [(s["role"], s["repeats"], s["resolution"]) for s in trial["data"]["datasets"]]
    assert got == [("train", 2, 64), ("regularisation", 1, 64), ("regularisation", 1, 96)]
    caches = {p.name for p in (tmp_path / "sweep" / "cache").iterdir()}
    assert {Path(s["path"]).name for s in trial["data"]["datasets"]} == caches
    # A trial reads those caches as they are (nothing is built in its own output folder).
    trainer = _trainer(tmp_path / "trial", tmp_path / "sweep" / "trial_recipe.yaml", "--steps", "2")
    trainer.signals.restore()  # set up only: give the signal handlers back
    assert [e.index.root.name for e in trainer.data.entries] == [
        Path(s["path"]).name for s in trial["data"]["datasets"]
    ]
    assert not (tmp_path / "trial" / "cache").exists()
