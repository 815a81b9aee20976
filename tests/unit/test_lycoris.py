"""LoKr and LoHa (`lora.type: lokr | loha`) on tensors: PEFT's adapters, the file training writes, what diffusers'
converter, ComfyUI's formula and our reader make of it, other trainers' LyCORIS files, inspect, the one-line
refusals, and the memory planner's count (the pipeline and training checks are in integration/test_lycoris_train)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux2_lora import interop
from flux2_lora.cli import main
from flux2_lora.interop import LoraFileError
from tests.support.lycoris import peft_deltas, random_adapter, save_adapter

TOL = 1e-6  # largest |difference| of an update allowed (fp32 rounding of the scale multiplied into a factor)
# (kind, rank): LoKr rank 2 splits w2 into w2_a @ w2_b on the tiny model's 32-wide layers; rank 8 keeps it whole.
CASES = [("lokr", 2), ("lokr", 8), ("loha", 4)]


@pytest.fixture(scope="module")
def adapters(tiny_dev: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], tuple[Any, Path]]:
    """Each case's PEFT transformer (alpha = 1.5 x rank, random factors) and the file save_lora wrote for it."""
    out = {}
    folder = tmp_path_factory.mktemp("lycoris")
    for kind, rank in CASES:
        transformer, config = random_adapter(tiny_dev, kind, rank=rank, alpha=1.5 * rank)
        out[(kind, rank)] = (
            transformer,
            save_adapter(transformer, config, tiny_dev, folder / f"{kind}{rank}.safetensors"),
        )
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_add_lora_builds_peft_lokr_and_loha_that_start_at_zero(tiny_dev: Path) -> None:
    from peft.tuners.lokr.layer import factorization

    from flux2_lora.config import ModelArgs
    from flux2_lora.model import add_lora, load_transformer, resolve_model

    for kind, rank in CASES:
        transformer = load_transformer(resolve_model(ModelArgs(name_or_path=str(tiny_dev))), torch.float32)
        config = add_lora(transformer, rank, None, 0.1, "attention", "gaussian", kind)
        assert config["peft_type"] == kind.upper() and config["r"] == config["alpha"] == rank
        assert config["rank_dropout"] == 0.1  # lora.dropout is PEFT's rank_dropout for these
        deltas = peft_deltas(transformer)
        assert len(deltas) == 2 * 4 and all(not d.any() for d in deltas.values())  # step 0 is the base model
        trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
        assert all(p.dtype == torch.float32 for p in transformer.parameters() if p.requires_grad)
        # By hand, per 32x32 attention linear: LoHa 2 x r x (in + out); LoKr w1 (a x c) and w2 (b x d), w2 split into
        # r x (b + d) when r < max(b, d) / 2, with 32 = a x b = c x d as PEFT factorizes it.
        (a, b), (c, d) = factorization(32, -1), factorization(32, -1)
        per = 2 * rank * 64 if kind == "loha" else a * c + (rank * (b + d) if rank < max(b, d) / 2 else b * d)
        assert trainable == 8 * per, (kind, rank)


@pytest.mark.parametrize("case", CASES, ids=[f"{k}{r}" for k, r in CASES])
def test_the_file_holds_peft_names_with_the_scale_in_the_first_factor(
    case: tuple[str, int], adapters: dict[tuple[str, int], tuple[Any, Path]]
) -> None:
    kind, rank = case
    transformer, path = adapters[case]
    tensors = load_file(str(path))
    suffixes = {k.rpartition(".")[2] for k in tensors}
    expected = {
        ("lokr", 2): {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
        ("lokr", 8): {"lokr_w1", "lokr_w2"},
        ("loha", 4): {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    }[case]
    assert suffixes == expected and all(k.startswith("transformer.") for k in tensors)  # no `.alpha` tensors
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    config = json.loads(header["lora_adapter_metadata"])
    assert config["transformer.peft_type"] == kind.upper()
    assert config["transformer.r"] == config["transformer.alpha"] == rank  # scale 1 for every reader
    assert header["flux2_lora.type"] == kind and header["flux2_lora.scale_in_w1"] == "1.5"
    params = dict(transformer.named_parameters())
    first = "lokr_w1" if kind == "lokr" else "hada_w1_a"
    for k, t in tensors.items():
        mine = params[k.removeprefix("transformer.") + ".default"].detach()
        assert torch.allclose(t, mine * 1.5 if k.endswith(first) else mine, atol=0), k


def _comfyui_delta(f: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    """ComfyUI's update for one module (comfy/weight_adapter/lokr.py, loha.py): with no `.alpha` tensor the scale
    is 1; w2 = w2_a @ w2_b where split; LoKr kron(w1, w2), LoHa (w1_a @ w1_b) * (w2_a @ w2_b)."""
    g = {k.removeprefix(stem + "."): t.double() for k, t in f.items() if k.startswith(stem + ".")}
    assert f"{stem}.alpha" not in f
    if "hada_w1_a" in g:
        return (g["hada_w1_a"] @ g["hada_w1_b"]) * (g["hada_w2_a"] @ g["hada_w2_b"])
    w2 = g["lokr_w2"] if "lokr_w2" in g else g["lokr_w2_a"] @ g["lokr_w2_b"]
    return torch.kron(g["lokr_w1"], w2)


@pytest.mark.parametrize("case", CASES, ids=[f"{k}{r}" for k, r in CASES])
def test_our_reader_and_comfyuis_formula_give_the_trained_update(
    case: tuple[str, int], adapters: dict[tuple[str, int], tuple[Any, Path]]
) -> None:
    transformer, path = adapters[case]
    trained = peft_deltas(transformer)
    lora = interop.load_lora(path)
    assert lora.kind == case[0] and lora.format == "diffusers" and not lora.modules
    assert set(lora.ranks()) == {case[1]} and set(lora.alphas()) == {float(case[1])}  # alpha = rank in the file
    assert _max_diff({n: m.delta() for n, m in lora.lycoris.items()}, trained) < TOL
    tensors = load_file(str(path))
    comfy = {n: _comfyui_delta(tensors, f"transformer.{n}") for n in trained}
    assert _max_diff(comfy, trained) < TOL
    assert max(float(d.abs().max()) for d in trained.values()) > 0.1  # the comparison compares something


@pytest.mark.parametrize("case", [("lokr", 2), ("lokr", 8)], ids=["lokr2", "lokr8"])
def test_diffusers_builds_the_same_lokr_from_the_file(
    case: tuple[str, int], adapters: dict[tuple[str, int], tuple[Any, Path]], tiny_dev: Path
) -> None:
    """diffusers 0.42's Flux2 loader (lora_state_dict, then load_lora_adapter with the header's LoKrConfig, as
    load_lora_weights does) gives every module the trained update; and so does its shape-inferred config when the
    header is dropped (what a file stripped of metadata gets)."""
    from diffusers import Flux2Pipeline
    from diffusers import Flux2Transformer2DModel as T

    transformer, path = adapters[case]
    trained = peft_deltas(transformer)
    for with_header in (True, False):
        sd, md = Flux2Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        fresh = T.from_pretrained(tiny_dev / "transformer")
        fresh.load_lora_adapter(sd, prefix="transformer", metadata=md if with_header else None, adapter_name="x")
        got = {n: m.get_delta_weight("x").detach().double() for n, m in fresh.named_modules() if hasattr(m, "lokr_w1")}
        assert _max_diff(got, trained) < TOL, with_header


def test_other_trainers_lycoris_files_scale_as_lycoris_does(tmp_path: Path, tiny_dev: Path) -> None:
    """A LyCORIS-named file (SimpleTuner: `lycoris_<diffusers name with _>`) with `.alpha` tensors: alpha / rank where
    a factor is split, no scaling where LoKr's factors are whole; checked against diffusers' own LyCORIS converter."""
    from diffusers import Flux2Pipeline

    g = torch.Generator().manual_seed(3)
    split = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": torch.randn(8, 2, generator=g)}
    split["lokr_w2_b"] = torch.randn(2, 8, generator=g)
    whole = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2": torch.randn(8, 24, generator=g)}  # 32 x 96
    tensors = {f"lycoris_transformer_blocks_0_attn_to_q.{k}": v for k, v in split.items()}
    tensors |= {f"lycoris_single_transformer_blocks_1_attn_to_out.{k}": v for k, v in whole.items()}
    tensors["lycoris_transformer_blocks_0_attn_to_q.alpha"] = torch.tensor(8.0)  # scale 8 / 2 = 4
    tensors["lycoris_single_transformer_blocks_1_attn_to_out.alpha"] = torch.tensor(8.0)  # whole: scale 1
    save_file(tensors, str(tmp_path / "st.safetensors"))
    lora = interop.load_lora(tmp_path / "st.safetensors")
    assert lora.format == "lycoris" and lora.kind == "lokr"
    q, out = lora.lycoris["transformer_blocks.0.attn.to_q"], lora.lycoris["single_transformer_blocks.1.attn.to_out"]
    assert (q.rank, q.scale, out.scale) == (2, 4.0, 1.0)
    assert torch.allclose(q.delta(), 4 * torch.kron(split["lokr_w1"], split["lokr_w2_a"] @ split["lokr_w2_b"]).double())
    sd = Flux2Pipeline.lora_state_dict(str(tmp_path / "st.safetensors"))  # alpha baked into lokr_w1 by diffusers
    ours = {f"transformer.{n}": m.delta() for n, m in lora.lycoris.items()}
    for n, d in ours.items():
        w2 = sd[f"{n}.lokr_w2"] if f"{n}.lokr_w2" in sd else sd[f"{n}.lokr_w2_a"] @ sd[f"{n}.lokr_w2_b"]
        assert torch.allclose(d, torch.kron(sd[f"{n}.lokr_w1"], w2).double(), atol=1e-5), n
    info = interop.inspect_lora(str(tmp_path / "st.safetensors"))
    assert info["type"] == "lokr" and info["modules"] == 2 and info["fits"]  # its shapes fit the tiny model


def test_inspect_names_the_type(adapters: dict[tuple[str, int], tuple[Any, Path]]) -> None:
    for (kind, rank), (_, path) in adapters.items():
        info = interop.inspect_lora(str(path))
        assert info["type"] == kind and info["rank"] == rank and info["targets"] == "attention+single"
        assert info["fits"] == ["builtin:tiny-dev / builtin:tiny-klein"]
        text = interop.format_inspect(info)
        assert f"type        {'LoKr' if kind == 'lokr' else 'LoHa'}" in text and "format      diffusers" in text


def test_export_merge_input_and_bad_files_are_refused_in_one_line(
    adapters: dict[tuple[str, int], tuple[Any, Path]],
    tmp_path: Path,
    tiny_dev: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flux2_lora.config import ModelArgs
    from flux2_lora.model import resolve_model

    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    for (kind, _), (_, path) in adapters.items():
        name = "LoKr" if kind == "lokr" else "LoHa"
        for fmt in interop.EXPORT_FORMATS:
            assert main(["export", "--lora", str(path), "--format", fmt, "--output", str(tmp_path / "o.safetensors")])
            err = capsys.readouterr().err.strip()
            assert err.count("\n") == 0 and f"is a {name} adapter: export converts LoRA factors only" in err, err
            assert not (tmp_path / "o.safetensors").exists()
        with pytest.raises(LoraFileError, match=f"is a {name} adapter; only a plain LoRA can seed training"):
            interop.check_init_lora(str(path), src, 4, None, "attention+single")
    # Files no FLUX.2 reader could apply: a convolution (Tucker) LoKr, BFL's fused qkv, a missing factor.
    bad = {
        "tucker": {"transformer.transformer_blocks.0.attn.to_q.lokr_t2": torch.ones(2, 2, 1, 1)},
        "fused": {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.ones(4, 4)},
        "half": {"transformer.transformer_blocks.0.attn.to_q.hada_w1_a": torch.ones(32, 2)},
    }
    bad["tucker"] |= {"transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.ones(4, 4)}
    bad["fused"] |= {"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.ones(24, 8)}
    why = {"tucker": "has Tucker factors", "fused": "factors BFL's fused qkv", "half": "has no hada_w1_b factor"}
    for case, tensors in bad.items():
        save_file(tensors, str(tmp_path / f"{case}.safetensors"))
        with pytest.raises(LoraFileError, match=why[case]) as e:
            interop.load_lora(tmp_path / f"{case}.safetensors")
        assert "\n" not in str(e.value)


def test_recipe_refuses_init_from_with_lokr(tmp_path: Path) -> None:
    from flux2_lora.config import LoraArgs, Recipe, RecipeError, validate

    (tmp_path / "l.safetensors").write_bytes(b"")
    recipe = Recipe(lora=LoraArgs(type="loha", init_from=str(tmp_path / "l.safetensors")))
    with pytest.raises(RecipeError, match=r"lora.init_from: seeds a plain LoRA only, not lora.type: loha"):
        validate(recipe, need_data=False)


def test_system_optimize_counts_the_lokr_and_loha_factors() -> None:
    """The planner builds the adapter PEFT builds: FLUX.2-dev's 6144-wide attention linears on one double block."""
    from flux2_lora.memory import KNOWN_MODELS, ModelShape, Setup, estimate

    config = {**KNOWN_MODELS["black-forest-labs/FLUX.2-dev"]["transformer"], "num_layers": 1, "num_single_layers": 1}
    shape = ModelShape("one-block dev", "dev", config, 0.0, 0.0, "")
    counts = {}
    for kind in ("lora", "lokr", "loha"):
        setup = Setup(resolution=128, text_tokens=8, rank=16, adapter=kind, dtype="fp32", autocast=False)
        counts[kind] = estimate(shape, setup).params["lora"]
    # 4 linears of 6144 x 6144. LoRA: r (in + out); LoHa: twice that; LoKr: 6144 = 64 x 96, w1 64 x 64 whole and
    # w2 (96 x 96) split at rank 16 < 96 / 2 into 96 x 16 + 16 x 96.
    assert counts == {"lora": 4 * 16 * 12288, "loha": 4 * 2 * 16 * 12288, "lokr": 4 * (64 * 64 + 16 * (96 + 96))}


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha"])
def test_the_header_config_carries_no_dropout(kind: str, tiny_dev: Path, tmp_path: Path) -> None:
    """diffusers 0.42 leaves the adapter layers it injects in train mode: a dropout in the header's config would drop
    at inference (measured: a LoRA with lora_dropout 0.5 in its header gave images 0.13 apart on two calls)."""
    from flux2_lora.checkpoint import save_lora
    from flux2_lora.config import ModelArgs
    from flux2_lora.model import add_lora, load_transformer, pipeline_class, resolve_model

    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    transformer = load_transformer(src, torch.float32)
    config = add_lora(transformer, 4, None, 0.3, "attention", "gaussian", kind)
    path = save_lora(tmp_path / "a.safetensors", transformer, pipeline_class(src), config, {"rank": 4})
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads(f.metadata()["lora_adapter_metadata"])
    key = "transformer.lora_dropout" if kind == "lora" else "transformer.rank_dropout"
    assert config[key.removeprefix("transformer.")] == 0.3 and saved[key] == 0.0


def test_the_eval_commands_take_lokr_and_loha_files(adapters: dict[tuple[str, int], tuple[Any, Path]]) -> None:
    from flux2_lora.evaluate.generate import resolve_lora

    for (kind, _), (_, path) in adapters.items():
        ref = resolve_lora(path)
        assert ref.meta("type") == kind and any(f".{'lokr' if kind == 'lokr' else 'hada'}_" in k for k in ref.shapes)


def test_use_dora_stays_an_alias_of_type_dora() -> None:
    from flux2_lora.config import LoraArgs, Recipe, RecipeError, validate
    from flux2_lora.model import adapter_kind

    assert [adapter_kind(LoraArgs(**kw)) for kw in ({}, {"use_dora": True}, {"type": "dora"}, {"type": "loha"})] == [
        "lora",
        "dora",
        "dora",
        "loha",
    ]
    with pytest.raises(RecipeError, match="lora.use_dora: is the old name of lora.type: dora, but lora.type is lokr"):
        validate(Recipe(lora=LoraArgs(type="lokr", use_dora=True)), need_data=False)
