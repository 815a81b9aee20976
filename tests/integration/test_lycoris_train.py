"""LoKr and LoHa end to end on the tiny FLUX.2 model, in-process: training, a bitwise resume, the written file in
Flux2Pipeline (the trained model's image, same seed), export --merge, and `lora inspect`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flux2_lora import interop
from flux2_lora.cli import main, parse_train
from flux2_lora.train import Trainer
from tests.conftest import reset_accelerate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]

IMAGE_TOL = 1e-5  # per pixel in [0, 1], fp32 on the CPU; measured 1.3e-6 to 1.6e-6 (alpha/r multiplied into w1)
MIN_EFFECT = 1e-3  # the adapter must change the image at least this much, or the comparison proves nothing


def _train(out: Path, kind: str, *extra: str) -> Trainer:
    recipe, resume = parse_train(
        ["--preset", "tiny", "--output", str(out), "--lora.type", kind, "--lora.alpha", "16", "--lora.dropout", "0.1"]
        + ["--steps", "4", "--output.checkpoint_every", "2", "--output.keep_last", "5", "--lr", "2e-2"]
        + ["--validation.prompts", "[]", "--validation.every_n_steps", "0", *extra]
    )
    trainer = Trainer(recipe, resume)
    trainer.setup()
    trainer.fit()
    return trainer


def _generate(pipe: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="sks a red circle on a blue background",
        height=64,
        width=64,
        num_inference_steps=4,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0])


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_train_resume_bitwise_and_load_in_flux2pipeline(
    kind: str, tmp_path: Path, tiny_dev: Path, sample_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import Flux2Pipeline

    straight = tmp_path / "straight"
    trainer = _train(straight, kind)
    assert f"lora  {kind} rank 8, alpha 16" in capsys.readouterr().out
    model = trainer.accelerator.unwrap_model(trainer.model).eval()

    # Resume from step 2 (a copy of the run without its later files) gives the same adapter, bitwise.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    (resumed / "lora.safetensors").unlink()
    reset_accelerate()
    _train(resumed, kind, "--resume", "latest")
    assert "resumed from" in capsys.readouterr().out
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    suffix = ".lokr_w1" if kind == "lokr" else ".hada_w1_a"
    assert any(k.endswith(suffix) for k in a) and not any(".lora_" in k for k in a)

    # The file in a fresh Flux2Pipeline gives the trained model's image: LoKr through diffusers' own
    # load_lora_weights; LoHa, which diffusers 0.42 refuses, through PEFT (interop.lycoris.load_into).
    pipe = Flux2Pipeline.from_pretrained(tiny_dev)
    base = _generate(pipe)
    pipe.transformer, fresh = model, pipe.transformer
    trained = _generate(pipe)
    pipe.transformer = fresh
    assert np.abs(trained - base).max() > MIN_EFFECT
    if kind == "lokr":
        pipe.load_lora_weights(str(straight / "lora.safetensors"), adapter_name="ours")
    else:
        with pytest.raises(ValueError, match="We currently support LoRA and LoKr"):
            pipe.load_lora_weights(str(straight / "lora.safetensors"), adapter_name="ours")
        lora = interop.load_lora(straight / "lora.safetensors")
        interop.load_into(pipe.transformer, lora.lycoris, "ours", lora.name)
    np.testing.assert_allclose(_generate(pipe), trained, atol=IMAGE_TOL, rtol=0)
    pipe.set_adapters(["ours"], [0.0])
    np.testing.assert_allclose(_generate(pipe), base, atol=1e-6, rtol=0)

    # export --merge: the merged model alone gives the same image.
    merged = tmp_path / "merged"
    assert main(["export", "--merge", "--lora", str(straight), "--model", str(tiny_dev), "--output", str(merged)]) == 0
    np.testing.assert_allclose(_generate(Flux2Pipeline.from_pretrained(merged)), trained, atol=IMAGE_TOL, rtol=0)

    capsys.readouterr()
    assert main(["lora", "inspect", str(straight / "lora.safetensors")]) == 0
    text = capsys.readouterr().out
    assert f"type        {'LoKr' if kind == 'lokr' else 'LoHa'}" in text and "targets     attention+single" in text
