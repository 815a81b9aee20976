"""User mistakes and bad luck in a run: one line naming the field or file, the exit code, and nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_lora import checkpoint as ckpt
from flux2_lora.cli import main
from tests.conftest import first_images, reset_accelerate
from tests.reliability.conftest import QUICK, error_line, train


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


# (extra argv, the error line after "flux2-lora: error: "); "{recipe}" is a YAML file holding the text after "|".
BAD = [
    (["--lr", "nan"], "training.lr: must be a finite number (got nan)"),
    (["--lr", "inf"], "training.lr: must be a finite number (got inf)"),
    (["--lora.alpha", "inf"], "lora.alpha: must be a finite number (got inf)"),
    (["--config", "{recipe}|lora:\n  alpha: .inf\n"], "lora.alpha: must be a finite number, got inf"),
    (["--config", "{recipe}|training:\n  lr: .inf\n"], "training.lr: must be a finite number, got inf"),
    (
        ["--config", "{recipe}|training:\n  guidance_scale: .nan\n"],
        "training.guidance_scale: must be a finite number, got nan",
    ),
    (
        ["--training.betas", "[0.9]"],
        "training.betas: expected a tuple with 2 elements (got [0.9])",
    ),
    (
        ["--training.betas", "[1.5, 0.999]"],
        "training.betas: must be two numbers in [0, 1) (AdamW's moment decays, e.g. [0.9, 0.999]), got [1.5, 0.999]",
    ),
    (["--training.eps", "-1"], "training.eps: must be > 0 (AdamW's denominator guard, e.g. 1e-8), got -1.0"),
    (["--training.seed", "-1"], "training.seed: must be in 0..4294967295, got -1"),
    (
        ["--data.resolution", "100000"],
        "data.resolution: must be at most 2048 (FLUX.2 renders up to 4 megapixels, 2048x2048), got 100000",
    ),
    (
        ["--model.max_sequence_length", "100000000"],
        "model.max_sequence_length: must be in 1..4096 prompt tokens (FLUX.2's pipelines use 512), got 100000000",
    ),
    (
        ["--lora.rank", "100000000"],
        "lora.rank: must be in 1..6144 (FLUX.2-dev's transformer width; a higher rank adds nothing), got 100000000",
    ),
    (
        ["--config", "{recipe}|training: [1, 2]\n"],
        "training: must be a mapping of training.* fields (e.g. `training:` then indented `key: value` lines), "
        "got [1, 2] in {recipe}",
    ),
    (
        ["--config", "{recipe}|model: 5\n"],
        "model: must be a mapping of model.* fields (e.g. `model:` then indented `key: value` lines), got 5 in {recipe}",
    ),
    (
        ["--config", "{recipe}|training:\n  lr: 1e-3\n  lr: 2e-3\n"],
        "--config: {recipe} line 3: duplicate key 'lr' (first at line 2)",
    ),
    (
        ["--config", "{recipe}|- a\n- b\n"],
        "--config: {recipe} must be a mapping of recipe groups (model:, data:, training:, ...)",
    ),
    (["--output", "{file}"], "output.dir: {file} is a file, not a folder; choose a folder"),
]


@pytest.mark.parametrize("argv, expected", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_a_bad_recipe_value_is_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    recipe, file = "", tmp_path / "a-file"
    file.write_text("not a folder")
    args = []
    for a in argv:
        if a.startswith("{recipe}|"):
            recipe = _yaml(tmp_path, a.split("|", 1)[1])
            a = recipe
        args.append(a.replace("{file}", str(file)))
    out = tmp_path / "out"
    if "--output" not in args:
        args += ["--output", str(out)]
    assert main(["train", "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"flux2-lora: error: {expected.replace('{recipe}', recipe).replace('{file}', str(file))}\n"
    assert not out.exists()  # refused before anything was written


def test_an_output_folder_inside_the_dataset_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], photos: Path
) -> None:
    data = tmp_path / "photos"
    first_images(photos, data, 10)
    assert main(["train", "--preset", "tiny", "--dataset", str(data), "--output", str(data / "run")]) == 2
    assert capsys.readouterr().err == (
        f"flux2-lora: error: output.dir: {data / 'run'} is inside data.dataset {data}: the next run would train on "
        "this run's samples and plots; choose an output folder outside the dataset\n"
    )
    assert not (data / "run").exists()


def test_a_run_whose_weights_become_non_finite_writes_nothing_and_fails(
    tmp_path: Path, cache: Path, fresh_accelerate_state: None
) -> None:
    from flux2_lora.callbacks import TrainingError
    from flux2_lora.cli import parse_train
    from flux2_lora.train import Trainer

    out = tmp_path / "run"
    recipe, _ = parse_train(["--preset", "tiny", "--dataset", str(cache), "--output", str(out), *QUICK, "--steps", "4"])
    recipe.output.checkpoint_every = 2
    trainer = Trainer(recipe)
    trainer.setup()
    with torch.no_grad():  # as after an update that overflowed
        trainer.trainable[0].view(-1)[0] = float("nan")
    with pytest.raises(
        TrainingError, match=r"training diverged: the LoRA's weights are non-finite \(NaN/inf\) at step 2"
    ):
        trainer.fit()
    assert not (out / "lora.safetensors").exists()
    assert ckpt.list_checkpoints(out / "checkpoints") == []
    reset_accelerate()


def test_a_run_stopped_by_the_nan_guard_exits_non_zero_without_a_final_lora(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "run"
    res = train(out, "--steps", "20", "--lr", "1e38", "--output.checkpoint_every", "50", dataset=cache)
    assert res.returncode == 1
    line = error_line(res)
    assert line.startswith("flux2-lora: error: training stopped at step ")
    assert "non-finite steps in a row" in line and "no final LoRA was written" in line
    assert not (out / "lora.safetensors").exists()
    (last,) = ckpt.list_checkpoints(out / "checkpoints")
    assert all(torch.isfinite(t).all() for t in load_file(str(last / "lora.safetensors")).values())


def test_a_lora_with_nan_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match="non-finite values"):
        ckpt.check_finite({"a": torch.tensor([1.0, float("nan")])}, str(tmp_path / "lora.safetensors"))


def _popen(out: Path, *args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "flux2_lora", "train", "--preset", "tiny", "--output", str(out), *QUICK, *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _read_until(proc: subprocess.Popen[str], text: str) -> str:
    seen = ""
    assert proc.stdout is not None
    while text not in seen:
        ch = proc.stdout.read(1)
        assert ch, seen[-3000:]
        seen += ch
    return seen


@pytest.mark.slow
def test_ctrl_c_checkpoints_then_exits_and_a_second_ctrl_c_exits_at_once(tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "run"
    proc = _popen(out, "--dataset", str(cache), "--steps", "100000", "--output.checkpoint_every", "100000")
    _read_until(proc, "train:")
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest[-3000:]
    assert "Ctrl-C: stopping after this step with a checkpoint" in rest and "received SIGINT" in rest
    (saved,) = ckpt.list_checkpoints(out / "checkpoints")
    assert ckpt.check_checkpoint(saved) is None and "continue with --resume latest" in rest


def test_a_second_ctrl_c_exits_at_once(capfd: pytest.CaptureFixture[str]) -> None:
    """The first Ctrl-C in the loop asks for a checkpoint and says how to leave at once; the second leaves."""
    from flux2_lora.callbacks import Interrupted, SignalStop

    stop = SignalStop()
    try:
        with pytest.raises(Interrupted, match="interrupted by SIGINT during setup"):  # before the loop
            os.kill(os.getpid(), signal.SIGINT)
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.update(1) == "received SIGINT" and stop.exit_code == 130
        assert "Ctrl-C again to exit at once" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_sigterm_during_the_cache_stage_says_what_it_interrupted(tmp_path: Path, tiny_dev: Path) -> None:
    from flux2_lora.data.sample import make_sample_dataset

    data = make_sample_dataset(tmp_path / "photos", count=300)  # a cache stage of several seconds
    proc = _popen(tmp_path / "run", "--dataset", str(data), "--steps", "5")
    _read_until(proc, "cache:")
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, rest[-3000:]
    assert "Traceback" not in rest
    assert (
        "flux2-lora: error: interrupted by SIGTERM during the cache stage, before the first training step; no "
        "checkpoint was written, so the next run starts this stage again (a finished cache is reused)"
    ) in rest
