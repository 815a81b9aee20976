"""Checkpoints: retention keeps the run's own lineage, damaged files are named and skipped, kills lose nothing."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux2_lora import checkpoint as ckpt
from tests.reliability.conftest import QUICK, error_line, kill_at_write, train


def _names(root: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(root)]


def _latest(root: Path) -> str:
    return (root / "latest").read_text().strip()


@pytest.fixture(scope="module")
def run30(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A finished 30-step run with checkpoints at 10, 20 and 30."""
    out = tmp_path_factory.mktemp("run30") / "run"
    res = train(out, "--steps", "30", "--output.checkpoint_every", "10", "--output.keep_last", "5", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _names(out / "checkpoints") == ["step-10", "step-20", "step-30"]
    return out


def test_a_resume_from_an_older_step_sets_the_later_checkpoints_aside(tmp_path: Path, run30: Path, cache: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run30, out)
    root = out / "checkpoints"
    res = train(
        out, "--steps", "27", "--output.checkpoint_every", "5", "--output.keep_last", "2",
        "--resume", str(root / "step-20"), dataset=cache,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: set aside step-30 (after step 20" in res.stdout
    # Retention counted this lineage only: its two newest are kept, the abandoned step-30 is set aside intact.
    assert _names(root) == ["step-25", "step-27"]
    assert _latest(root) == "step-27"
    (aside,) = root.glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-30"]
    assert ckpt.check_checkpoint(aside / "step-30") is None
    # The next `--resume latest` continues this lineage, not the abandoned one.
    res = train(out, "--steps", "28", "--output.checkpoint_every", "5", "--resume", "latest", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {root / 'step-27'} at step 27" in res.stdout


def test_a_finished_run_trains_further_when_steps_is_raised_on_resume(tmp_path: Path, run30: Path, cache: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run30, out)
    root = out / "checkpoints"
    # Not raised: the finished run's checkpoint is past the new last step, one line before anything loads.
    res = train(out, "--steps", "20", "--resume", "latest", dataset=cache)
    assert res.returncode == 2
    assert error_line(res).endswith("past training.max_steps 20; raise --steps to train further")
    # Raised: it continues from step 30, its lr schedule now ending at the new last step, and exports again.
    res = train(out, "--steps", "34", "--output.checkpoint_every", "2", "--resume", "latest", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resume: training.max_steps 30 -> 34; the " in res.stdout
    assert f"resumed from {root / 'step-30'} at step 30" in res.stdout
    assert _latest(root) == "step-34"
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        assert (f.metadata() or {})["flux2_lora.steps"] == "34"


def test_a_broken_latest_falls_back_to_the_newest_good_checkpoint_and_keeps_the_new_ones(
    tmp_path: Path, run30: Path, cache: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(run30, out)
    root = out / "checkpoints"
    (root / "step-30" / "state.json").unlink()
    res = train(
        out, "--steps", "40", "--output.checkpoint_every", "5", "--output.keep_last", "2", "--resume", "latest",
        dataset=cache,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resume: skipping {root / 'step-30'}: state.json is missing" in res.stdout
    assert "resume: step-20 is the newest checkpoint that resumes" in res.stdout
    assert f"resumed from {root / 'step-20'} at step 20" in res.stdout
    assert _names(root) == ["step-35", "step-40"] and _latest(root) == "step-40"
    (aside,) = root.glob("set-aside-*")
    assert [p.name for p in aside.iterdir()] == ["step-30"]


def test_when_no_checkpoint_resumes_the_run_starts_over_without_deleting_them(
    tmp_path: Path, run30: Path, cache: Path
) -> None:
    out = tmp_path / "run"
    shutil.copytree(run30, out)
    root = out / "checkpoints"
    for c in ckpt.list_checkpoints(root):
        (c / "state.json").unlink()
    res = train(out, "--steps", "4", "--output.checkpoint_every", "2", "--resume", "latest", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resume: no checkpoint in {root} resumes; starting from step 0" in res.stdout
    assert _names(root) == ["step-2", "step-4"] and _latest(root) == "step-4"
    (aside,) = root.glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step-10", "step-20", "step-30"]


def test_a_resume_from_a_set_aside_checkpoint_sets_the_current_line_aside(
    tmp_path: Path, run30: Path, cache: Path
) -> None:
    """Going back to an abandoned line (its step-30 in a set-aside folder) replaces the line in `checkpoints/`,
    older steps included: retention must not delete them."""
    out = tmp_path / "run"
    shutil.copytree(run30, out)
    root = out / "checkpoints"
    old = root / "set-aside-earlier"
    old.mkdir()
    os.replace(root / "step-30", old / "step-30")
    res = train(
        out, "--steps", "32", "--output.checkpoint_every", "1", "--output.keep_last", "1",
        "--resume", str(old / "step-30"), dataset=cache,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resume: set aside step-10, step-20 (not the line of {old / 'step-30'}" in res.stdout
    assert _names(root) == ["step-32"] and _latest(root) == "step-32"
    (aside,) = set(root.glob("set-aside-*")) - {old}
    assert sorted(p.name for p in aside.iterdir()) == ["step-10", "step-20"]
    assert all(ckpt.check_checkpoint(c) is None for c in (aside / "step-10", aside / "step-20", old / "step-30"))


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: max(f.stat().st_size // 2, 1)])


def _random_bytes(f: Path) -> None:
    f.write_bytes(random.Random(0).randbytes(max(f.stat().st_size, 64)))


DAMAGE = {
    "empty": lambda f: f.write_bytes(b""),
    "truncated": _truncate,
    "random bytes": _random_bytes,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", ckpt.RESUME_FILES)
def test_a_damaged_checkpoint_file_is_named_and_the_older_one_offered(
    tmp_path: Path, run30: Path, name: str, damage: str
) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(run30 / "checkpoints", root)
    DAMAGE[damage](root / "step-30" / name)
    reason = ckpt.check_checkpoint(root / "step-30")
    assert reason is not None and reason.startswith(name), reason
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resolve_resume(str(root / "step-30"), root)
    assert str(err.value) == (
        f"--resume: {root / 'step-30'} cannot be resumed: {reason}; {root / 'step-20'} resumes "
        f"(--resume {root / 'step-20'})"
    )
    path, notes = ckpt.resolve_resume("latest", root)
    assert path == root / "step-20"
    assert notes == [
        f"resume: skipping {root / 'step-30'}: {reason}",
        "resume: step-20 is the newest checkpoint that resumes",
    ]


@pytest.mark.parametrize(
    "state, reason",
    [
        ('{"step": "abc"}', "state.json is damaged (step 'abc' is not a whole number >= 0)"),
        ("[1, 2]", "state.json is damaged (not a JSON object)"),
        ('{"step": 20}', "state.json says step 20, the folder is step-30"),
        ('{"step": 30, "lr_scheduler": 5}', "state.json is damaged (lr_scheduler is not a JSON dict)"),
    ],
)
def test_a_state_json_with_wrong_values_is_damaged(tmp_path: Path, run30: Path, state: str, reason: str) -> None:
    root = tmp_path / "checkpoints"
    shutil.copytree(run30 / "checkpoints", root)
    (root / "step-30" / "state.json").write_text(state)
    assert ckpt.check_checkpoint(root / "step-30") == reason
    assert ckpt.resolve_resume("latest", root)[0] == root / "step-20"


def test_a_damaged_explicit_resume_is_one_line(tmp_path: Path, run30: Path, cache: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(run30, out)
    root = out / "checkpoints"
    (root / "step-30" / "optimizer.safetensors").write_bytes(b"\0" * 10)
    res = train(out, "--steps", "40", "--resume", str(root / "step-30"), dataset=cache)
    assert res.returncode == 2
    line = error_line(res)
    assert f"{root / 'step-30'} cannot be resumed: optimizer.safetensors is damaged" in line
    assert f"{root / 'step-20'} resumes" in line
    assert _names(root) == ["step-10", "step-20", "step-30"]  # nothing moved or deleted


# Kills inside a checkpoint write. The second checkpoint (step 4, keep_last 1: its retention deletes step-2) is
# interrupted before each of its file-system operations in turn (tensor and JSON files, the LoRA export, fsyncs,
# the rename into place, the `latest` pointer, retention), then the run is resumed with `--resume latest`; its LoRA
# must equal an uninterrupted run's bit for bit. OPS counts the operations of one checkpoint write (kill_at_write
# lists them); OPS + 1 kills right after the write returns.
OPS = 15
KILL_ARGS = ["--steps", "6", "--output.checkpoint_every", "2", "--output.keep_last", "1"]


@pytest.fixture(scope="module")
def straight6(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "run"
    res = train(out, *KILL_ARGS, dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out / "lora.safetensors"))


def _kill_and_resume(out: Path, op: int, cache: Path, straight: dict[str, torch.Tensor]) -> None:
    res = kill_at_write(2, op, out, *KILL_ARGS, dataset=cache)
    assert res.returncode == -signal.SIGKILL, res.stdout[-2000:] + res.stderr[-2000:]
    assert "kill_at_write: SIGKILL" in res.stdout
    if op == OPS + 1:
        assert f"({OPS} operations)" in res.stdout  # OPS is still the count of one checkpoint write
    root = out / "checkpoints"
    path, _ = ckpt.resolve_resume("latest", root)
    assert path is not None and path.name in ("step-2", "step-4")
    assert (root / _latest(root)).is_dir()  # `latest` names a checkpoint that exists
    assert not (out / "lora.safetensors").exists()
    res = train(out, *KILL_ARGS, "--resume", "latest", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {path}" in res.stdout
    assert not list(root.glob(".tmp-*"))
    resumed = load_file(str(out / "lora.safetensors"))
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k


DEFAULT_OPS = [10, 12]


@pytest.mark.parametrize("op", DEFAULT_OPS)
def test_a_kill_inside_a_checkpoint_write_loses_nothing(
    tmp_path: Path, cache: Path, straight6: dict[str, torch.Tensor], op: int
) -> None:
    """op 10: before the finished folder is renamed into place; 12: after the
    rename, before `latest` names it (the newer complete checkpoint is found anyway)."""
    _kill_and_resume(tmp_path / "run", op, cache, straight6)


@pytest.mark.slow
@pytest.mark.parametrize("op", [op for op in range(1, OPS + 2) if op not in DEFAULT_OPS])
def test_a_kill_at_every_moment_of_a_checkpoint_write_loses_nothing(
    tmp_path: Path, cache: Path, straight6: dict[str, torch.Tensor], op: int
) -> None:
    _kill_and_resume(tmp_path / "run", op, cache, straight6)


@pytest.mark.slow
def test_kills_at_random_moments_resume_to_the_same_lora(tmp_path: Path, cache: Path) -> None:
    """Three SIGKILLs at random times (seeded) in a run that checkpoints every step, each followed by
    `--resume latest`: the LoRA equals an uninterrupted run's."""
    args = ["--steps", "60", "--output.checkpoint_every", "1", "--output.keep_last", "2"]
    straight = tmp_path / "straight"
    assert train(straight, *args, dataset=cache).returncode == 0
    out = tmp_path / "killed"
    rng = random.Random(22)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for attempt in range(3):
        cmd = [sys.executable, "-m", "flux2_lora", "train", "--preset", "tiny", "--output", str(out)]
        cmd += ["--dataset", str(cache), *QUICK, *args] + (["--resume", "latest"] if attempt else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:  # wait for training to be under way, then kill at a random moment
            if "checkpoint saved" in line:
                break
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        path, _ = ckpt.resolve_resume("latest", out / "checkpoints")
        assert path is not None
    res = train(out, *args, "--resume", "latest", dataset=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
