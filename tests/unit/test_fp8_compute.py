"""model.fp8_compute at the module level: which linears torchao converts, the one-line refusals, and the numerics of
one training step with torchao's emulated fp8 matmuls on the CPU against the plain step.

Bounds of the numerics test. Tensorwise fp8 rounds each operand to e4m3 (3 mantissa bits: relative rounding error
up to 2^-4, about 3.6 % RMS) and the output gradient to e5m2 (2 bits: up to 2^-3, about 7 % RMS). A matmul sums
many such errors with random signs, so its output moves by well under that; the loss, a mean over every output,
moves by far less, while a gradient carries the e5m2 error of every fp8 linear it passes through. Measured on the
tiny model (4 blocks, every block linear in fp8, fp32 and bf16 base): loss within 2e-4 relative, whole-gradient
cosine 0.998 and relative error 6.3 %, the worst single tensor's cosine 0.97. Bounds: loss within 1 % (the e4m3
step of one operand, an order above the measure), cosine > 0.99 over the whole gradient and over lora_A's and
lora_B's (5x the measured 1 - cosine), relative error < 15 % (about e5m2's RMS twice over). A step that were not fp8
at all would pass those too, so the gradient must also differ from the plain one by more than 0.1 % (the plain
step is deterministic: the same step twice differs by nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchao")

from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from flux2_lora.config import Recipe, RecipeError, validate  # noqa: E402
from flux2_lora.errors import UsageError  # noqa: E402
from flux2_lora.model import ModelError, add_lora  # noqa: E402
from flux2_lora.quant import (  # noqa: E402
    FP8_EMULATE_ENV,
    QuantizationError,
    check_fp8_compute,
    convert_fp8_compute,
    fp8_compute_blocks,
    is_quantizable,
)
from tests.unit.test_quant_swap import _step_inputs  # noqa: E402

LOSS_RTOL = 0.01
GRAD_COSINE = 0.99
GRAD_RTOL = 0.15  # |g_fp8 - g| / |g| over the whole LoRA gradient


def _model(tiny_dev: Path, dtype: torch.dtype = torch.float32, fp8: bool = False, kind: str = "lora") -> Any:
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer", torch_dtype=dtype)
    model.requires_grad_(False)
    if fp8:
        convert_fp8_compute(model, emulate=True)
    torch.manual_seed(0)
    add_lora(model, 4, 4, 0.0, "all-linear", "gaussian", kind)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():  # lora_B (LoKr's, LoHa's zero factor) starts at zero: give it values, so that
        if p.requires_grad and not p.any():  # every factor's gradient flows
            p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05
    return model.train()


def _step(model: Any) -> tuple[float, dict[str, torch.Tensor]]:
    from flux2_lora.flow import flow_loss

    *inputs, refs = _step_inputs(model, 0)
    dtype = next(model.parameters()).dtype
    inputs = [t.to(dtype) if i in (0, 1, 3) else t for i, t in enumerate(inputs)]  # latents, embeddings, noise
    loss = flow_loss(model, *inputs, references=refs)
    loss.backward()
    return loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_only_the_block_linears_run_in_fp8_under_the_lora(tiny_dev: Path) -> None:
    plain = _model(tiny_dev)
    model = _model(tiny_dev, fp8=True)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    # Every block linear, as PEFT's base layer where the LoRA wraps it (all-linear: every one of them).
    want = {f"{n}.base_layer" for n, m in plain.named_modules() if hasattr(m, "base_layer")}
    assert converted == want and len(converted) == 2 * 12 + 2 * 2
    assert all(is_quantizable(n.removesuffix(".base_layer"), plain.get_submodule(n)) for n in want)
    for name, m in model.named_modules():
        if "lora_A" in name or "lora_B" in name or not isinstance(m, torch.nn.Linear):
            assert not isinstance(m, Float8Linear), name  # PEFT's layers, norms, embeddings stay as they are
        elif "transformer_blocks." not in name:  # embedders, modulation, proj_out: plain linears at the model dtype
            assert type(m) is torch.nn.Linear, name
    # The LoRA's own matmuls are plain fp32 linears; the frozen weights are the same tensors, unchanged.
    lora = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert lora and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in lora)
    ref = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == ref[name].dtype and (p.requires_grad or torch.equal(p, ref[name])), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_emulated_fp8_step_matches_the_plain_step(tiny_dev: Path, dtype: torch.dtype) -> None:
    loss, grads = _step(_model(tiny_dev, dtype))
    loss8, grads8 = _step(_model(tiny_dev, dtype, fp8=True))
    assert grads.keys() == grads8.keys()
    assert abs(loss8 - loss) <= LOSS_RTOL * abs(loss), (loss, loss8)
    a = torch.cat([g.flatten() for g in grads.values()])
    b = torch.cat([grads8[k].flatten() for k in grads])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > GRAD_COSINE
    assert 1e-3 < (a - b).norm() / a.norm() < GRAD_RTOL  # fp8 rounding happened, and stayed within fp8's error
    # lora_A and lora_B alike (lora_A's gradient passes through the fp8 linears above it).
    for kind in ("lora_A", "lora_B"):
        ka = [k for k in grads if f".{kind}." in k]
        x, y = torch.cat([grads[k].flatten() for k in ka]), torch.cat([grads8[k].flatten() for k in ka])
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > GRAD_COSINE, kind


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_every_adapter_type_wraps_the_fp8_linears(tiny_dev: Path, kind: str) -> None:
    """PEFT's DoRA, LoKr and LoHa layers take a Float8Linear as their base layer like a plain one, within the same
    bounds (their own matmuls stay plain)."""
    model = _model(tiny_dev, fp8=True, kind=kind)
    to_q = model.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer, Float8Linear) and not isinstance(to_q, Float8Linear)
    loss, grads = _step(_model(tiny_dev, kind=kind))
    loss8, grads8 = _step(model)
    assert grads.keys() == grads8.keys() and abs(loss8 - loss) <= LOSS_RTOL * abs(loss)
    a, b = (torch.cat([g[k].flatten() for k in grads]) for g in (grads, grads8))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > GRAD_COSINE
    assert 1e-3 < (a - b).norm() / a.norm() < GRAD_RTOL


def test_fp8_compute_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, tiny_dev: Path) -> None:
    cpu = torch.device("cpu")
    check_fp8_compute(False, cpu)  # off: nothing to check
    monkeypatch.delenv(FP8_EMULATE_ENV, raising=False)
    with pytest.raises(QuantizationError, match=r"^model\.fp8_compute: .*compute capability >= 8\.9.*on the cpu") as e:
        check_fp8_compute(True, cpu)
    assert "\n" not in str(e.value) and issubclass(QuantizationError, ModelError)
    # A GPU below Ada/Hopper: named, with its compute capability.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None: "NVIDIA A10")
    with pytest.raises(QuantizationError, match=r"^model\.fp8_compute: .*this GPU \(NVIDIA A10\) has 8\.6: set"):
        check_fp8_compute(True, torch.device("cuda"))
    for cap in ((8, 9), (9, 0), (12, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None, cap=cap: cap)
        check_fp8_compute(True, torch.device("cuda"))
    # Loading the frozen base (what the trainer calls) checks too, before it converts anything.
    from types import SimpleNamespace

    from flux2_lora.distributed import load_frozen_transformer
    from flux2_lora.model import ModelSource

    acc = SimpleNamespace(num_processes=1, distributed_type="NO", device=cpu, is_main_process=True)
    src = ModelSource(path=tiny_dev, family="dev", text_layers=(10, 20, 30), pipeline_class="Flux2Pipeline")
    with pytest.raises(QuantizationError, match=r"on the cpu"):
        load_frozen_transformer(acc, "single", src, torch.float32, fp8_compute=True)
    plain = load_frozen_transformer(acc, "single", src, torch.float32)
    assert not any(isinstance(m, Float8Linear) for m in plain.modules())
    # The test-only switch emulates fp8 on the CPU.
    monkeypatch.setenv(FP8_EMULATE_ENV, "1")
    check_fp8_compute(True, cpu)
    model = load_frozen_transformer(acc, "single", src, torch.float32, fp8_compute=True)
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 2 * 12 + 2 * 2
    assert fp8_compute_blocks(plain, cpu) == 2 * 12 + 2 * 2
    # Without torchao, what to install.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(
        QuantizationError, match=r"^model\.fp8_compute: needs torchao: pip install 'flux2-lora\[quant\]'"
    ):
        check_fp8_compute(True, cpu)


def test_fp8_compute_with_a_quantized_base_or_a_bad_value_is_one_line() -> None:
    from flux2_lora.cli import parse_train

    recipe = Recipe()
    recipe.model.fp8_compute, recipe.model.quantize = True, "int8"
    with pytest.raises(RecipeError, match=r"^model\.fp8_compute: cannot be combined with model\.quantize: int8"):
        validate(recipe, need_data=False)
    with pytest.raises(UsageError, match=r"^model\.fp8_compute: must be a bool") as e:
        parse_train(["--preset", "tiny", "--model.fp8_compute", "maybe"])
    assert "\n" not in str(e.value)
    recipe, _ = parse_train(["--preset", "tiny", "--model.fp8_compute", "true"])
    assert recipe.model.fp8_compute is True
