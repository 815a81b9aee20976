"""Quantized base and block swapping at the module level: which layers are quantized, one-line errors, the swap
schedule (where each block lives before and after each forward and backward) and exact LoRA training with swapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from flux2_lora.config import Recipe, RecipeError, validate
from flux2_lora.model import ModelError, add_lora, enable_checkpointing
from flux2_lora.quant import QuantizationError, check_quantize, quantize_blocks, quantized_count
from flux2_lora.swap import attach_block_swap
from tests.conftest import reset_accelerate


def _model(tiny_dev: Path) -> Any:
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer")
    model.requires_grad_(False)
    return model


def _step_inputs(model: Any, seed: int, references: bool = False) -> tuple[Any, ...]:
    """One step's inputs; with references, two clean reference grids (4x4, 2x6) follow the target's tokens."""
    from flux2_lora.flow import latent_ids, pack_references, reference_ids, text_ids

    g = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    x = torch.randn(1, model.config.in_channels, 4, 4, generator=g)
    embeds = torch.randn(1, 8, model.config.joint_attention_dim, generator=g)
    sigmas = torch.rand(1, generator=g)
    noise = torch.randn(1, model.config.in_channels, 4, 4, generator=g)
    img_ids, refs = latent_ids(1, 4, 4, cpu), None
    if references:
        c = model.config.in_channels
        refs = pack_references([torch.randn(1, c, 4, 4, generator=g), torch.randn(1, c, 2, 6, generator=g)])
        img_ids = torch.cat([img_ids, reference_ids([(4, 4), (2, 6)], 1, cpu)], dim=1)
    return x, embeds, sigmas, noise, img_ids, text_ids(1, 8, cpu), torch.full((1,), 4.0), refs


def _train(model: Any, steps: int, references: bool = False) -> dict[str, torch.Tensor]:
    from flux2_lora.flow import flow_loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        *inputs, refs = _step_inputs(model, step, references)
        flow_loss(model, *inputs, references=refs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora_model(tiny_dev: Path, seed: int = 0) -> Any:
    model = _model(tiny_dev)
    torch.manual_seed(seed)
    add_lora(model, 4, 4, 0.0, "attention+single", "gaussian", False)
    enable_checkpointing(model, 1)
    return model


# --------------------------------------------------------------------------------------------- quantization


def test_int8_quantizes_only_block_linears_and_keeps_the_rest_in_high_precision(tiny_dev: Path) -> None:
    pytest.importorskip("torchao")
    model = _model(tiny_dev)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    n = quantize_blocks(model, "int8", "cpu")
    per_double, per_single = 12, 2  # attention, added-stream attention and both feed-forwards; fused qkv+mlp, out
    assert n == 2 * per_double + 2 * per_single == quantized_count(model)
    for name, p in model.named_parameters():
        quantized = type(p).__module__.startswith("torchao") or type(p.data).__module__.startswith("torchao")
        in_block = "transformer_blocks." in name and name.endswith(".weight") and "norm" not in name
        if not in_block:  # embeddings, modulation, norm_out, proj_out, block norms, biases: untouched
            assert not quantized, name
            assert torch.equal(p.detach(), ref[name]), name
    w = model.transformer_blocks[0].attn.to_q.weight
    assert type(w).__name__ == "Int8Tensor"
    err = (w.dequantize() - ref["transformer_blocks.0.attn.to_q.weight"]).abs().max()
    assert err <= ref["transformer_blocks.0.attn.to_q.weight"].abs().max() / 127 + 1e-6  # one int8 step at most


def test_gpu_only_quantizations_fail_on_the_cpu_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    check_quantize("none", cpu)
    check_quantize("int8", cpu)
    for kind, hint in (("nf4", "int8"), ("fp8", "int8")):
        with pytest.raises(QuantizationError, match=rf"^model\.quantize: {kind} .*{hint}") as e:
            check_quantize(kind, cpu)
        assert "\n" not in str(e.value)
    assert issubclass(QuantizationError, ModelError)  # the CLI prints it as one line, no traceback
    # fp8 on a GPU older than Ada/Hopper (compute capability < 8.9).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _d=None: (8, 0))
    with pytest.raises(QuantizationError, match=r"fp8 needs compute capability >= 8\.9, this GPU has 8\.0"):
        check_quantize("fp8", torch.device("cuda"))
    # A missing library says what to install.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(QuantizationError, match=r"int8 needs torchao: pip install 'flux2-lora\[quant\]'"):
        check_quantize("int8", cpu)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(QuantizationError, match=r"nf4 needs bitsandbytes"):
        check_quantize("nf4", torch.device("cuda"))


@pytest.mark.parametrize("name", ["black-forest-labs/FLUX.2-dev", "black-forest-labs/FLUX.2-klein-4B"])
def test_nf4_skip_list_leaves_exactly_the_block_linears_to_bitsandbytes(name: str) -> None:
    """diffusers' own bitsandbytes module replacement, run on the real module tree (meta device, full depth): the
    linears it turns into Linear4bit are exactly the ones memory.is_quantizable (and the int8 path) selects."""
    bnb = pytest.importorskip("bitsandbytes")
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    from flux2_lora.memory import KNOWN_MODELS, build_meta_transformer, is_quantizable
    from flux2_lora.quant import bnb_config

    config = KNOWN_MODELS[name]["transformer"]
    model = build_meta_transformer(config, torch.bfloat16)
    cfg = bnb_config("nf4", torch.bfloat16)
    skip = list(cfg.llm_int8_skip_modules)
    top = {n for n, _ in model.named_children()}
    assert set(skip) <= top, set(skip) - top  # no stale names: each one is a top-level module of the model
    want = {n for n, m in model.named_modules() if is_quantizable(n, m)}
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=cfg)
    got = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert got == want, sorted(got ^ want)
    per_double, per_single = 12, 2
    assert len(got) == per_double * config["num_layers"] + per_single * config["num_single_layers"]
    left = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}  # kept at the model dtype
    assert left and all(n.split(".")[0] in skip for n in left), sorted(left)


def test_recipe_checks_block_swap_settings() -> None:
    r = Recipe()
    r.data.dataset = "x"
    r.model.blocks_to_swap = 2
    validate(r, need_data=False)
    for field, value, reason in (
        ("gradient_checkpointing", False, "needs model.gradient_checkpointing: true"),
        ("gradient_checkpointing_every", 2, "gradient_checkpointing_every: 1"),
        ("quantize", "nf4", "cannot be combined with model.quantize: nf4"),
    ):
        bad = Recipe()
        bad.model.blocks_to_swap = 2
        setattr(bad.model, field, value)
        with pytest.raises(RecipeError, match=rf"^model\.blocks_to_swap: .*{reason}"):
            validate(bad, need_data=False)
    bad = Recipe()
    bad.model.blocks_to_swap = -1
    with pytest.raises(RecipeError, match=r"^model\.blocks_to_swap: must be >= 0"):
        validate(bad, need_data=False)


# --------------------------------------------------------------------------------------------- block swapping


def test_swap_schedule_moves_each_block_in_before_and_out_after_forward_and_backward(tiny_dev: Path) -> None:
    model = _lora_model(tiny_dev)
    swapper = attach_block_swap(model, 3, "cpu")  # blocks 1, 2, 3 of 4 (1 double + 2 single... in run order)
    swapper.copies = True  # on the CPU nothing needs to move; force the tensor replacement to run anyway
    assert sorted(swapper.slots) == [1, 2, 3] and set(swapper.location.values()) == {"host"}
    seen: list[tuple[int, str]] = []
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    for i in (1, 2, 3):  # registered after the swapper's hooks: sees the block while it runs
        blocks[i].register_forward_pre_hook(lambda _m, _a, i=i: seen.append((i, swapper.location[i])))
    lora_ids = {id(p) for p in model.parameters() if p.requires_grad}
    from flux2_lora.flow import flow_loss

    model.train()
    flow_loss(model, *_step_inputs(model, 0)[:-1]).backward()
    expected = [(p, i, a) for p, order in (("forward", (1, 2, 3)), ("backward", (3, 2, 1))) for i in order
                for a in ("in", "out")]  # fmt: skip
    assert swapper.events == expected
    assert seen == [(i, "device") for i in (1, 2, 3, 3, 2, 1)]  # forward, then the recompute in backward
    assert set(swapper.location.values()) == {"host"}  # and all back in host memory after the step
    # The LoRA never moves: the same parameter objects, each with its gradient.
    assert {id(p) for p in model.parameters() if p.requires_grad} == lora_ids
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Without grad (validation, sampling): forward only, each block in and out once.
    swapper.events.clear()
    with torch.no_grad():
        flow_loss(model, *_step_inputs(model, 1)[:-1])
    assert swapper.events == [("forward", i, a) for i in (1, 2, 3) for a in ("in", "out")]


@pytest.mark.parametrize("references", [False, True])
def test_training_with_block_swap_gives_the_same_lora_exactly(tiny_dev: Path, references: bool) -> None:
    plain = _train(_lora_model(tiny_dev), 3, references)
    model = _lora_model(tiny_dev)
    swapper = attach_block_swap(model, 4, "cpu")
    swapper.copies = True
    swapped = _train(model, 3, references)
    assert plain.keys() == swapped.keys()
    assert all(torch.equal(plain[k], swapped[k]) for k in plain)
    assert len(swapper.events) == 3 * 4 * 4  # per step, per block: in/out in forward and in backward


def test_swap_needs_a_block_count_within_the_model(tiny_dev: Path) -> None:
    with pytest.raises(ModelError, match=r"model\.blocks_to_swap: must be between 1 and 4"):
        attach_block_swap(_lora_model(tiny_dev), 5, "cpu")


def test_train_on_the_cpu_with_nf4_stops_in_one_line_before_the_cache_stage(
    tiny_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    from flux2_lora.cli import main

    try:
        rc = main(["train", "--preset", "tiny", "--output", str(tmp_path / "run"), "--model.quantize", "nf4"])
    finally:
        reset_accelerate()
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("flux2-lora: error: model.quantize: nf4") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run" / "cache").exists()


def test_memory_plan_counts_swapped_blocks_and_recommends_int8_then_swapping() -> None:
    from flux2_lora.memory import GiB, Setup, estimate, model_shape
    from flux2_lora.system import needed, recommendations

    shape = model_shape("black-forest-labs/FLUX.2-dev")
    base = Setup(resolution=512)
    full, int8 = estimate(shape, base), estimate(shape, Setup(resolution=512, quantize="int8"))
    swapped = estimate(shape, Setup(resolution=512, quantize="int8", blocks_to_swap=40))

    def frozen(e: Any) -> float:
        return next(v for k, v in e.parts.items() if k.startswith("frozen"))

    # 56 blocks hold nearly all weights; 40 swapped leave 16 plus two in flight (single blocks ~ half a double).
    assert 29 < frozen(full) / GiB - frozen(int8) / GiB < 30.5
    assert 0.35 < frozen(swapped) / frozen(int8) < 0.5
    assert "40 blocks swapped to host" in next(k for k in swapped.parts if k.startswith("frozen"))
    recs = recommendations(shape, base, 23.6)
    texts = [t for t, _ in recs]
    assert any(t.startswith("model.quantize: int8") for t in texts)
    swap = next(t for t in texts if t.startswith("model.blocks_to_swap"))
    assert needed(recs[-1][1]) <= 23.6 and recs[-1][0] == swap  # the fewest swapped blocks that fit, in steps of 8


@pytest.mark.slow
def test_bench_gpu_fit_section_runs_at_toy_width_on_the_cpu(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    pytest.importorskip("torchao")
    out = tmp_path / "bench.json"
    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_gpu.py"
    res = subprocess.run(
        [sys.executable, str(script), "--toy", "--fit", "on", "--resolutions", "64", "--steps", "1", "--warmup", "1",
         "--text-tokens", "16", "--depths", "1,2", "--checkpointing", "on", "--fit-depth", "1,2",
         "--quantize", "none", "int8", "nf4", "--swap", "0", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["quantize"], r["blocks_to_swap"]): r for r in json.loads(out.read_text())["fit"]}
    assert set(rows) == {("none", 0), ("none", 2), ("int8", 0), ("int8", 2)}  # nf4 needs a GPU: skipped
    assert "nf4 (bitsandbytes 4-bit) needs a CUDA GPU" in res.stdout
    assert rows["none", 2]["equal_to_unswapped"] and rows["int8", 2]["equal_to_unswapped"]
    assert rows["none", 0]["lora_rel_diff"] == 0.0 and 0.0 < rows["int8", 0]["lora_rel_diff"] < 0.05
