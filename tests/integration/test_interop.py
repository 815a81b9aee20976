"""Interop on the tiny FLUX.2 model, checked by diffusers' own loaders: every exported layout gives the same image,
the merged model gives the image of base + LoRA, a run started from a LoRA starts at that LoRA's loss, and the
commands (export, export --merge, lora inspect, train --init-lora) answer bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flux2_lora import interop
from tests.conftest import first_images, run_cli
from tests.support.loras import make_random_lora, malicious_pickle

# Largest per-pixel difference (images in [0, 1]) between the original LoRA's image and an exported layout's or the
# merged model's, in fp32 on the CPU; a wrong conversion moves the image by far more than this (see MIN_EFFECT).
IMAGE_TOL = 1e-5  # measured: at most 1.5e-6 (comfyui 1.3e-6, kohya 1.4e-6, merged 1.5e-6, diffusers 0)
MIN_EFFECT = 0.02  # the LoRA must change the image by at least this much, or the comparison proves nothing
LOSS_TOL = 1e-6


PROMPT = "sks a red circle on a blue background"
_EMBEDS: dict[str, torch.Tensor] = {}


def _generate(pipe: Any) -> np.ndarray:
    """One fixed-seed image; the prompt is encoded once (the LoRA lives in the transformer only)."""
    if "prompt" not in _EMBEDS:
        _EMBEDS["prompt"] = pipe.encode_prompt(prompt=PROMPT, max_sequence_length=64)[0]
    out = pipe(
        prompt_embeds=_EMBEDS["prompt"],
        height=64,
        width=64,
        num_inference_steps=4,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0])


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> Path:
    return make_random_lora(tiny_dev, tmp_path_factory.mktemp("interop") / "lora.safetensors")


@pytest.fixture(scope="module")
def images(lora_path: Path, tiny_dev: Path) -> dict[str, np.ndarray]:
    """Base image, the diffusers-format LoRA's image, and each exported layout's, all through Flux2Pipeline."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(tiny_dev)
    pipe.set_progress_bar_config(disable=True)
    out = {"base": _generate(pipe)}
    lora = interop.load_lora(lora_path)
    for fmt in ("original", "unfolded", "diffusers", "comfyui", "kohya"):
        if fmt == "original":
            path = lora_path
        elif fmt == "unfolded":
            path = _unfolded(lora_path)
        else:
            path = interop.write_lora(lora, lora_path.with_name(f"{fmt}.safetensors"), fmt)
        pipe.load_lora_weights(str(path), adapter_name=fmt.replace("-", "_"))
        n_loaded = sum(1 for k in pipe.transformer.state_dict() if f".{fmt}." in k and ".lora_A." in k)
        assert n_loaded == len(lora.modules), fmt  # every module got its LoRA (q, k, v split back by diffusers)
        out[fmt] = _generate(pipe)
        pipe.delete_adapters(fmt)
    return out


def _unfolded(path: Path) -> Path:
    """The file as training wrote it before the scale went into B: B / scale, the recipe's alpha in the header."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    scale = float(header["flux2_lora.scale_in_B"])
    assert scale != 1.0  # the fixture's alpha differs from its rank, or this compares nothing
    config = json.loads(header["lora_adapter_metadata"])
    config["transformer.lora_alpha"] = config["transformer.r"] * scale
    header["lora_adapter_metadata"] = json.dumps(config)
    out = path.with_name("unfolded.safetensors")
    save_file({k: v / scale if ".lora_B." in k else v for k, v in tensors.items()}, str(out), metadata=header)
    return out


@pytest.mark.parametrize("fmt", ["unfolded", "diffusers", "comfyui", "kohya"])
def test_each_exported_format_gives_the_same_image_in_diffusers(fmt: str, images: dict[str, np.ndarray]) -> None:
    """`unfolded`: the file written the earlier way (scale in the header) gives the same image as today's."""
    assert np.abs(images["original"] - images["base"]).max() > MIN_EFFECT
    np.testing.assert_allclose(images[fmt], images["original"], atol=IMAGE_TOL, rtol=0)


def test_export_command_writes_comfyui_and_refuses_bad_input(
    lora_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux2_lora.cli import main

    out = tmp_path / "comfy.safetensors"
    assert main(["export", "--lora", str(lora_path), "--format", "comfyui", "--output", str(out)]) == 0
    assert interop.load_lora(out).format == "comfyui" and "wrote" in capsys.readouterr().out
    assert main(["export", "--lora", str(lora_path), "--format", "a1111", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "flux2-lora: error: --format: must be one of diffusers, comfyui, kohya (got a1111)"


def test_merged_model_gives_the_image_of_base_plus_lora(
    lora_path: Path, tiny_dev: Path, tmp_path: Path, images: dict[str, np.ndarray]
) -> None:
    from diffusers import Flux2Pipeline
    from safetensors.torch import load_file

    merged = tmp_path / "merged"
    res = run_cli(
        "export", "--merge", "--lora", str(lora_path), "--model", str(tiny_dev), "--output", str(merged),
        "--max-shard-size", "100KB",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    shards = sorted((merged / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (merged / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert json.loads((merged / interop.MERGE_INFO).read_text())["scale"] == 1.0
    pipe = Flux2Pipeline.from_pretrained(merged)
    pipe.set_progress_bar_config(disable=True)
    assert not any("lora" in k for k in pipe.transformer.state_dict())
    np.testing.assert_allclose(_generate(pipe), images["original"], atol=IMAGE_TOL, rtol=0)
    # --scale 0.5: every merged weight is the base weight plus half the LoRA's update.
    half = interop.merge_lora(str(lora_path), str(tiny_dev), tmp_path / "half", scale=0.5)
    base = load_file(str(tiny_dev / "transformer" / "diffusion_pytorch_model.safetensors"))
    fused = {k: v for f in (half / "transformer").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    lora = interop.load_lora(lora_path)
    assert fused.keys() == base.keys()
    for name, m in lora.modules.items():
        want = base[f"{name}.weight"].double() + 0.5 * m.delta()
        assert (fused[f"{name}.weight"].double() - want).abs().max() < 1e-6, name
    untouched = [k for k in base if k.removesuffix(".weight") not in lora.modules]
    assert untouched and all(torch.equal(fused[k], base[k]) for k in untouched)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_run_started_from_a_lora_starts_at_its_loss(
    layout: str, lora_path: Path, tiny_dev: Path, sample_data: Path, tmp_path: Path
) -> None:
    """First-step training loss and step-0 validation loss equal those of the LoRA loaded by diffusers' loader.

    `diffusers`: `--init-lora` of the training output itself (alpha/rank folded into lora_B, header alpha = rank)
    continues at the same update; `kohya`: the same LoRA exported to another layout does too."""
    from flux2_lora.cli import parse_train
    from flux2_lora.draws import draw_batch
    from flux2_lora.flow import flow_loss
    from flux2_lora.model import load_transformer, pipeline_class
    from flux2_lora.train import Trainer

    start = lora_path
    if layout != "diffusers":
        start = interop.write_lora(interop.load_lora(lora_path), tmp_path / f"{layout}.safetensors", layout)
    assert layout != "diffusers" or float(interop.load_lora(start).metadata["flux2_lora.scale_in_B"]) != 1.0
    mini = first_images(sample_data, tmp_path / "mini", 3)
    recipe, _ = parse_train(
        ["--preset", "tiny", "--output", str(tmp_path / "run"), "--init-lora", str(start), "--rank", "4",
         "--dataset", str(mini), "--data.holdout", "1",
         "--lora.alpha", "2", "--lora.targets", "all-linear", "--steps", "1", "--validation.prompts", "[]",
         "--validation.every_n_steps", "0", "--logging.log_every", "1", "--output.checkpoint_every", "0"]
    )  # fmt: skip
    trainer = Trainer(recipe)
    trainer.setup()
    # The reference: the original diffusers-format file, loaded by diffusers into a fresh transformer.
    ref = load_transformer(trainer.src, torch.float32)
    cls = pipeline_class(trainer.src)
    sd, md = cls.lora_state_dict(str(lora_path), return_lora_metadata=True)
    cls.load_lora_into_transformer(sd, transformer=ref, metadata=md)
    batch = next(trainer._batches())
    latents, embeds, sigmas, noise, *_ = draw_batch(batch, recipe.data, recipe.training, trainer.empty_embeds)
    img_ids, txt_ids = trainer._position_ids(latents, embeds)
    guidance = trainer.guidance.expand(len(latents)) if trainer.guidance is not None else None
    args = (latents, embeds, sigmas, noise, img_ids, txt_ids, guidance, recipe.training.loss_weighting)
    with torch.no_grad():
        ref_loss = float(flow_loss(ref, *args))
        ref.disable_lora()
        base_loss = float(flow_loss(ref, *args))
        ref.enable_lora()
    own, trainer.model = trainer.model, ref
    ref_val = trainer.validation_loss()
    trainer.model = own
    trainer.fit()
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(m["loss"] for m in metrics if m.get("step") == 1 and "loss" in m)
    val0 = next(m["val_loss"] for m in metrics if m.get("step") == 0 and "val_loss" in m)
    assert abs(ref_loss - base_loss) > 1000 * LOSS_TOL  # the LoRA matters to the loss
    assert first == pytest.approx(ref_loss, rel=LOSS_TOL, abs=LOSS_TOL)
    assert val0 == pytest.approx(ref_val, rel=LOSS_TOL, abs=LOSS_TOL)


def test_train_refuses_a_lora_of_another_family_in_one_line(
    tiny_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux2_lora.cli import main

    klein = make_random_lora(
        tiny_dev, tmp_path / "klein.safetensors", rank=8, targets="attention+single", family="klein"
    )
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--output", str(tmp_path / "run"), "--init-lora", str(klein)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flux2-lora: error: lora.init_from: ")
    assert "was trained on FLUX.2 klein" in lines[0] and "this model is FLUX.2 dev" in lines[0]
    assert not (tmp_path / "run" / "cache").exists()  # refused before the cache stage


def test_inspect_command_and_pickle_refusal(
    lora_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux2_lora.cli import main

    marker = tmp_path / "unpickled"
    evil = tmp_path / "lora.ckpt"
    evil.write_bytes(malicious_pickle(marker))
    res = run_cli("lora", "inspect", str(evil))
    assert res.returncode == 2 and not marker.exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickle-based .ckpt file" in lines[0] and "arbitrary code" in lines[0]
    for cmd in (
        ["export", "--format", "kohya", "--output", str(tmp_path / "k.safetensors"), "--lora"],
        ["export", "--merge", "--model", "builtin:tiny-dev", "--output", str(tmp_path / "m"), "--lora"],
    ):
        assert main([*cmd, str(evil)]) == 2
        assert "refused without opening it" in capsys.readouterr().err
    assert not marker.exists()
    assert main(["lora", "inspect", str(lora_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["rank"] == 4 and info["targets"] == "all-linear"
