"""Interop on tensors: every layout against diffusers' own converters, format detection, fused qkv, metadata,
inspect, wrong-model errors and pickle refusal (no pipeline runs here; the image checks are in integration)."""

from __future__ import annotations

import json
import pickletools
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flux2_lora import interop
from flux2_lora.interop import LoraFile, LoraFileError, LoraModule
from tests.support.loras import make_random_lora, malicious_pickle

TOL = 1e-6  # largest |difference| of an update B @ A allowed after a conversion (fp32 rounding of the scale)


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> Path:
    return make_random_lora(tiny_dev, tmp_path_factory.mktemp("lora") / "lora.safetensors")


@pytest.fixture(scope="module")
def lora(lora_path: Path) -> LoraFile:
    return interop.load_lora(lora_path)


def _diffusers_deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's update as diffusers' own Flux2 loader converts the file (its scale from the header, or 1)."""
    from diffusers import Flux2Pipeline

    sd, md = Flux2Pipeline.lora_state_dict(str(path), return_lora_metadata=True)
    scale = md["transformer.lora_alpha"] / md["transformer.r"] if md else 1.0
    out = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            name = k.removeprefix("transformer.").removesuffix(".lora_A.weight")
            out[name] = scale * (sd[f"transformer.{name}.lora_B.weight"].double() @ sd[k].double())
    return out


def test_the_training_output_reads_as_diffusers(lora: LoraFile) -> None:
    assert lora.format == "diffusers"
    # Trained at alpha 6, rank 4: the scale 1.5 is in B and the file says alpha = rank (scale 1 for any reader).
    assert set(lora.ranks()) == {4} and set(lora.alphas()) == {4.0}
    assert lora.metadata["flux2_lora.alpha"] == "6.0" and lora.metadata["flux2_lora.scale_in_B"] == "1.5"
    assert interop.describe_targets(set(lora.modules)) == "all-linear"
    assert len(lora.modules) == 2 * 12 + 2 * 2  # 12 linears per double block, 2 per single block


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "kohya"])
def test_each_format_gives_the_same_updates_through_diffusers_converter(
    fmt: str, lora: LoraFile, tmp_path: Path
) -> None:
    out = interop.write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)
    deltas = _diffusers_deltas(out)
    assert set(deltas) == set(lora.modules)
    for name, m in lora.modules.items():
        assert (deltas[name] - m.delta()).abs().max() < TOL, name
    back = interop.load_lora(out)
    assert back.format == fmt and set(back.modules) == set(lora.modules)
    for name, m in lora.modules.items():
        assert (back.modules[name].delta() - m.delta()).abs().max() < TOL, name
        assert back.modules[name].rank == 4  # fused qkv splits back into the rank-4 pairs
    header = interop.load_lora(out).metadata
    for field in ("base_model", "family", "trigger", "rank", "alpha", "targets", "steps"):
        assert header[f"flux2_lora.{field}"] != "", field
    assert header["flux2_lora.format"] == fmt and header["flux2_lora.trigger"] == "sks"
    assert header["flux2_lora.rank"] == "4" and header["flux2_lora.steps"] == "7"
    # diffusers reads lora_adapter_metadata as the LoraConfig: only the diffusers layout may carry it.
    assert ("lora_adapter_metadata" in header) == (fmt == "diffusers")


def test_key_layouts(lora: LoraFile, tmp_path: Path) -> None:
    comfy = load_file(str(interop.write_lora(lora, tmp_path / "c.safetensors", "comfyui")))
    kohya = load_file(str(interop.write_lora(lora, tmp_path / "k.safetensors", "kohya")))
    q = lora.modules["transformer_blocks.0.attn.to_q"]
    a = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
    b = comfy["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
    assert a.shape == (12, q.down.shape[1]) and b.shape == (3 * q.up.shape[0], 12)  # stacked A, rank 3 x 4
    assert not b[: q.up.shape[0], 4:].any() and not b[q.up.shape[0] :, :4].any()  # block-diagonal B
    assert torch.equal(a[:4], q.down)
    assert "diffusion_model.single_blocks.1.linear1.lora_A.weight" in comfy
    assert "diffusion_model.double_blocks.1.txt_mlp.2.lora_B.weight" in comfy
    assert not any(k.endswith(".alpha") for k in comfy)  # the scale is in B
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == pytest.approx(12.0)  # 4 x 3: same scale
    assert kohya["lora_unet_single_blocks_0_linear2.alpha"].item() == pytest.approx(4.0)
    assert kohya["lora_unet_double_blocks_1_txt_attn_proj.lora_up.weight"].shape[1] == 4


def _module(out: int, inp: int, rank: int, alpha: float, seed: int) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), alpha)


def test_partial_qkv_and_unequal_scales_stay_exact(tmp_path: Path) -> None:
    """Only q and v adapted, with different ranks and alphas: the fused factors still reproduce both updates."""
    modules = {
        "transformer_blocks.0.attn.to_q": _module(32, 32, 2, 1.0, 1),
        "transformer_blocks.0.attn.to_v": _module(32, 32, 3, 9.0, 2),
        "single_transformer_blocks.0.attn.to_out": _module(32, 96, 2, 4.0, 3),
    }
    src = LoraFile(format="diffusers", modules=modules)
    for fmt in ("comfyui", "kohya"):
        out = interop.write_lora(src, tmp_path / f"{fmt}.safetensors", fmt)
        deltas = _diffusers_deltas(out)
        back = interop.load_lora(out)
        for name, m in modules.items():
            assert (deltas[name] - m.delta()).abs().max() < 1e-4, (fmt, name)
            assert (back.modules[name].delta() - m.delta()).abs().max() < 1e-4, (fmt, name)
        assert "transformer_blocks.0.attn.to_k" not in back.modules  # a zero part is no module


def test_other_layouts_are_detected_and_read(lora: LoraFile, lora_path: Path, tmp_path: Path) -> None:
    tensors = load_file(str(lora_path))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    layouts = {
        "peft": {f"base_model.model.{k}": v for k, v in bare.items()},
        "trainable": {
            k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
            for k, v in bare.items()
        },
        "ai-toolkit": {f"diffusion_model.{k}": v for k, v in bare.items()},
    }
    for name, sd in layouts.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        got = interop.load_lora(tmp_path / f"{name}.safetensors")
        assert got.format == {"trainable": "peft"}.get(name, name)
        assert set(got.modules) == set(lora.modules)
        # No alpha in these files: scale 1, the update is B @ A as stored.
        m = got.modules["transformer_blocks.0.attn.to_q"]
        assert m.scale == 1.0 and torch.equal(m.up, lora.modules["transformer_blocks.0.attn.to_q"].up)
    # A kohya file whose fused qkv shares one A (how trainers that train the fused layer write it): split exactly.
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(4, 32, generator=g), torch.randn(96, 4, generator=g)
    kohya = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
    }
    save_file(kohya, str(tmp_path / "shared.safetensors"))
    got = interop.load_lora(tmp_path / "shared.safetensors")
    assert got.format == "kohya" and got.fused_qkv
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        want = 0.5 * up[32 * i : 32 * (i + 1)].double() @ down.double()
        assert (got.modules[f"transformer_blocks.0.attn.{part}"].delta() - want).abs().max() < 1e-6


def test_targets_are_named_like_the_presets(tiny_dev: Path) -> None:
    from diffusers import Flux2Transformer2DModel

    from flux2_lora.model import add_lora

    config = interop.model_config(tiny_dev)
    for preset in ("attention", "attention+single", "all-linear"):
        with torch.device("meta"):
            model = Flux2Transformer2DModel.from_config(config)
        add_lora(model, 2, None, 0.0, preset, "default", False)
        names = {n.removesuffix(".lora_A.default.weight") for n, _ in model.named_parameters() if ".lora_A." in n}
        assert interop.describe_targets(names) == preset
    assert interop.describe_targets({"proj_out"}) == "custom: proj_out"


def test_the_tiny_shape_table_matches_the_tiny_model(tiny_dev: Path) -> None:
    config = interop.model_config(tiny_dev)
    assert interop.linear_shapes(config) == interop.linear_shapes(interop.TINY_TRANSFORMER)


def test_inspect_reports_format_rank_targets_and_the_model_it_fits(lora_path: Path, tmp_path: Path) -> None:
    info = interop.inspect_lora(str(lora_path))
    assert info["format"] == "diffusers" and info["rank"] == 4 and info["alpha"] == 4.0  # the scale is in B
    assert info["targets"] == "all-linear" and info["modules"] == 28
    tensors = load_file(str(lora_path))
    assert info["parameters"] == sum(t.numel() for t in tensors.values())
    assert info["fits"] == ["builtin:tiny-dev / builtin:tiny-klein"]
    assert "black-forest-labs/FLUX.2-dev" in info["does_not_fit"]
    assert info["metadata"]["flux2_lora.trigger"] == "sks"
    text = interop.format_inspect(info)
    assert "format      diffusers" in text and "fits        builtin:tiny-dev" in text
    comfy = interop.write_lora(interop.load_lora(lora_path), tmp_path / "c.safetensors", "comfyui")
    info = interop.inspect_lora(str(comfy))
    assert info["format"] == "comfyui" and info["fused_qkv"] and info["rank"] == 4


def test_a_lora_for_another_model_is_refused_in_one_line(lora: LoraFile, tiny_dev: Path) -> None:
    config = interop.model_config(tiny_dev)
    wrong = LoraFile(
        format="diffusers",
        modules={**lora.modules, "transformer_blocks.0.attn.to_q": _module(64, 32, 4, 4.0, 0)},
        path=Path("other.safetensors"),
    )
    with pytest.raises(LoraFileError) as e:
        interop.check_fits(wrong, config, "tiny", "lora.init_from")
    msg = str(e.value)
    assert "\n" not in msg and "other.safetensors does not fit tiny" in msg and "32x32 in the model, 64x32" in msg
    deeper = LoraFile(format="diffusers", modules={"transformer_blocks.7.attn.to_q": _module(32, 32, 4, 4.0, 0)})
    with pytest.raises(LoraFileError, match="the model has no transformer_blocks.7.attn.to_q"):
        interop.check_fits(deeper, config, "tiny", "--lora")
    klein = LoraFile(format="diffusers", modules=lora.modules, metadata={"flux2_lora.family": "klein"})
    with pytest.raises(LoraFileError, match="trained on FLUX.2 klein .* this model is FLUX.2 dev"):
        interop.check_family(klein, "dev", "lora.init_from")


def test_init_checks_targets_and_rank_before_training(lora_path: Path, tiny_dev: Path) -> None:
    from flux2_lora.config import ModelArgs
    from flux2_lora.model import resolve_model

    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    assert interop.check_init_lora(str(lora_path), src, 4, 2.0, "all-linear").format == "diffusers"
    with pytest.raises(LoraFileError, match="lora.targets=attention does not train"):
        interop.check_init_lora(str(lora_path), src, 4, None, "attention")
    with pytest.raises(LoraFileError, match="has rank 4, the recipe's lora.rank is 8; set --rank 4"):
        interop.check_init_lora(str(lora_path), src, 8, None, "all-linear")


@pytest.mark.parametrize(
    "name,kind",
    [
        ("evil.ckpt", "pickle-based .ckpt file"),
        ("evil.bin", "pickle-based .bin file"),
        ("evil.pt", "pickle-based .pt file"),
        ("evil.safetensors", "it holds a pickle"),
    ],
)
def test_pickle_files_are_refused_without_unpickling(name: str, kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(malicious_pickle(marker))
    with pytest.raises(LoraFileError) as e:
        interop.load_lora(path)
    msg = str(e.value)
    assert kind in msg and "arbitrary code" in msg and "\n" not in msg
    assert not marker.exists()
    # The file is live (it would call open(marker, "w") when unpickled): read its opcodes, without running them.
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(path.read_bytes())]
    assert ("SHORT_BINUNICODE", "open") in ops and ("SHORT_BINUNICODE", str(marker)) in ops
    assert any(op == "REDUCE" for op, _ in ops)


def test_torch_save_archives_and_junk_are_refused(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(LoraFileError, match="torch.save zip archive"):
        interop.load_lora(tmp_path / "x.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a tensor file")
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        interop.load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoraFileError, match="does not exist"):
        interop.load_lora(tmp_path / "missing.safetensors")
    save_file({"text_model.weight": torch.zeros(2)}, str(tmp_path / "notlora.safetensors"))
    with pytest.raises(LoraFileError, match="not a FLUX.2 LoRA in a known layout"):
        interop.load_lora(tmp_path / "notlora.safetensors")


def test_a_run_folder_means_its_lora(lora_path: Path) -> None:
    assert interop.load_lora(lora_path.parent).path == lora_path
    with safe_open(str(lora_path), framework="pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.r"] == 4


def test_a_model_folder_with_pickled_weights_is_refused(tmp_path: Path) -> None:
    from flux2_lora.model import ModelError, ModelSource, load_transformer

    marker = tmp_path / "unpickled"
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(interop.TINY_TRANSFORMER))
    (tmp_path / "transformer" / "diffusion_pytorch_model.bin").write_bytes(malicious_pickle(marker))
    src = ModelSource(path=tmp_path, family="dev", text_layers=(10, 20, 30), pipeline_class="Flux2Pipeline")
    with pytest.raises(ModelError, match="no .safetensors weights .only diffusion_pytorch_model.bin.; pickle-based"):
        load_transformer(src, torch.float32)
    assert not marker.exists()


def test_dora_adapters_are_not_converted_or_merged(lora: LoraFile, tmp_path: Path) -> None:
    dora = LoraFile(format="diffusers", modules=lora.modules, dora=True, path=Path("dora.safetensors"))
    for fmt in interop.EXPORT_FORMATS:
        with pytest.raises(LoraFileError, match="dora.safetensors is a DoRA adapter"):
            interop.write_lora(dora, tmp_path / f"{fmt}.safetensors", fmt)


def test_the_scale_is_in_b_so_a_reader_that_ignores_the_header_applies_the_same_update(
    tmp_path: Path, tiny_dev: Path
) -> None:
    """Trained with alpha = 2 x rank: the file's B is twice the trained B and its header says alpha = rank, so a
    loader that applies scale 1 (ComfyUI's, for a diffusers-format file) gets alpha/rank x B @ A."""
    plain = load_file(str(make_random_lora(tiny_dev, tmp_path / "a4.safetensors", rank=4, alpha=4.0)))
    double = make_random_lora(tiny_dev, tmp_path / "a8.safetensors", rank=4, alpha=8.0)
    folded = load_file(str(double))
    assert plain.keys() == folded.keys()
    for k in plain:
        assert torch.equal(folded[k], 2 * plain[k] if ".lora_B." in k else plain[k]), k
    with safe_open(str(double), framework="pt") as f:
        header = f.metadata()
    config = json.loads(header["lora_adapter_metadata"])
    assert config["transformer.r"] == config["transformer.lora_alpha"] == 4
    assert header["flux2_lora.alpha"] == "8.0" and header["flux2_lora.scale_in_B"] == "2.0"
    # Our reader and diffusers' converter agree: scale 1, the same update.
    for name, delta in _diffusers_deltas(double).items():
        m = interop.load_lora(double).modules[name]
        assert m.scale == 1.0 and (delta - m.delta()).abs().max() < TOL, name
