"""The EMA of the LoRA in real (tiny) training runs, in-process: the hand formula over the checkpoints' weights with a
NaN-skipped step, the exported lora_ema.safetensors (format, alpha folding, diffusers' loader), a stop and resume
that is bitwise exact, validation.use_ema changing the validation loss and not the training, and `eval select-best`
ranking the EMA files beside the LoRAs."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flux2_lora import train as train_mod
from flux2_lora.cli import main, parse_train
from flux2_lora.train import Trainer
from tests.conftest import first_images, reset_accelerate

pytestmark = pytest.mark.slow

DECAY = 0.8
COMMON = ["--preset", "tiny", "--validation.prompts", "[]", "--logging.tensorboard", "false", "--lora.alpha", "16",
          "--training.ema_decay", str(DECAY), "--lora.dropout", "0.1", "--data.caption_dropout", "0.2"]  # fmt: skip


def _train(out: Path, *extra: str, stop_at: int | None = None, setup_hook: Any = None) -> Trainer:
    recipe, resume = parse_train([*COMMON, "--output", str(out), *extra])
    trainer = Trainer(recipe, resume)
    try:
        trainer.setup()
        if setup_hook is not None:
            setup_hook(trainer)
        if stop_at is not None:  # a scheduler's SIGUSR1 during step `stop_at`: checkpoint there and exit
            update = trainer.signals.update

            def signalled(step: int) -> str:
                if step == stop_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return update(step)

            trainer.signals.update = signalled  # type: ignore[method-assign]
        trainer.fit()
    finally:
        reset_accelerate()
    return trainer


def _trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _file_key(name: str) -> str:  # PEFT parameter name -> the diffusers file's key
    return "transformer." + name.replace(".default", "")


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path, sample_data: Path) -> dict[str, Any]:
    """4 steps, a checkpoint after each, the training loss NaN at step 3 (the NaN guard skips that update)."""
    base = tmp_path_factory.mktemp("ema")
    data = first_images(sample_data, base / "data", 6)
    out = base / "run"
    real, calls, start = train_mod.flow_loss, {"n": 0}, {}

    def flaky(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        if args[0].training:  # the training step (validation runs the model in eval mode)
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan")
        return loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "flow_loss", flaky)
        _train(out, "--dataset", str(data), "--steps", "4", "--output.checkpoint_every", "1", "--output.keep_last",
               "10", "--validation.every_n_steps", "0", setup_hook=lambda t: start.update(_trainable(t)))  # fmt: skip
    cache = next((out / "cache").iterdir())
    return {"out": out, "start": start, "cache": cache}


def test_the_runs_ema_is_the_hand_formula_and_a_skipped_step_does_not_move_it(skipped_run: dict[str, Any]) -> None:
    out, hand = skipped_run["out"], dict(skipped_run["start"])
    previous: dict[str, torch.Tensor] = dict(hand)
    for step in range(1, 5):
        folder = out / "checkpoints" / f"step-{step}"
        w = load_file(str(folder / "trainable.safetensors"))
        if step == 3:  # skipped: the weights did not move, and neither may the EMA
            assert all(torch.equal(w[n], previous[n]) for n in w)
        else:
            hand = {n: DECAY * hand[n] + (1 - DECAY) * w[n] for n in hand}
        ema = load_file(str(folder / "ema.safetensors"))
        assert ema.keys() == hand.keys()
        for n in hand:
            torch.testing.assert_close(ema[n], hand[n], rtol=1e-6, atol=1e-8)
        previous = w
    step2, step3 = (load_file(str(out / "checkpoints" / f"step-{s}" / "ema.safetensors")) for s in (2, 3))
    assert all(torch.equal(step2[n], step3[n]) for n in step2)


def test_lora_ema_has_the_loras_format_and_loads_in_diffusers(skipped_run: dict[str, Any], tiny_dev: Path) -> None:
    from diffusers import Flux2Pipeline

    out = skipped_run["out"]
    ema = load_file(str(out / "checkpoints" / "step-4" / "ema.safetensors"))
    for folder in (out, out / "checkpoints" / "step-4"):
        lora, lora_ema = load_file(str(folder / "lora.safetensors")), load_file(str(folder / "lora_ema.safetensors"))
        assert lora.keys() == lora_ema.keys()
        # The same alpha folding as the LoRA: alpha 16 / rank 8 = 2 multiplied into lora_B.
        for n, t in ema.items():
            assert torch.equal(lora_ema[_file_key(n)], t * 2 if ".lora_B." in n else t), n
        with safe_open(str(folder / "lora_ema.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["flux2_lora.weights"] == "ema" and float(meta["flux2_lora.ema_decay"]) == DECAY
        assert meta["flux2_lora.steps"] == "4" and meta["flux2_lora.scale_in_B"] == "2.0"
    pipe = Flux2Pipeline.from_pretrained(tiny_dev)
    pipe.load_lora_weights(str(out / "lora_ema.safetensors"), adapter_name="ema")
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".ema." in k}
    file = load_file(str(out / "lora_ema.safetensors"))
    assert len(loaded) == len(file)
    for k, v in file.items():
        assert torch.equal(loaded[k.removeprefix("transformer.").replace(".weight", ".ema.weight")], v), k


def test_a_checkpoint_without_an_ema_resumes_with_one_and_a_damaged_one_is_named(
    skipped_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux2_lora.checkpoint import check_checkpoint

    out = tmp_path / "run"
    shutil.copytree(skipped_run["out"], out, ignore=shutil.ignore_patterns("cache"))
    (out / "lora.safetensors").unlink()
    step4 = out / "checkpoints" / "step-4"
    (step4 / "ema.safetensors").write_bytes((step4 / "ema.safetensors").read_bytes()[:100])
    assert (check_checkpoint(step4) or "").startswith("ema.safetensors is damaged (")  # `latest` skips it
    (step4 / "ema.safetensors").unlink()  # as written by a run with training.ema_decay 0
    assert check_checkpoint(step4) is None
    w4 = load_file(str(step4 / "trainable.safetensors"))
    capsys.readouterr()
    _train(out, "--dataset", str(skipped_run["cache"]), "--steps", "5", "--validation.every_n_steps", "0",
           "--resume", "latest")  # fmt: skip
    assert "holds no EMA (training.ema_decay was 0); the EMA starts from its weights" in capsys.readouterr().out
    w5 = load_file(str(out / "checkpoints" / "step-5" / "trainable.safetensors"))
    ema5 = load_file(str(out / "checkpoints" / "step-5" / "ema.safetensors"))
    for n in w5:  # one update from the resumed weights
        torch.testing.assert_close(ema5[n], DECAY * w4[n] + (1 - DECAY) * w5[n], rtol=1e-6, atol=1e-8)
    assert (out / "lora_ema.safetensors").is_file()


def test_stop_and_resume_is_bitwise_and_use_ema_changes_validation_not_training(
    skipped_run: dict[str, Any], tmp_path: Path
) -> None:
    cache = ["--dataset", str(skipped_run["cache"]), "--steps", "8", "--output.checkpoint_every", "3",
             "--validation.every_n_steps", "2", "--training.gradient_accumulation", "2"]  # fmt: skip
    straight = tmp_path / "straight"
    _train(straight, *cache, "--validation.use_ema", "true")
    stopped = _train(tmp_path / "stopped", *cache, "--validation.use_ema", "true", stop_at=5)
    assert stopped.interrupted and stopped.state.step == 5
    assert (tmp_path / "stopped" / "checkpoints" / "step-5" / "ema.safetensors").is_file()
    assert not (tmp_path / "stopped" / "lora_ema.safetensors").exists()
    resumed = _train(tmp_path / "stopped", *cache, "--validation.use_ema", "true", "--resume", "latest")
    assert resumed.state.step == 8
    plain = tmp_path / "plain"
    _train(plain, *cache)  # the same run, validated with the LoRA's own weights
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a = load_file(str(straight / name))
        for other in (tmp_path / "stopped", plain):
            b = load_file(str(other / name))
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (name, other.name)

    def val(out: Path) -> dict[int, tuple[float, bool]]:
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["val_loss"], bool(r.get("val_ema"))) for r in recs if "val_loss" in r}

    with_ema, without = val(straight), val(plain)
    assert sorted(with_ema) == sorted(without) == [0, 2, 4, 6, 8]
    assert all(flag for _, flag in with_ema.values()) and not any(flag for _, flag in without.values())
    assert with_ema[0][0] == without[0][0]  # step 0: the EMA is the initial weights
    assert all(with_ema[s][0] != without[s][0] for s in (2, 4, 6, 8))
    assert val(tmp_path / "stopped") == with_ema  # the resumed run logged the same EMA losses


def test_select_best_ranks_the_ema_files_with_the_loras(
    skipped_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    _train(run, "--dataset", str(skipped_run["cache"]), "--steps", "4", "--output.checkpoint_every", "2",
           "--validation.every_n_steps", "2", "--validation.use_ema", "true")  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "sb"
    weights = ["--weight-loss", "1", "--weight-clip", "0", "--weight-diversity", "0", "--weight-overfit", "0"]
    assert main(["eval", "select-best", "--run", str(run), *weights, "--output", str(out)]) == 0
    ranking = json.loads((out / "ranking.json").read_text())["ranking"]
    rows = {r["checkpoint"]: r for r in ranking}
    assert set(rows) == {"step-2", "step-2 (EMA)", "step-4", "step-4 (EMA)"}
    logged = {
        r["step"]: r["val_loss"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    }
    for step in (2, 4):  # the EMA files take the losses the run logged with use_ema; the LoRAs' are computed
        assert rows[f"step-{step} (EMA)"]["val_loss"] == logged[step]
        assert rows[f"step-{step}"]["logged_val_loss"] is None and rows[f"step-{step}"]["val_loss"] is not None
    assert [r["val_loss"] for r in ranking] == sorted(r["val_loss"] for r in ranking)
