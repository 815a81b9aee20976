"""Strategies on 2 CPU processes (gloo): DDP, FSDP2 and DeepSpeed ZeRO-2/3 give the single-process LoRA; ZeRO
checkpoints resume exactly; a signal on one process checkpoints every process at the same step, and the run
resumes to the LoRA of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
FSDP = [*LAUNCH, str(ROOT / "tests" / "support" / "fsdp_on_cpu.py")]  # FSDP2 on CPU processes (see that file)
DDP = [*LAUNCH, "-m", "flux2_lora"]
STEPS = "8"


def _env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path, sample_data: Path) -> Path:
    """A cache of 2 same-size images in 2 shards: one global batch of 2 is the same on 1 or 2 processes."""
    src = tmp_path_factory.mktemp("two-images")
    for name in ("001", "002"):  # square images of the sample set
        for ext in (".png", ".txt"):
            shutil.copy(sample_data / f"{name}{ext}", src / f"{name}{ext}")
    cache = tmp_path_factory.mktemp("two-cache") / "cache"
    res = run_cli("data", "cache", "--preset", "tiny", "--dataset", str(src), "--output", str(cache),
                  "--shard-size", "1", "--data.holdout", "0")  # fmt: skip
    assert res.returncode == 0, res.stderr
    return cache


def _args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--dataset", str(cache), "--data.holdout", "0", "--steps", STEPS,
            "--validation.every_n_steps", "0", "--validation.prompts", "[]", "--output.checkpoint_every", "2",
            "--output", str(out), *extra]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def fsdp_run(two_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    res = _run([*FSDP, *_args(two_shards, out, "--training.batch_size", "1", "--distributed.strategy", "fsdp")])
    return out, res.stdout


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora.safetensors"))


UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _held(log: str, strategy: str) -> tuple[list[float], float]:
    """What each process holds of the frozen transformer after prepare(), and its whole size, from the trainer's
    `dist  STRATEGY: frozen transformer loaded sharded (...)` line."""

    def size(text: str) -> float:
        number, unit = text.split()
        return float(number) * UNITS[unit]

    line = next(ln for ln in log.splitlines() if ln.startswith(f"dist  {strategy}: frozen transformer loaded sharded"))
    whole = size(line.split(" of ", 1)[1].split(";")[0])
    per = line.split("processes 0-1: ", 1)[1].split(";")[0].rstrip(")").split(", ")
    return [size(x) for x in per], whole


@pytest.mark.slow
def test_ddp_and_fsdp_give_the_single_process_lora(
    two_shards: Path, single_run: Path, fsdp_run: tuple[Path, str], tmp_path: Path
) -> None:
    single = single_run
    ddp = tmp_path / "ddp"
    res = _run([*DDP, *_args(two_shards, ddp, "--training.batch_size", "1", "--distributed.strategy", "ddp")])
    assert "dist  ddp over 2 processes" in res.stdout
    state = json.loads((ddp / "checkpoints" / f"step-{STEPS}" / "state.json").read_text())
    assert (state["world_size"], state["strategy"]) == (2, "ddp")
    assert res.stdout.count("checkpoint saved") == int(STEPS) // 2  # only the main process writes
    metrics = [json.loads(ln) for ln in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [int(STEPS)]  # losses averaged, logged once
    fsdp, log = fsdp_run
    # FSDP2 really shards: every parameter tensor of the model is a DTensor on each process.
    assert "dist  fsdp over 2 processes:" in log and "parameter tensors sharded (DTensor)" in log
    sharded = log.split("dist  fsdp over 2 processes: ")[1].split(" parameter")[0]
    n, total = (int(x.replace(",", "")) for x in sharded.split(" of "))
    assert n == total > 0
    # Loaded sharded: each process keeps half of the frozen transformer (the non-main one never read it whole).
    held, whole = _held(log, "fsdp")
    assert len(held) == 2 and all(0.45 < h / whole < 0.55 for h in held), (held, whole)
    reference = _lora(single)
    assert len(reference) > 0
    for name, other in (("ddp", _lora(ddp)), ("fsdp", _lora(fsdp))):
        assert other.keys() == reference.keys(), name
        for k, v in reference.items():
            # Same global batch, same per-sample draws: equal up to float summation order.
            torch.testing.assert_close(other[k], v, rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")
        assert not torch.equal(reference[k], torch.zeros_like(reference[k]))


@pytest.fixture(scope="module")
def single_run(two_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    res = run_cli(*_args(two_shards, out, "--training.batch_size", "2"))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_gives_the_single_process_lora_and_resumes_exactly(
    two_shards: Path, single_run: Path, tmp_path: Path, stage: str
) -> None:
    # DeepSpeed on CPU processes: no ACCELERATE_USE_CPU (it would switch DeepSpeed off); gloo is set by the trainer.
    env = {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    out = tmp_path / stage
    cmd = [*DDP, *_args(two_shards, out, "--training.batch_size", "1", "--distributed.strategy", stage)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"dist  {stage} over 2 processes" in res.stdout
    if stage == "zero3":  # built partitioned (zero.Init) and filled from the file: each process holds its half
        held, whole = _held(res.stdout, stage)
        assert len(held) == 2 and all(0.45 < h / whole < 0.55 for h in held), (held, whole)
    else:
        assert "loaded sharded" not in res.stdout
    reference, lora = _lora(single_run), _lora(out)
    for k, v in reference.items():
        torch.testing.assert_close(lora[k], v, rtol=1e-4, atol=1e-6, msg=k)
    # Resume from the middle: the checkpoint holds whole fp32 masters and AdamW moments, set back into ZeRO's
    # partitions (and the working copies) on resume.
    again = tmp_path / f"{stage}-resumed"
    shutil.copytree(out, again)
    for name in ("step-6", "step-8"):
        shutil.rmtree(again / "checkpoints" / name)
    (again / "checkpoints" / "latest").write_text("step-4\n")
    (again / "lora.safetensors").unlink()
    cmd = [*DDP, *_args(two_shards, again, "--training.batch_size", "1", "--distributed.strategy", stage),
           "--resume", "latest"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step-4" in res.stdout
    resumed = _lora(again)
    for k, v in lora.items():
        assert torch.equal(resumed[k], v), k


def _children_by_rank(launcher: int) -> dict[int, int]:
    """Worker pids of an `accelerate launch` process, by their RANK."""
    found: dict[int, int] = {}
    for task in Path(f"/proc/{launcher}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = int(pid)
    return found


@pytest.mark.slow
@pytest.mark.cluster
def test_a_signal_to_one_process_checkpoints_all_and_the_run_resumes_exactly(
    two_shards: Path, fsdp_run: tuple[Path, str], tmp_path: Path
) -> None:
    out = tmp_path / "signalled"
    cmd = [*FSDP, *_args(two_shards, out, "--training.batch_size", "1", "--distributed.strategy", "fsdp")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "checkpoint saved" in line and "step-2" in line:
            workers = _children_by_rank(proc.pid)
            assert set(workers) == {0, 1}
            os.kill(workers[1], signal.SIGUSR1)  # only rank 1 is told (a scheduler may reach one task first)
            break
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    # Both processes stop at the same step (rank 0 learns of the signal through the vote) and checkpoint; the
    # run is not finished, so there is no final LoRA and the exit status says so.
    assert proc.returncode != 0
    assert "received a signal on another process" in log and "continue with --resume latest" in log
    assert not (out / "lora.safetensors").exists()
    stopped = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 2 < stopped < int(STEPS)
    time.sleep(0.5)
    res = _run([*cmd, "--resume", "latest"])
    assert "resumed from" in res.stdout
    straight, _ = fsdp_run
    a, b = _lora(straight), _lora(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
@pytest.mark.cluster
def test_sharded_loading_never_materialises_the_whole_base_on_a_non_main_process(tmp_path: Path) -> None:
    """scripts/bench_sharded_loading.py on the tiny model: every tensor storage created from the start of the load
    to after prepare() is counted on each process (the broadcast and gather buffers included)."""
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_sharded_loading.py"), "--models", "tiny", "--strategies",
         "fsdp", "zero3", "--rank", "1", "--work", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {(r["strategy"], r["rank"]): r for r in json.loads(out.read_text())}
    one = rows["single", 0]
    assert one["held_bytes"] == one["whole_bytes"] and one["peak_tensor_bytes"] >= one["whole_bytes"]
    for strategy in ("fsdp", "zero3"):
        for rank in (0, 1):
            r = rows[strategy, rank]
            assert r["whole_bytes"] == one["whole_bytes"]
            assert 0.45 < r["held_bytes"] / r["whole_bytes"] < 0.55, r
        # The non-main process: its shards plus one whole tensor at a time, never the whole transformer.
        assert rows[strategy, 1]["peak_tensor_bytes"] < 0.7 * one["whole_bytes"], rows[strategy, 1]
    # ZeRO-3: the main process too reads one tensor at a time from the memory-mapped file.
    assert rows["zero3", 0]["peak_tensor_bytes"] < 0.7 * one["whole_bytes"], rows["zero3", 0]


@pytest.mark.slow
@pytest.mark.cluster
def test_an_int8_base_trains_under_ddp_on_2_processes_like_1_process(two_shards: Path, tmp_path: Path) -> None:
    """Where the strategy allows a quantized base (ddp: each process holds the int8 base whole), it keeps working:
    2 processes x batch 1 give the LoRA of 1 process x batch 2, both on the int8 base."""
    pytest.importorskip("torchao")
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_cli(*_args(two_shards, one, "--training.batch_size", "2", "--model.quantize", "int8"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run([*DDP, *_args(two_shards, two, "--training.batch_size", "1", "--distributed.strategy", "ddp",
                             "--model.quantize", "int8")])  # fmt: skip
    assert "dist  ddp over 2 processes" in res.stdout
    a, b = _lora(one), _lora(two)
    assert a.keys() == b.keys() and a
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_an_int8_base_under_a_strategy_that_cannot_train_it_stops_in_one_line_before_the_cache_stage(
    tmp_path: Path, sample_data: Path, strategy: str
) -> None:
    from tests.conftest import first_images

    images = first_images(sample_data, tmp_path / "images", 2)
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--dataset", str(images), "--steps", "2", "--output", str(out),
            "--distributed.strategy", strategy, "--model.quantize", "int8"]  # fmt: skip
    env = _env() if strategy == "fsdp" else {k: v for k, v in _env().items() if k != "ACCELERATE_USE_CPU"}
    res = subprocess.run([*(FSDP if strategy == "fsdp" else DDP), *args], capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    # Each process says it in the same one line (the two may share a line of the log) and exits with 2; the
    # launcher then reports the failed process.
    said = {part.split("\n")[0] for part in res.stderr.split("flux2-lora: error: ")[1:]}
    assert said == {
        f"model.quantize: int8 cannot be trained with distributed.strategy: {strategy} (it cannot shard or move an "
        "int8 base); use strategy ddp (each process holds the int8 base whole), or model.quantize: none with "
        f"{strategy}"
    }, res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr and "[rank0]: Traceback" not in res.stderr
    assert "[rank1]: Traceback" not in res.stderr
    assert not (out / "cache").exists()  # stopped before the cache stage
