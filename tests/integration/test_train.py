"""End-to-end training on the tiny FLUX.2 models: outputs, diffusers loading, learning, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import run_cli

TINY = ["--preset", "tiny"]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    res = run_cli("train", *TINY, "--output", str(out), *extra)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def run30(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path, sample_data: Path) -> Path:
    out = tmp_path_factory.mktemp("run30")
    _train(
        out,
        "--steps",
        "30",
        "--validation.every_n_steps",
        "10",
        "--output.checkpoint_every",
        "10",
        "--output.keep_last",
        "2",
    )
    return out


def test_a_30_step_run_writes_every_output(run30: Path) -> None:
    assert (run30 / "recipe.yaml").exists()
    assert (run30 / "lora.safetensors").exists()
    metrics = [json.loads(ln) for ln in (run30 / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [10, 20, 30]
    assert [m["step"] for m in metrics if "val_loss" in m] == [0, 10, 20, 30]
    assert all(np.isfinite(m.get("loss", 0.0)) for m in metrics)
    # Checkpoints: every 10 steps, only the last 2 kept, `latest` points at the newest.
    ckpts = sorted(p.name for p in (run30 / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-20", "step-30"]
    assert (run30 / "checkpoints" / "latest").read_text().strip() == "step-30"
    for name in (
        "lora.safetensors",
        "trainable.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "rng.safetensors",
        "state.json",
    ):
        assert (run30 / "checkpoints" / "step-30" / name).exists(), name
    # Samples as PNG for each validation, and TensorBoard events.
    assert len(list((run30 / "samples").glob("step-000030-prompt-*.png"))) == 2
    assert (run30 / "samples" / "step-000030-grid.png").exists()
    # Pictures of the run: loss curve and the sample progress sheet (one row per validation).
    from PIL import Image

    assert Image.open(run30 / "loss.png").size == (800, 450)
    assert Image.open(run30 / "samples" / "progress.png").size[1] == 4 * 64
    assert list((run30 / "logs").rglob("events.out.tfevents.*"))
    # Nothing pickled anywhere in the output.
    assert not [p for p in run30.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt")]


def test_lora_file_is_diffusers_format_with_metadata(run30: Path) -> None:
    path = run30 / "lora.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any("single_transformer_blocks" in k for k in keys)  # tiny uses attention+single targets
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 8
    assert meta["flux2_lora.base_model"] == "builtin:tiny-dev"
    assert meta["flux2_lora.trigger"] == "sks" and meta["flux2_lora.steps"] == "30" and meta["flux2_lora.rank"] == "8"


def _generate(pipe: object, seed: int = 0) -> np.ndarray:
    out = pipe(  # type: ignore[operator]
        prompt="sks a red circle on a blue background",
        height=64,
        width=64,
        num_inference_steps=4,
        max_sequence_length=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return np.asarray(out.images[0])


def test_lora_loads_into_a_fresh_flux2_pipeline(run30: Path, tiny_dev: Path) -> None:
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline.from_pretrained(tiny_dev)
    base = _generate(pipe)
    pipe.load_lora_weights(str(run30 / "lora.safetensors"), adapter_name="ours")
    # Every tensor in the file landed on a module of the transformer.
    n_file = len(load_file(str(run30 / "lora.safetensors")))
    n_loaded = sum(1 for k in pipe.transformer.state_dict() if ".ours." in k and ".lora_" in k)
    assert n_loaded == n_file
    with_lora = _generate(pipe)
    assert np.abs(with_lora - base).max() > 1e-3
    pipe.set_adapters(["ours"], [0.0])
    np.testing.assert_allclose(_generate(pipe), base, atol=1e-6)


def test_validation_loss_drops_after_training(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    out = tmp_path / "learn"
    _train(out, "--validation.prompts", "[]", "--validation.every_n_steps", "0")
    vals = [json.loads(ln)["val_loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    before, after = vals[0], vals[-1]
    assert after < 0.85 * before, (before, after)


def _lora_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora.safetensors"))


def test_kill_and_resume_gives_the_same_lora(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    """SIGKILL a run after a checkpoint, resume it, and compare with an uninterrupted run: bitwise equal."""
    common = [
        "--steps",
        "24",
        "--output.checkpoint_every",
        "4",
        "--validation.every_n_steps",
        "8",
        "--validation.prompts",
        "[]",
        "--training.gradient_accumulation",
        "2",
        "--data.caption_dropout",
        "0.2",
        "--data.random_flip",
        "true",
        "--lora.dropout",
        "0.1",
        "--data.repeats",
        "2",
        "--data.num_workers",
        "2",
    ]
    straight = tmp_path / "straight"
    _train(straight, *common)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flux2_lora", "train", *TINY, "--output", str(killed), *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "checkpoint saved" in line and "step-12" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "lora.safetensors").exists()
    # A half-written checkpoint left by a kill must not be picked up.
    (killed / "checkpoints" / ".tmp-step-99").mkdir()
    (killed / "checkpoints" / ".tmp-step-99" / "state.json").write_text("{trunc")
    res = _train(killed, *common, "--resume", "latest")
    assert "resumed from" in res.stdout
    a, b = _lora_tensors(straight), _lora_tensors(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (killed / "checkpoints" / ".tmp-step-99").exists()
    # metrics.jsonl reads as one run: the steps logged after step 12 by the killed process were dropped.
    steps = [json.loads(ln)["step"] for ln in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def test_an_output_folder_is_never_overwritten_or_shared(tmp_path: Path, run30: Path) -> None:
    import fcntl

    copy = tmp_path / "copy"
    shutil.copytree(run30, copy)
    res = run_cli("train", *TINY, "--output", str(copy))
    assert res.returncode == 2 and "already holds checkpoints" in res.stderr and "--resume latest" in res.stderr
    with open(copy / ".lock", "a+") as fh:
        fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run_cli("train", *TINY, "--output", str(copy), "--resume", "latest")
    assert res.returncode == 2 and "in use by a running job" in res.stderr


def test_resume_with_a_different_lora_is_refused(tmp_path: Path, run30: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run30, copy)
    res = run_cli("train", *TINY, "--output", str(copy), "--rank", "4", "--resume", "latest")
    assert res.returncode == 2
    assert "--resume" in res.stderr and "Traceback" not in res.stderr


def test_klein_family_trains_and_loads(tmp_path: Path, tiny_klein: Path, sample_data: Path) -> None:
    from diffusers import Flux2KleinPipeline

    out = tmp_path / "klein"
    res = _train(out, "--model", "builtin:tiny-klein", "--steps", "6", "--validation.every_n_steps", "0")
    assert "text layers [9, 18, 27]" in res.stdout
    pipe = Flux2KleinPipeline.from_pretrained(tiny_klein)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    assert pipe.get_list_adapters()["transformer"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_base_with_gradient_checkpointing(
    tmp_path: Path, tiny_dev: Path, sample_data: Path, dtype: str
) -> None:
    out = tmp_path / dtype
    _train(
        out,
        "--dtype",
        dtype,
        "--model.gradient_checkpointing",
        "true",
        "--steps",
        "4",
        "--validation.every_n_steps",
        "0",
    )
    lora = load_file(str(out / "lora.safetensors"))
    assert all(torch.isfinite(t).all() for t in lora.values())
    assert (out / "samples" / "step-000004-grid.png").exists()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dev: Path) -> None:
    from flux2_lora import flow
    from flux2_lora.config import ModelArgs
    from flux2_lora.model import add_lora, load_transformer, resolve_model

    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    grads = []
    for ckpt_on in (False, 1, 2):
        torch.manual_seed(0)
        model = load_transformer(src, torch.float32)
        add_lora(model, 4, None, 0.0, "all-linear", "gaussian", False)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # non-zero B so every LoRA factor gets a gradient
        model.train()
        if ckpt_on:
            from flux2_lora.model import enable_checkpointing

            assert enable_checkpointing(model, ckpt_on) == (4 if ckpt_on == 1 else 2)
        g = torch.Generator().manual_seed(1)
        x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
        emb = torch.randn(2, 8, 48, generator=g)
        loss = flow.flow_loss(
            model,
            x0,
            emb,
            torch.tensor([0.3, 0.8]),
            noise,
            flow.latent_ids(2, 4, 4),
            flow.text_ids(2, 8),
            torch.full((2,), 3.5),
        )
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], other[n], rtol=1e-5, atol=1e-7)
