"""Multi-process training on folders, the users' case: 2 CPU processes divide every dataset, under every strategy.

On 8 photos in one bucket, 12 photos in three aspect buckets (both with the default holdout, so the second
has short global batches) and an editing folder of 10 photos with 1 or 2 references of mixed sizes (beside the
target and in references/, with reference dropout), 2 processes x batch 1 give the LoRA of 1 process x batch 2
under DDP, FSDP2, ZeRO-2 and ZeRO-3; every rank trains its share of each epoch; a 2-process checkpoint resumes on
1 process; a kill -9 and resume is bitwise exact (also with references, dropout and max_references drawing).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
# FSDP2 on CPU processes needs the shim in tests/support/fsdp_on_cpu.py; the others run the package itself.
ENTRY = {"fsdp": [str(ROOT / "tests" / "support" / "fsdp_on_cpu.py")]}
STEPS = 8

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _photos(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """A folder of photos with captions, as users bring them: JPEG and PNG, several sizes."""
    rng = np.random.default_rng(len(sizes))
    root.mkdir(parents=True)
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 255, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
        image = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR)
        image.save(root / (f"IMG_{i:04d}.jpg" if i % 3 else f"IMG_{i:04d}.png"))
        (root / f"IMG_{i:04d}.txt").write_text(f"a photo of a thing, number {i}\n")
    return root


def _edit_photos(root: Path) -> Path:
    """An editing folder: 10 targets in two buckets, each with 1 or 2 references of its own size or another."""
    _photos(root, [(128, 128), (160, 104)] * 5)
    rng = np.random.default_rng(7)
    (root / "references").mkdir()
    for i in range(10):
        sizes = [(128, 128), (96, 144)][: 1 + i % 2] if i % 3 else [(160, 104)]
        for n, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
            where = root / "references" if i % 4 == 0 else root
            Image.fromarray(arr).resize((w, h)).save(where / f"IMG_{i:04d}_ref{n}.png")
    return root


# Options every run on a dataset gets (the single-process reference and the 2-process runs alike).
EXTRA = {"10-edit": ["--data.reference_dropout", "0.25"]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("photos")
    return {
        "8-one-bucket": _photos(base / "eight", [(120 + 4 * i, 120 + 4 * i) for i in range(8)]),
        "12-three-buckets": _photos(base / "twelve", [(96, 96), (130, 128)] * 2 + [(160, 104)] * 4 + [(100, 150)] * 4),
        "10-edit": _edit_photos(base / "10-edit"),
        "mix": _mix(base),
    }


def _mix(base: Path) -> Path:
    """A recipe of three sources (issue 20): 4 photos (2 held out) x 2 repeats, 2 photos at two resolutions, and 2
    regularisation photos trained towards the base model's prediction (the LoRA off in a sharded forward too):
    10 samples per epoch in 7 global batches of 2, some short, groups shared across sources."""
    sources = [
        {"path": str(_photos(base / "mix-a", [(120 + 4 * i, 120) for i in range(4)])), "repeats": 2},
        {"path": str(_photos(base / "mix-b", [(96, 96), (160, 104)])), "resolutions": [64, 96], "holdout": 0},
        {"path": str(_photos(base / "mix-reg", [(128, 128)] * 2)), "role": "regularisation"},
    ]
    path = base / "mix.yaml"
    path.write_text(yaml.safe_dump({"data": {"dataset": None, "datasets": sources, "prior_target": "base"}}))
    return path


def _args(dataset: Path, out: Path, batch: int, *extra: str) -> list[str]:
    extra = (*EXTRA.get(dataset.name, []), *extra)  # the folders are named as in `folders`
    data = ["--config", str(dataset)] if dataset.suffix == ".yaml" else ["--dataset", str(dataset)]
    return ["train", "--preset", "tiny", *data, "--steps", str(STEPS), "--batch-size", str(batch),
            "--validation.every_n_steps", "0", "--validation.prompts", "[]", "--output.checkpoint_every", "2",
            "--output.keep_last", "10", "--output", str(out), *extra]  # fmt: skip


def _env(strategy: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"}
    if strategy.startswith("zero"):  # DeepSpeed on CPU processes: ACCELERATE_USE_CPU would switch it off
        del env["ACCELERATE_USE_CPU"]
    return env


def _two(strategy: str, dataset: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    entry = ENTRY.get(strategy, ["-m", "flux2_lora"])
    cmd = [*LAUNCH, *entry, *_args(dataset, out, 1, "--distributed.strategy", strategy, *extra)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(strategy), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora.safetensors"))


def _rel_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a)
    return (num / sum(float((a[k].double() ** 2).sum()) for k in a)) ** 0.5


@pytest.fixture(scope="module")
def single(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1 process x batch 2 on each folder: the reference."""
    runs = {}
    for name, folder in folders.items():
        out = tmp_path_factory.mktemp("single") / name
        res = run_cli(*_args(folder, out, 2))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = out
    return runs


@pytest.fixture(scope="module")
def ddp_runs(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    runs = {}
    for name, folder in folders.items():
        out = tmp_path_factory.mktemp("ddp") / name
        runs[name] = (out, _two("ddp", folder, out).stdout)
    return runs


def _check_division(out: Path, log: str) -> None:
    """Each complete epoch: both ranks trained, their counts differ by at most one batch and add up to the epoch."""
    line = next(ln for ln in log.splitlines() if ln.startswith("data  global batch"))
    # "N samples x R repeat(s)", or with sources of several repeats "N samples, M with repeats"
    total = int(line.split(" with repeats")[0].rsplit(" ", 1)[1] if " with repeats" in line else
                line.split(" samples x ")[0].rsplit(" ", 1)[1]) * (1 if " with repeats" in line else
                int(line.split(" samples x ")[1].split(" ", 1)[0]))  # fmt: skip
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if "samples_per_rank" in r and r["epoch_complete"]]
    assert epochs, log[-2000:]
    for r in epochs:
        counts = r["samples_per_rank"]
        assert len(counts) == 2 and min(counts) > 0
        assert max(counts) - min(counts) <= 1  # one batch (batch size 1)
        assert sum(counts) == total
    assert "epoch 0: samples trained per rank" in log


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("dataset", ["8-one-bucket", "12-three-buckets", "10-edit", "mix"])
def test_two_processes_equal_one_process_with_twice_the_batch(
    strategy: str,
    dataset: str,
    folders: dict[str, Path],
    single: dict[str, Path],
    ddp_runs: dict[str, tuple[Path, str]],
    tmp_path: Path,
) -> None:
    if strategy == "ddp":
        out, log = ddp_runs[dataset]
    else:
        out = tmp_path / strategy
        log = _two(strategy, folders[dataset], out).stdout
    assert f"dist  {strategy} over 2 processes" in log
    assert "global batch 2 = batch 1 x 2 process(es)" in log
    assert _rel_l2(_lora(out), _lora(single[dataset])) < 1e-3
    _check_division(out, log)
    if dataset == "12-three-buckets":
        assert "of them short" in log  # the case with zero-weight slots is really exercised
    if dataset == "10-edit":
        assert "group(s) of bucket and reference sizes" in log
    if dataset == "mix":  # every source trained its share: 2 x 2 repeats, 2 x 2 resolutions, 2 regularisation
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        assert "(regularisation)" in log and records[1]["samples_per_source"] == [4, 4, 2], records[:3]


def test_a_two_process_checkpoint_resumes_on_one_process(
    ddp_runs: dict[str, tuple[Path, str]], folders: dict[str, Path], tmp_path: Path
) -> None:
    straight, _ = ddp_runs["12-three-buckets"]
    again = tmp_path / "moved"
    shutil.copytree(straight, again)
    for ckpt in (again / "checkpoints").glob("step-*"):
        if int(ckpt.name.split("-")[1]) > 4:
            shutil.rmtree(ckpt)
    (again / "checkpoints" / "latest").write_text("step-4\n")
    (again / "lora.safetensors").unlink()
    res = run_cli(*_args(folders["12-three-buckets"], again, 2, "--resume", "latest"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "written by 2 processes, continuing on 1" in res.stdout
    assert _rel_l2(_lora(again), _lora(straight)) < 1e-3
    # Another global batch cannot continue the position: one line, before anything is loaded.
    res = run_cli(*_args(folders["12-three-buckets"], again, 1, "--resume", str(again / "checkpoints" / "step-4")))
    assert res.returncode == 2 and "global batches of 2 samples, this run's are 1" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("dataset", ["12-three-buckets", "10-edit"])
def test_a_kill_9_and_resume_on_two_processes_is_bitwise_exact(
    dataset: str, ddp_runs: dict[str, tuple[Path, str]], folders: dict[str, Path], tmp_path: Path
) -> None:
    extra = ("--distributed.strategy", "ddp")
    if dataset == "10-edit":  # every reference draw on: dropout (EXTRA) and a choice of 1 of 2 references
        extra += ("--data.max_references", "1")
        straight = tmp_path / "straight"
        res = subprocess.run(
            [*LAUNCH, "-m", "flux2_lora", *_args(folders[dataset], straight, 1, *extra)],
            capture_output=True, text=True, env=_env("ddp"), timeout=900,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    else:
        straight, _ = ddp_runs[dataset]
    out = tmp_path / "killed"
    cmd = [*LAUNCH, "-m", "flux2_lora", *_args(folders[dataset], out, 1, *extra)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env("ddp"), start_new_session=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "checkpoint saved" in line and "step-4" in line:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, at once
            break
    proc.wait(timeout=120)
    assert not (out / "lora.safetensors").exists()
    res = subprocess.run([*cmd, "--resume", "latest"], capture_output=True, text=True, env=_env("ddp"), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout
    a, b = _lora(straight), _lora(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
