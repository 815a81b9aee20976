"""training.optimizer prodigy and adafactor (optim.py): their settings, the one-line refusals, the NaN guard's host
path, a checkpoint round trip of their state through safetensors + JSON, and their state bytes in the memory plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prodigyopt import Prodigy
from safetensors import safe_open
from transformers.optimization import Adafactor

from flux2_lora.checkpoint import load_checkpoint, save_checkpoint
from flux2_lora.config import Recipe, validate
from flux2_lora.distributed import optimizer_state, resolve_strategy, trainable_state
from flux2_lora.errors import RecipeError
from flux2_lora.memory import Setup, estimate, model_shape, optimizer_state_bytes
from flux2_lora.optim import make_optimizer, skips_on_device
from flux2_lora.train import Trainer

NEW = ["prodigy", "adafactor"]


class Adapter(torch.nn.Module):
    """Trainable tensors shaped like a LoRA's: lora_A (random), lora_B (zero at the start, as PEFT makes it) and a
    vector (DoRA's magnitude)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.randn(4, 24, generator=g))})
        self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(16, 4))})
        self.magnitude = torch.nn.Parameter(torch.rand(16, generator=g) + 0.5)


def _recipe(optimizer: str, lr: float | None = None) -> Recipe:
    r = Recipe()
    r.training.optimizer = optimizer  # type: ignore[assignment]
    r.training.lr = lr if lr is not None else {"prodigy": 1.0}.get(optimizer, 1e-3)
    return r


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, first: int, n: int) -> None:
    """n optimizer steps with gradients drawn from each step's own seed (the same on any run)."""
    for step in range(first, first + n):
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def _make(optimizer: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = Adapter()
    return model, make_optimizer(list(model.parameters()), _recipe(optimizer))


# ------------------------------------------------------------------------------------------- building
def test_each_optimizer_is_built_with_its_documented_settings() -> None:
    model = Adapter()
    prodigy = make_optimizer(list(model.parameters()), _recipe("prodigy"))
    assert isinstance(prodigy, Prodigy)
    g = prodigy.param_groups[0]
    assert (g["lr"], g["use_bias_correction"], g["safeguard_warmup"], g["decouple"]) == (1.0, True, True, True)
    adafactor = make_optimizer(list(model.parameters()), _recipe("adafactor", lr=3e-4))
    assert isinstance(adafactor, Adafactor)
    g = adafactor.param_groups[0]
    assert g["lr"] == 3e-4 and not (g["relative_step"] or g["scale_parameter"] or g["warmup_init"])
    assert g["beta1"] is None  # no first moment: factored second moments only


@pytest.mark.parametrize("optimizer", NEW)
def test_the_nan_guard_skips_their_update_from_the_host(optimizer: str) -> None:
    """Neither honours found_inf, so Trainer._step_unless reads the flag and skips step() on a non-finite step:
    the weights and the whole state (Prodigy's d and k, Adafactor's moments) stay as they were."""
    model, opt = _make(optimizer)
    _steps(model, opt, 0, 2)
    assert not skips_on_device(opt)
    before = [p.detach().clone() for p in model.parameters()]
    state = json.dumps(optimizer_state_json(opt))
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    Trainer._step_unless(SimpleNamespace(optimizer=opt), torch.tensor(True))  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert json.dumps(optimizer_state_json(opt)) == state
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    Trainer._step_unless(SimpleNamespace(optimizer=opt), torch.tensor(False))  # type: ignore[arg-type]
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def optimizer_state_json(opt: torch.optim.Optimizer) -> Any:
    sd = opt.state_dict()
    return {
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]],
        "state": {
            i: {k: v.tolist() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()
        },
    }


# ------------------------------------------------------------------------------------------- refusals
def test_missing_prodigyopt_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt now raises ImportError
    with pytest.raises(RecipeError) as e:
        validate(_recipe("prodigy"), need_data=False)
    assert (
        str(e.value) == "training.optimizer: prodigy needs prodigyopt; pip install 'flux2-lora[prodigy]' or use adamw"
    )


def test_a_prodigy_lr_far_from_one_is_refused_naming_the_field() -> None:
    with pytest.raises(
        RecipeError, match=r"^training\.lr: with training\.optimizer: prodigy .* use 1\.0, got 0\.0001$"
    ):
        validate(_recipe("prodigy", lr=1e-4), need_data=False)
    validate(_recipe("prodigy", lr=0.5), need_data=False)
    validate(_recipe("adafactor", lr=1e-4), need_data=False)  # adafactor takes the lr as given


@pytest.mark.parametrize("optimizer", NEW)
@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_sharding_strategies_are_refused_in_one_line(optimizer: str, strategy: str) -> None:
    r = _recipe(optimizer)
    r.distributed.strategy = strategy  # type: ignore[assignment]
    with pytest.raises(RecipeError, match=rf"^training\.optimizer: {optimizer} cannot train with distributed\."):
        resolve_strategy(r)


def test_a_launcher_fsdp_config_is_refused_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # distributed.strategy auto follows the launcher
    with pytest.raises(RecipeError, match=r"strategy fsdp .*; use ddp, or optimizer adamw$"):
        resolve_strategy(_recipe("adafactor"))
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert resolve_strategy(_recipe("adafactor")) == "ddp"


# ------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("optimizer", [*NEW, "adamw"])
def test_their_state_round_trips_bitwise_through_safetensors_and_json(optimizer: str, tmp_path: Path) -> None:
    """3 steps, checkpoint, load into a fresh model and optimizer, 3 more steps: equal to 6 straight steps, bit for
    bit, and the checkpoint holds only safetensors and JSON."""
    straight, opt = _make(optimizer)  # parameters 0: magnitude (16), 1: lora_A (4x24), 2: lora_B (16x4)
    _steps(straight, opt, 0, 6)

    first, opt1 = _make(optimizer)
    _steps(first, opt1, 0, 3)
    path = save_checkpoint(
        tmp_path,
        3,
        trainable_state(first),
        optimizer_state(opt1, first),
        {"step": 3},
        {"torch": torch.get_rng_state()},
        export_lora=lambda p: None,
        keep_last=1,
    )
    assert sorted(f.suffix for f in path.iterdir()) == [
        ".json",
        ".json",
        ".safetensors",
        ".safetensors",
        ".safetensors",
    ]
    meta = json.loads((path / "optimizer.json").read_text())
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    if optimizer == "prodigy":  # the step size's running sums live in the param group
        assert {"d", "d0", "d_max", "d_numerator", "k"} <= set(meta["param_groups"][0]) and meta["param_groups"][0][
            "k"
        ] == 3
        assert shapes["1/s"] == (96,) and shapes["1/p0"] == (96,) and shapes["2/p0"] == ()  # lora_B starts at zero
    if optimizer == "adafactor":  # factored: a row and a column mean per matrix, a vector keeps all
        assert (shapes["1/exp_avg_sq_row"], shapes["1/exp_avg_sq_col"], shapes["0/exp_avg_sq"]) == ((4,), (24,), (16,))
        assert meta["state"]["0"]["step"] == 3

    resumed, opt2 = _make(optimizer)
    _steps(resumed, opt2, 0, 1)  # a different state before the load: all of it must come from the files
    load_checkpoint(path, resumed, opt2)
    _steps(resumed, opt2, 3, 3)
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert json.dumps(optimizer_state_json(opt)) == json.dumps(optimizer_state_json(opt2))


# ------------------------------------------------------------------------------------------- memory plan
@pytest.mark.parametrize("optimizer", ["adamw", *NEW])
def test_state_bytes_equal_the_optimizers_real_state(optimizer: str) -> None:
    """optimizer_state_bytes counts what the optimizer really keeps (per-tensor scalars like step and RMS aside)."""
    model, opt = _make(optimizer)
    _steps(model, opt, 0, 1)
    real = sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for k, v in st.items()
        if torch.is_tensor(v) and k not in ("step", "RMS")
    )
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # lora_A.default, lora_B.default, ...
    assert optimizer_state_bytes(optimizer, named) == real
    # by hand: 4x24 lora_A, 16x4 lora_B (zero at the start), 16 magnitudes = 176 values
    assert (
        optimizer_state_bytes(optimizer, named)
        == {
            "adamw": 8 * 176,
            "prodigy": 16 * 96 + 12 * 64 + 4 + 16 * 16,  # exp_avg, exp_avg_sq, s, p0 (one value for lora_B)
            "adafactor": 4 * ((4 + 24) + (16 + 4) + 16),  # rows + cols per matrix, the vector whole
        }[optimizer]
    )
    assert optimizer_state_bytes("adamw8bit", named) == 2 * 176


def test_system_optimize_counts_each_optimizers_state(tiny_dev: Path) -> None:
    """The plan's optimizer state is optimizer_state_bytes of the LoRA PEFT adds (FLUX.2-dev, rank 16, attention
    targets: adamw 8, adamw8bit 2, prodigy 14, adafactor 0.25 bytes per LoRA parameter)."""
    shape = model_shape(str(tiny_dev))
    plans = {o: estimate(shape, Setup(resolution=64, text_tokens=16, rank=16, optimizer=o)) for o in ("adamw", *NEW)}
    n_lora = plans["adamw"].params["lora"]
    state = {o: e.parts[f"optimizer state ({o})"] for o, e in plans.items()}
    assert state["adamw"] == 8 * n_lora
    assert 12 * n_lora < state["prodigy"] < 16 * n_lora  # lora_A 16 B a value, lora_B (zero at the start) 12 B
    assert state["adafactor"] < n_lora / 2  # rows + cols of each rank-16 matrix
    assert plans["prodigy"].total - plans["adamw"].total == pytest.approx(state["prodigy"] - state["adamw"])
