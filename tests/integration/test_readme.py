"""The README's two Quickstart commands, run as a new user would: in a fresh virtual environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [ln.strip() for ln in section.splitlines() if re.match(r"^    (pip|python|flux2-lora)", ln)]


def test_quickstart_has_exactly_two_commands() -> None:
    cmds = quickstart_commands()
    assert len(cmds) == 2, cmds
    assert "flux2-lora train" in cmds[0] and "pytest" in cmds[1]


@pytest.mark.slow
def test_quickstart_commands_work_in_a_fresh_venv(tmp_path: Path) -> None:
    train_cmd, test_cmd = quickstart_commands()
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for rel in files.stdout.split():
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "FLUX2_LORA_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
    }

    def sh(cmd: str, timeout: int) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res

    # Same CPU torch as the test machine so the fresh venv does not fetch a multi-GB CUDA build.
    import torch

    sh(f"pip install -q torch=={torch.__version__.split('+')[0]}", 900)
    sh(train_cmd, 1200)
    out = repo / "runs" / "tiny"
    assert (out / "lora.safetensors").exists() and (out / "metrics.jsonl").exists()
    # The test command's install half, then a collection of the suite (running it here would recurse).
    install, _, runner = test_cmd.partition("&&")
    sh(install.strip(), 900)
    res = sh(runner.strip() + " --collect-only -q", 300)
    assert re.search(r"\d+ tests? collected", res.stdout)
