"""The reliability suite: what a hostile user or an unlucky operator does to a run, and that nothing is lost.

Every test here is marked `reliability` (`pytest -m reliability` runs the fast ones; the `slow` ones run with
`pytest -m "slow or cluster"` as in CI). Each case asserts the one line the user sees, the exit code, and what is on
disk afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import first_images, run_cli

# Short, quiet runs: no validation renders, no TensorBoard (the tiny model steps in milliseconds).
QUICK = ["--validation.every_n_steps", "0", "--validation.prompts", "[]", "--logging.tensorboard", "false"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory, sample_data: Path, tiny_dev: Path) -> Path:
    """A user's folder of 10 captioned images."""
    return first_images(sample_data, tmp_path_factory.mktemp("photos"), 10)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    """A latent cache of the photos, so that runs reading it skip the cache stage."""
    out = tmp_path_factory.mktemp("cache") / "c"
    res = run_cli("data", "cache", "--preset", "tiny", "--dataset", str(photos), "--output", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def train(out: Path, *args: str, dataset: Path | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    extra = ["--dataset", str(dataset)] if dataset is not None else []
    return run_cli("train", "--preset", "tiny", "--output", str(out), *extra, *QUICK, *args, **kw)  # type: ignore[arg-type]


def error_line(res: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed command (and proof that there was no traceback)."""
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.startswith("flux2-lora: error:")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def kill_at_write(call: int, op: int, out: Path, *args: str, dataset: Path) -> subprocess.CompletedProcess[str]:
    """Run a training that SIGKILLs itself at operation `op` of its `call`-th checkpoint write."""
    cmd = [sys.executable, "-m", "tests.support.kill_at_write", str(call), str(op), "--", "train", "--preset", "tiny"]
    cmd += ["--output", str(out), "--dataset", str(dataset), *QUICK, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
