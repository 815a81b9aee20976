"""training.timestep_shift (none | auto | s) and timestep_sampling: sigmoid, against hand formulas and against
diffusers' own FLUX.2 pieces (the pipelines' compute_empirical_mu, FlowMatchEulerDiscreteScheduler's shifts)."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2 import pipeline_flux2, pipeline_flux2_klein

from flux2_lora import draws, flow
from flux2_lora.cli import main
from flux2_lora.config import DataArgs, TrainingArgs
from flux2_lora.draws import draw_batch, sample_seed

SEQ_LENS = [16, 64, 256, 1024, 4096, 4300, 4301, 8192, 16384]


def hand_mu(n: int, steps: int) -> float:
    """FLUX.2's empirical mu written out: a line in the token count at 10 and at 200 steps, interpolated in the
    step count below 4300 tokens; the 200-step line alone above."""
    m200 = 0.00016927 * n + 0.45666666
    if n > 4300:
        return m200
    m10 = 8.73809524e-05 * n + 1.89833333
    return m200 + (m10 - m200) * (200 - steps) / 190


@pytest.mark.parametrize("n", SEQ_LENS)
def test_auto_mu_is_the_pipelines_compute_empirical_mu(n: int) -> None:
    mu = flow.auto_shift_mu(n)
    assert mu == pipeline_flux2.compute_empirical_mu(n, 50) == pipeline_flux2_klein.compute_empirical_mu(n, 50)
    assert mu == pytest.approx(hand_mu(n, 50), rel=1e-9)


def test_auto_uses_the_pipelines_default_step_count() -> None:
    # The number of inference steps mu is evaluated at is the one both FLUX.2 pipelines sample with by default.
    for pipe in (Flux2Pipeline, Flux2KleinPipeline):
        assert inspect.signature(pipe.__call__).parameters["num_inference_steps"].default == flow.AUTO_SHIFT_STEPS
    assert flow.AUTO_SHIFT_STEPS == 50
    # 1024 x 1024 px (64 x 64 tokens): mu ~2.02, i.e. a shift of ~7.6; 64 px (4 x 4 tokens): ~1.60 (~4.9).
    assert flow.auto_shift_mu(4096) == pytest.approx(2.0233, abs=1e-4)
    assert flow.auto_shift_mu(16) == pytest.approx(1.5965, abs=1e-4)


def sigma_grid() -> torch.Tensor:
    return torch.linspace(0.01, 0.99, 99)


@pytest.mark.parametrize("n", [16, 1024, 4096, 8192])
def test_auto_shift_is_the_schedulers_exponential_time_shift(n: int) -> None:
    sig = sigma_grid()
    got = flow.shift_sigmas(sig, "auto", n)
    mu = pipeline_flux2.compute_empirical_mu(n, 50)
    # By hand: exp(mu) / (exp(mu) + 1/sigma - 1).
    torch.testing.assert_close(got, math.exp(mu) / (math.exp(mu) + 1 / sig - 1))
    # The scheduler's own function, and the sigmas it sets for the pipeline's call (set_timesteps(sigmas, mu)).
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    torch.testing.assert_close(got, sched.time_shift(mu, 1.0, sig))
    sched.set_timesteps(sigmas=sig.numpy(), mu=mu)
    torch.testing.assert_close(got, sched.sigmas[:-1])  # the scheduler appends the terminal 0


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0, 7.5])
def test_float_shift_is_the_hand_formula_and_the_schedulers_static_shift(s: float) -> None:
    sig = sigma_grid()
    got = flow.shift_sigmas(sig, s, 16)
    torch.testing.assert_close(got, s * sig / (1 + (s - 1) * sig))
    sched = FlowMatchEulerDiscreteScheduler(shift=s, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=sig.numpy())
    torch.testing.assert_close(got, sched.sigmas[:-1])
    # The same as the exponential shift with mu = ln s; independent of the resolution.
    torch.testing.assert_close(got, flow.shift_sigmas(sig, s, 8192))
    torch.testing.assert_close(got, math.exp(math.log(s)) / (math.exp(math.log(s)) + 1 / sig - 1))
    assert flow.shift_sigmas(torch.tensor([0.5]), 3.0, 16).item() == pytest.approx(0.75)
    assert flow.shift_sigmas(sig, "none", 16) is sig


def test_shifted_sigmas_stay_inside_the_open_interval() -> None:
    ends = torch.tensor([1e-4, 1 - 1e-4])
    for shift in ("auto", 0.01, 100.0):
        out = flow.shift_sigmas(ends, shift, 16384)
        assert out.min() >= 1e-4 and out.max() <= 1 - 1e-4


def test_sigmoid_sampling_is_sigmoid_of_a_normal() -> None:
    got = flow.sample_sigmas(4096, "sigmoid", torch.Generator().manual_seed(5), logit_mean=0.5, logit_std=0.8)
    g = torch.Generator().manual_seed(5)
    hand = torch.sigmoid(torch.normal(0.5, 0.8, size=(4096,), generator=g)).clamp(1e-4, 1 - 1e-4)
    assert torch.equal(got, hand)
    # The same density (and draws) as logit_normal: sigmoid is the name other trainers give it.
    same = flow.sample_sigmas(4096, "logit_normal", torch.Generator().manual_seed(5), logit_mean=0.5, logit_std=0.8)
    assert torch.equal(got, same)
    assert got.median().item() == pytest.approx(1 / (1 + math.exp(-0.5)), abs=0.02)


def _batch(h: int, w: int, keys: list[str]) -> dict[str, Any]:
    n = len(keys)
    return {
        "keys": keys,
        "passes": [0] * n,
        "latents": torch.randn(n, 8, h, w),
        "latents_flip": torch.randn(n, 8, h, w),
        "prompt_embeds": torch.randn(n, 3, 6),
    }


def _old_draws(batch: dict[str, Any], d: DataArgs, t: TrainingArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigma and noise draws as draw_batch made them before timestep_shift existed."""
    sigmas, noises = [], []
    for key, data_pass in zip(batch["keys"], batch["passes"], strict=True):
        g = torch.Generator().manual_seed(sample_seed(t.seed, data_pass, key))
        if d.random_flip:
            torch.rand((), generator=g)
        if d.caption_dropout > 0:
            torch.rand((), generator=g)
        sigmas.append(flow.sample_sigmas(1, t.timestep_sampling, g, t.logit_mean, t.logit_std, t.mode_scale))
        noises.append(torch.randn(batch["latents"].shape[1:], generator=g))
    return torch.cat(sigmas), torch.stack(noises)


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "sigmoid"])
def test_none_leaves_the_draws_bitwise_unchanged_and_shifts_draw_nothing(sampling: str) -> None:
    d = DataArgs(random_flip=True, caption_dropout=0.1)
    keys = ["a.png", "b.png", "c.png"]
    batch = _batch(4, 4, keys)
    empty = torch.zeros(3, 6)
    t = TrainingArgs(timestep_sampling=sampling, timestep_shift="none")
    _, _, sigma, noise, _, _ = draw_batch(batch, d, t, empty)
    old_sigma, old_noise = _old_draws(batch, d, t)
    assert torch.equal(sigma, old_sigma) and torch.equal(noise, old_noise)
    for shift in ("auto", 3.0):
        t = TrainingArgs(timestep_sampling=sampling, timestep_shift=shift)
        _, _, shifted, noise2, _, _ = draw_batch(batch, d, t, empty)
        assert torch.equal(noise2, old_noise)  # the shift consumes no random numbers
        torch.testing.assert_close(shifted, flow.shift_sigmas(old_sigma, shift, 16), rtol=0, atol=0)
        assert (shifted > old_sigma).all()


def test_auto_shifts_each_bucket_by_its_own_token_count() -> None:
    d, t = DataArgs(random_flip=False), TrainingArgs(timestep_shift="auto")
    keys = ["a.png", "b.png"]
    empty = torch.zeros(3, 6)
    unshifted = draw_batch(_batch(4, 4, keys), d, TrainingArgs(), empty)[2]
    small = draw_batch(_batch(4, 4, keys), d, t, empty)[2]  # 64 x 64 px: 16 tokens
    mid = draw_batch(_batch(32, 32, keys), d, t, empty)[2]  # 512 x 512 px: 1024 tokens
    large = draw_batch(_batch(64, 96, keys), d, t, empty)[2]  # 1024 x 1536 px: 6144 tokens
    for got, n in ((small, 16), (mid, 1024), (large, 64 * 96)):
        mu = pipeline_flux2.compute_empirical_mu(n, 50)
        torch.testing.assert_close(got, math.exp(mu) / (math.exp(mu) + 1 / unshifted - 1))
        assert (got > unshifted).all()
    assert (mid > small).all()  # more tokens, more shift towards noise, up to 4300 tokens;
    assert (large < mid).all()  # above them the pipeline's mu is its 200-step line alone, which is lower at 50 steps


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--training.timestep_shift", "-1"], "training.timestep_shift: must be none, auto or a shift in (0, 100]"),
        (["--training.timestep_shift", "0"], "training.timestep_shift: must be none, auto or a shift in (0, 100]"),
        (["--training.timestep_shift", "1000"], "training.timestep_shift: must be none, auto or a shift in (0, 100]"),
        (["--training.timestep_shift", "foo"], "training.timestep_shift: must be one of none, auto or a finite number"),
        (["--training.timestep_shift", "nan"], "training.timestep_shift: must be one of none, auto or a finite number"),
        (["--training.timestep_shift", "true"], "training.timestep_shift: must be one of none, auto or a finite"),
        (
            ["--training.timestep_sampling", "sigmod"],
            "training.timestep_sampling: must be one of uniform, logit_normal",
        ),
    ],
)
def test_bad_values_give_one_line_naming_the_field(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--preset", "tiny", "--output", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flux2-lora: error: " + message), err
    assert "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_recipe_file_takes_a_number_auto_or_none(tmp_path: Path) -> None:
    from flux2_lora.recipe import parse_recipe

    for text, want in (("3", 3.0), ("2.5", 2.5), ("auto", "auto"), ("none", "none")):
        path = tmp_path / "r.yaml"
        path.write_text(f"training:\n  timestep_shift: {text}\n  timestep_sampling: sigmoid\n")
        recipe, _ = parse_recipe(["--preset", "tiny", "--config", str(path)])
        assert recipe.training.timestep_shift == want and recipe.training.timestep_sampling == "sigmoid"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_tiny_run_trains_with_auto_shift(
    tmp_path: Path, tiny_dev: Path, sample_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from flux2_lora.cli import parse_train
    from flux2_lora.train import Trainer

    seen: list[tuple[Any, int, float, float]] = []
    real = draws.shift_sigmas

    def spy(sigmas: torch.Tensor, shift: Any, image_seq_len: int) -> torch.Tensor:
        out = real(sigmas, shift, image_seq_len)
        seen.append((shift, image_seq_len, sigmas.item(), out.item()))
        return out

    monkeypatch.setattr(draws, "shift_sigmas", spy)
    out = tmp_path / "run"
    recipe, _ = parse_train(
        ["--preset", "tiny", "--output", str(out), "--validation.prompts", "[]", "--logging.log_every", "1"]
        + ["--steps", "4", "--validation.every_n_steps", "0", "--training.timestep_shift", "auto"]
        + ["--training.timestep_sampling", "sigmoid"]
    )
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.fit()
    # Every training sample was shifted by its 64 px bucket's mu (4 x 4 latent tokens).
    assert len(seen) == 4 and {(s, n) for s, n, _, _ in seen} == {("auto", 16)}
    e = math.exp(flow.auto_shift_mu(16))
    for _, _, before, after in seen:
        assert after == pytest.approx(e * before / (1 + (e - 1) * before), rel=1e-5) and after > before
    losses = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss"]) for m in losses if "loss" in m)
    assert (out / "lora.safetensors").exists()
