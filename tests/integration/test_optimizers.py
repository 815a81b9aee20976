"""training.optimizer prodigy and adafactor train the tiny model in-process, write pickle-free checkpoints, and a run
stopped at a checkpoint resumes to the LoRA of an uninterrupted run, bit for bit."""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora.checkpoint import RESUME_FILES, CheckpointError, read_state
from flux2_lora.cli import parse_train
from flux2_lora.data.cache import build_cache, dataset_source, settings_for
from flux2_lora.model import resolve_model
from flux2_lora.safety import require_safetensors
from flux2_lora.train import Trainer
from flux2_lora.train_checkpoint import check_state
from tests.conftest import first_images, reset_accelerate

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

DATA = ["--data.holdout", "0"]
OPTIMIZERS = {
    "prodigy": ["--training.optimizer", "prodigy", "--lr", "1.0"],
    "adafactor": ["--training.optimizer", "adafactor", "--lr", "1e-3"],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path, sample_data: Path) -> Path:
    """4 sample images cached once for every run below (the runs skip their cache stage)."""
    base = tmp_path_factory.mktemp("optimizers")
    recipe, _ = parse_train(["--preset", "tiny", *DATA])
    samples, _ = dataset_source(str(first_images(sample_data, base / "data", 4)), None)
    with contextlib.redirect_stdout(io.StringIO()):
        build_cache(
            base / "cache",
            settings_for(resolve_model(recipe.model), recipe),
            samples,
            torch.device("cpu"),
            torch.float32,
        )
    return base / "cache"


def _train(out: Path, cache: Path, optimizer: str, *extra: str, stop_at: int | None = None) -> Trainer:
    args = ["--preset", "tiny", "--output", str(out), "--dataset", str(cache), *DATA, *OPTIMIZERS[optimizer]]
    args += ["--steps", "8", "--output.checkpoint_every", "3", "--validation.every_n_steps", "0"]
    args += ["--validation.prompts", "[]", "--logging.tensorboard", "false"]
    recipe, resume = parse_train(args + list(extra))
    trainer = Trainer(recipe, resume)
    trainer.setup()
    if stop_at is not None:  # a scheduler's SIGUSR1 during step `stop_at`: checkpoint there and exit
        update = trainer.signals.update

        def signalled(step: int) -> str:
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            return update(step)

        trainer.signals.update = signalled  # type: ignore[method-assign]
    trainer.fit()
    reset_accelerate()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_it_trains_and_a_stopped_run_resumes_to_the_same_lora(optimizer: str, cache: Path, tmp_path: Path) -> None:
    _train(tmp_path / "straight", cache, optimizer)
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    # It trained: every lora_B (zero at the start) moved away from zero.
    ups = [k for k in a if ".lora_B." in k]
    assert ups and all(a[k].abs().sum() > 0 for k in ups)
    # The checkpoint is safetensors + JSON only: no pickle anywhere.
    ckpt = tmp_path / "straight" / "checkpoints" / "step-8"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*RESUME_FILES, "lora.safetensors"])
    for f in ckpt.glob("*.safetensors"):
        require_safetensors(f, "checkpoint")

    stopped = _train(tmp_path / "stopped", cache, optimizer, stop_at=5)
    assert stopped.interrupted and stopped.state.step == 5
    assert not (tmp_path / "stopped" / "lora.safetensors").exists()
    # Another optimizer cannot continue it (its state would load without a word and fail at the first step).
    other, _ = parse_train(["--preset", "tiny", "--dataset", str(cache), *DATA])
    at = tmp_path / "stopped" / "checkpoints" / "step-5"
    fake = SimpleNamespace(
        recipe=other, global_batch=read_state(at)["global_batch"], accelerator=SimpleNamespace(num_processes=1)
    )
    with pytest.raises(
        CheckpointError, match=rf"was trained with training.optimizer {optimizer}, this recipe uses adamw"
    ):
        check_state(fake, at)
    resumed = _train(tmp_path / "stopped", cache, optimizer, "--resume", "latest")
    assert resumed.state.step == 8
    b = load_file(str(tmp_path / "stopped" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
