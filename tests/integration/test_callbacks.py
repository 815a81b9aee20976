"""Callbacks and optional paths, in-process: NaN guard, early stopping, wall time, AdamW8bit, W&B offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from flux2_lora import train as train_mod
from flux2_lora.callbacks import TrainingError
from flux2_lora.cli import parse_train
from flux2_lora.train import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _run(out: Path, *extra: str) -> Trainer:
    recipe, resume = parse_train(
        ["--preset", "tiny", "--output", str(out), "--validation.prompts", "[]", "--logging.log_every", "1", *extra]
    )
    trainer = Trainer(recipe, resume)
    trainer.setup()
    trainer.fit()
    return trainer


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_nan_guard_skips_updates_and_stops_after_k_in_a_row(
    tmp_path: Path,
    tiny_dev: Path,
    sample_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = train_mod.flow_loss
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        if args[0].training:  # the training step (validation runs the model in eval mode)
            calls["n"] += 1
            if calls["n"] == 3 or calls["n"] >= 6:  # one isolated NaN, then NaN forever
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod, "flow_loss", flaky)
    recipe, _ = parse_train(
        ["--preset", "tiny", "--output", str(tmp_path), "--validation.prompts", "[]", "--logging.log_every", "1"]
        + ["--steps", "40", "--callbacks.nan_max_consecutive", "3", "--validation.every_n_steps", "0"]
    )
    trainer = Trainer(recipe)
    trainer.setup()
    # Steps 3, 6, 7, 8 are non-finite; the third in a row (step 8) stops the run, which then fails (exit 1).
    with pytest.raises(TrainingError, match="training stopped at step 8: 3 non-finite steps in a row"):
        trainer.fit()
    assert trainer.state.step == 8
    out = capsys.readouterr().out
    assert "step 3: non-finite" in out and "3 non-finite steps in a row" in out
    # Weights stayed finite (the NaN updates were skipped) and the stop left a checkpoint, but no final LoRA.
    lora = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.isfinite(p).all() for p in lora.parameters() if p.requires_grad)
    assert (tmp_path / "checkpoints" / "step-8").exists()
    assert not (tmp_path / "lora.safetensors").exists()


def test_early_stopping_on_validation_loss(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    # lr 0 cannot improve the validation loss: patience 2 stops at the second validation after the first.
    trainer = _run(
        tmp_path,
        "--steps",
        "100",
        "--lr",
        "1e-12",
        "--validation.every_n_steps",
        "5",
        "--callbacks.early_stopping_patience",
        "2",
        "--callbacks.early_stopping_min_delta",
        "1e-4",
    )
    vals = [m["step"] for m in _metrics(tmp_path) if "val_loss" in m]
    assert trainer.state.step == 15 and vals == [0, 5, 10, 15]


def test_max_wall_time_checkpoints_and_stops(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    trainer = _run(
        tmp_path, "--steps", "100000", "--callbacks.max_wall_time_minutes", "0.02", "--validation.every_n_steps", "0"
    )
    assert 0 < trainer.state.step < 100000
    assert (tmp_path / "checkpoints" / f"step-{trainer.state.step}").exists()
    assert (tmp_path / "lora.safetensors").exists()


def test_adamw8bit_trains_and_resumes_exactly(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    pytest.importorskip("bitsandbytes")
    common = ["--training.optimizer", "adamw8bit", "--validation.every_n_steps", "0", "--output.checkpoint_every", "5"]
    a = _run(tmp_path / "a", "--steps", "10", *common)
    assert type(a.optimizer.optimizer).__name__ == "AdamW8bit"
    # Resume from step 5 of the same run into a copy: same final weights as the straight run.
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = _run(tmp_path / "b", "--steps", "10", *common, "--resume", str(tmp_path / "b" / "checkpoints" / "step-5"))
    la = a.accelerator.unwrap_model(a.model)
    lb = b.accelerator.unwrap_model(b.model)
    for (n, p), (_, q) in zip(la.named_parameters(), lb.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p, q), n


def test_wandb_offline_logging(
    tmp_path: Path, tiny_dev: Path, sample_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _run(
        tmp_path,
        "--steps",
        "3",
        "--validation.every_n_steps",
        "0",
        "--logging.wandb",
        "true",
        "--logging.wandb_mode",
        "offline",
    )
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
