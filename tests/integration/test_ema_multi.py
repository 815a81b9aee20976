"""The EMA of the LoRA on 2 CPU processes: under DDP, FSDP2, ZeRO-2 and ZeRO-3 (kept per shard / partition,
gathered to save) 2 processes x batch 1 give the EMA of 1 process x batch 2, its checkpointed tensors, and the
validation losses computed with the EMA swapped in (validation.use_ema), while the LoRA itself still matches; and
under FSDP2 and ZeRO-3 validating with the EMA leaves the training bitwise as it is without."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli
from tests.integration.test_multi_gpu_data import _args, _photos, _rel_l2, _two

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

EMA = ["--training.ema_decay", "0.7", "--validation.use_ema", "true", "--validation.every_n_steps", "4"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> Path:
    return _photos(tmp_path_factory.mktemp("ema-photos") / "eight", [(120 + 4 * i, 120 + 4 * i) for i in range(8)])


@pytest.fixture(scope="module")
def single(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process x batch 2: the reference."""
    out = tmp_path_factory.mktemp("ema-single") / "run"
    res = run_cli(*_args(photos, out, 2, *EMA))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _val(out: Path) -> dict[int, float]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("val_ema") for r in recs if "val_loss" in r)
    return {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}


@pytest.fixture(scope="module")
def two(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, str]]:
    """2 processes x batch 1 under a strategy (each run once per module)."""
    done: dict[tuple[str, ...], tuple[Path, str]] = {}

    def run(strategy: str, *extra: str) -> tuple[Path, str]:
        key = (strategy, *extra)
        if key not in done:
            out = tmp_path_factory.mktemp(f"ema-{strategy}") / "run"
            done[key] = (out, _two(strategy, photos, out, *extra).stdout)
        return done[key]

    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_processes_keep_the_ema_of_one_process(strategy: str, single: Path, two: Callable[..., Any]) -> None:
    out, log = two(strategy, *EMA)
    assert f"dist  {strategy} over 2 processes" in log and "ema   decay 0.7" in log
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        assert _rel_l2(load_file(str(out / name)), load_file(str(single / name))) < 1e-3, name
    ema2, ema1 = (load_file(str(o / "checkpoints" / "step-4" / "ema.safetensors")) for o in (out, single))
    assert _rel_l2(ema2, ema1) < 1e-3
    # The EMA moved away from the LoRA (it is not a copy of it) ...
    lora, ema = load_file(str(out / "lora.safetensors")), load_file(str(out / "lora_ema.safetensors"))
    assert any(not torch.equal(lora[k], ema[k]) for k in lora)
    # ... and the validation losses computed with it swapped in match one process's.
    val1, val2 = _val(single), _val(out)
    assert sorted(val1) == sorted(val2) == [0, 4, 8]
    for step, loss in val1.items():
        assert val2[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_validating_with_the_sharded_ema_leaves_the_training_bitwise(strategy: str, two: Callable[..., Any]) -> None:
    """The swap in and out of the shards (FSDP2 resharded, ZeRO-3 re-partitioned) changes no training step."""
    with_ema, _ = two(strategy, *EMA)
    without, _ = two(strategy, *EMA[:2], "--validation.every_n_steps", "4")
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a, b = load_file(str(with_ema / name)), load_file(str(without / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (strategy, name)
