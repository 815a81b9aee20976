"""The EMA of the LoRA (`training.ema_decay`, `validation.use_ema`): the update rule against a hand formula, the
skip flag, gathering and loading, the swap for validation, the recipe checks, the memory estimate, and the EMA files
`eval select-best` takes from a run.

No warmup and no bias correction: the EMA starts at the initial weights and after each update that was not skipped
is d * ema + (1 - d) * w, with d constant from the first update on (diffusers' EMAModel would use a decay of 0 at
its first step and (1 + t) / (10 + t) after it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux2_lora.cli import parse_train
from flux2_lora.ema import LoraEMA
from flux2_lora.errors import CheckpointError, RecipeError
from flux2_lora.evaluate.generate import logged_val_loss, resolve_lora, run_checkpoints
from flux2_lora.memory import KNOWN_MODELS, ModelShape, Setup, estimate


class Toy(torch.nn.Module):
    """Two trainable tensors (like lora_A, lora_B) beside a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 4)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(2, 4))
        self.lora_B = torch.nn.Parameter(torch.zeros(4, 2))


def _step(model: Toy, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in (model.lora_A, model.lora_B):
            p.add_(torch.randn(p.shape, generator=g))


def test_the_ema_is_the_hand_formula_from_the_initial_weights_without_warmup() -> None:
    torch.manual_seed(0)
    model, g = Toy(), torch.Generator().manual_seed(1)
    d = 0.5  # large steps: a warmup or a bias correction would show at once
    ema = LoraEMA(model, d)
    hand = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(5):
        _step(model, g)
        ema.update(torch.tensor(False))
        for n, p in model.named_parameters():
            if p.requires_grad:
                hand[n] = d * hand[n] + (1 - d) * p.detach()
    state = ema.state()
    assert set(state) == {"lora_A", "lora_B"}  # the trainable tensors only, by parameter name
    for n in hand:
        torch.testing.assert_close(state[n], hand[n], rtol=1e-6, atol=1e-7)
        assert state[n].dtype == torch.float32 and state[n].device.type == "cpu"
    # The first update moves by exactly (1 - d): no warmup of the decay.
    fresh = Toy()
    first = LoraEMA(fresh, 0.9)
    w0 = fresh.lora_A.detach().clone()
    with torch.no_grad():
        fresh.lora_A.add_(1.0)
    first.update()
    torch.testing.assert_close(first.state()["lora_A"], 0.9 * w0 + 0.1 * (w0 + 1.0), rtol=1e-6, atol=1e-7)


def test_a_skipped_step_leaves_the_ema_bitwise_and_the_weights_are_never_written() -> None:
    model, g = Toy(), torch.Generator().manual_seed(2)
    ema = LoraEMA(model, 0.9)
    _step(model, g)
    ema.update(torch.tensor(False))
    before = ema.state()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, g)  # (a skipped optimizer step leaves the weights; the EMA must not move even if they moved)
    ema.update(torch.tensor(True))  # the NaN guard's flag, a 0-d bool tensor
    after = ema.state()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(torch.equal(weights[n], p) for n, p in model.named_parameters() if p.requires_grad)
    ema.update(torch.tensor(False))
    assert not torch.equal(ema.state()["lora_A"], after["lora_A"])


def test_the_update_never_reads_the_skip_flag_on_the_host() -> None:
    """On a GPU a read of the flag (`.item()`, `bool()`) is a sync every step; every such read dispatches to
    aten._local_scalar_dense, which is watched here on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = Toy()
    ema = LoraEMA(model, 0.9)
    for flag in (torch.tensor(True), torch.tensor(False)):
        with Reads() as seen:
            ema.update(flag)
        assert seen.ops and not [op for op in seen.ops if "_local_scalar_dense" in op], seen.ops


def test_state_loads_back_exactly_and_a_mismatch_is_one_line() -> None:
    model, g = Toy(), torch.Generator().manual_seed(3)
    ema = LoraEMA(model, 0.99)
    for _ in range(3):
        _step(model, g)
        ema.update()
    saved = ema.state()
    other = LoraEMA(model, 0.99)  # starts from the current weights
    assert not torch.equal(other.state()["lora_A"], saved["lora_A"])
    other.load(saved, "ckpt/ema.safetensors")
    assert all(torch.equal(other.state()[n], saved[n]) for n in saved)
    with pytest.raises(CheckpointError, match=r"^--resume: ckpt/ema.safetensors does not fit this recipe's LoRA \(1 "):
        other.load({"lora_A": saved["lora_A"]}, "ckpt/ema.safetensors")
    with pytest.raises(CheckpointError, match="1 of another shape"):
        other.load({**saved, "lora_B": torch.zeros(2, 2)}, "ckpt/ema.safetensors")


def test_swapped_in_runs_the_model_with_the_ema_and_puts_the_weights_back_exactly() -> None:
    model, g = Toy(), torch.Generator().manual_seed(4)
    ema = LoraEMA(model, 0.8)
    for _ in range(3):
        _step(model, g)
        ema.update()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = ema.state()
    with ema.swapped_in():
        assert torch.equal(model.lora_A, state["lora_A"]) and torch.equal(model.lora_B, state["lora_B"])
        assert torch.equal(model.base.weight, before["base.weight"])  # the frozen base is not touched
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # Also when the block fails.
    with pytest.raises(RuntimeError), ema.swapped_in():
        raise RuntimeError("validation failed")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_recipe_fields_are_checked_in_one_line() -> None:
    for bad in ("1.0", "-0.1", "1.5"):
        with pytest.raises(RecipeError, match=r"^training\.ema_decay: must be in \[0, 1\)"):
            parse_train(["--preset", "tiny", "--training.ema_decay", bad])
    with pytest.raises(RecipeError, match=r"^validation\.use_ema: needs training\.ema_decay > 0"):
        parse_train(["--preset", "tiny", "--validation.use_ema", "true"])
    recipe, _ = parse_train(["--preset", "tiny", "--training.ema_decay", "0.999", "--validation.use_ema", "true"])
    assert recipe.training.ema_decay == 0.999 and recipe.validation.use_ema
    assert Setup.from_recipe(recipe).ema and not Setup.from_recipe(parse_train(["--preset", "tiny"])[0]).ema


def test_system_optimize_counts_the_ema_as_one_more_fp32_copy_of_the_lora() -> None:
    from flux2_lora.system import recommendations

    # FLUX.2-dev's architecture at toy width (as scripts/bench_gpu.py --toy builds it): a simulated step in seconds.
    cfg = dict(KNOWN_MODELS["black-forest-labs/FLUX.2-dev"]["transformer"])
    cfg.update(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=96, in_channels=16,
               axes_dims_rope=(8, 8, 8, 8), timestep_guidance_channels=32, num_layers=1, num_single_layers=2)  # fmt: skip
    shape = ModelShape("toy", "dev", cfg, 0.0, 0.0, "")
    plain = estimate(shape, Setup(resolution=512, rank=16))
    with_ema = estimate(shape, Setup(resolution=512, rank=16, ema=True))
    assert with_ema.parts["EMA of the LoRA (fp32)"] == plain.params["lora"] * 4
    assert with_ema.total == pytest.approx(plain.total + plain.params["lora"] * 4)
    sharded = estimate(shape, dataclasses.replace(Setup(resolution=512, rank=16, ema=True), shards=4))
    assert sharded.parts["EMA of the LoRA (fp32)"] == plain.params["lora"]  # kept per shard: 1/4 of it
    steps = [text for text, _ in recommendations(shape, Setup(resolution=512, rank=16, ema=True), 1e-6)]
    assert "training.ema_decay: 0 (no fp32 EMA copy of the LoRA)" in steps


# ---------------------------------------------------------------------------------- eval select-best
def _lora_file(path: Path, value: float, ema: bool, step: int) -> Path:
    meta = {"format": "pt", "flux2_lora.family": "dev", "flux2_lora.steps": str(step), "flux2_lora.rank": "2"}
    if ema:
        meta |= {"flux2_lora.weights": "ema", "flux2_lora.ema_decay": "0.9"}
    key = "transformer.transformer_blocks.0.attn.to_q"
    tensors = {f"{key}.lora_A.weight": torch.full((2, 8), value), f"{key}.lora_B.weight": torch.full((8, 2), value)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def test_a_runs_ema_files_are_candidates_with_their_own_logged_loss(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 4):
        _lora_file(run / "checkpoints" / f"step-{step}" / "lora.safetensors", 0.1 * step, False, step)
        _lora_file(run / "checkpoints" / f"step-{step}" / "lora_ema.safetensors", 0.05 * step, True, step)
    _lora_file(run / "checkpoints" / "step-6" / "lora.safetensors", 0.6, False, 6)  # a run without an EMA there
    (run / "recipe.yaml").write_text("{}\n")
    _lora_file(run / "lora_ema.safetensors", 0.3, True, 6)
    records = [{"step": 2, "val_loss": 1.5, "val_ema": True}, {"step": 4, "val_loss": 1.25, "val_ema": True},
               {"step": 6, "val_loss": 1.0}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    refs = run_checkpoints(run)
    assert [(r.label, r.step, r.is_ema) for r in refs] == [
        ("step-2", 2, False), ("step-2 (EMA)", 2, True), ("step-4", 4, False), ("step-4 (EMA)", 4, True),
        ("step-6", 6, False),
    ]  # fmt: skip
    # A loss logged with validation.use_ema is the EMA's: the EMA file takes it, the LoRA of that step has none.
    assert [logged_val_loss(r) for r in refs] == [None, 1.5, None, 1.25, 1.0]
    final = resolve_lora(run / "lora_ema.safetensors")
    assert final.label == "run (EMA)" and final.is_ema and final.run == run and logged_val_loss(final) is None
