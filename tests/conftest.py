"""Shared fixtures: tiny FLUX.2 pipelines and the sample dataset, built once per session, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLUX2_LORA_HOME for the session: builtin models and the sample dataset are built here."""
    path = tmp_path_factory.mktemp("flux2-home")
    os.environ["FLUX2_LORA_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_dev(home: Path) -> Path:
    from flux2_lora.model import make_tiny_pipeline

    return make_tiny_pipeline(home / "models" / "tiny-dev", family="dev")


@pytest.fixture(scope="session")
def tiny_klein(home: Path) -> Path:
    from flux2_lora.model import make_tiny_pipeline

    return make_tiny_pipeline(home / "models" / "tiny-klein", family="klein")


@pytest.fixture(scope="session")
def sample_data(home: Path) -> Path:
    from flux2_lora.data.sample import make_sample_dataset

    return make_sample_dataset(home / "data" / "sample")


def first_images(sample_data: Path, dest: Path, n: int) -> Path:
    """A small dataset: the first `n` sample images with their captions, copied into `dest` (a short cache stage)."""
    dest.mkdir(parents=True, exist_ok=True)
    for image in sorted(sample_data.glob("*.png"))[:n]:
        for f in (image, image.with_suffix(".txt")):
            shutil.copy(f, dest / f.name)
    return dest


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m flux2_lora ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flux2_lora", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons, so the next in-process Trainer builds its own."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Use with `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")` in files that train in-process."""
    yield
    reset_accelerate()
