"""Each piece of the objective equals what diffusers' own FLUX.2 pipelines compute on the same inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

from flux2_lora import flow
from flux2_lora.config import FAMILY_TEXT_LAYERS, ModelArgs
from flux2_lora.model import load_text_encoder, load_vae, resolve_model

PROMPTS = ["sks a red circle on a blue background", "a green square", ""]


@pytest.fixture(scope="module")
def dev_pipe(tiny_dev: Path) -> Flux2Pipeline:
    return Flux2Pipeline.from_pretrained(tiny_dev)


@pytest.fixture(scope="module")
def klein_pipe(tiny_klein: Path) -> Flux2KleinPipeline:
    return Flux2KleinPipeline.from_pretrained(tiny_klein)


def test_family_detection_and_default_layers(tiny_dev: Path, tiny_klein: Path) -> None:
    dev = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    klein = resolve_model(ModelArgs(name_or_path=str(tiny_klein)))
    assert (dev.family, dev.text_layers) == ("dev", (10, 20, 30))
    assert (klein.family, klein.text_layers) == ("klein", (9, 18, 27))
    # The layer list is a recipe field; the family only supplies the default.
    custom = resolve_model(ModelArgs(name_or_path=str(tiny_klein), text_encoder_layers=[1, 2]))
    assert custom.text_layers == (1, 2)
    assert FAMILY_TEXT_LAYERS["klein"] != FAMILY_TEXT_LAYERS["dev"]


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_prompt_embeddings_match_pipeline(family: str, request: pytest.FixtureRequest) -> None:
    pipe = request.getfixturevalue(f"{family}_pipe")
    path = request.getfixturevalue(f"tiny_{family}")
    src = resolve_model(ModelArgs(name_or_path=str(path)))
    text_encoder, tokenizer = load_text_encoder(src, torch.float32)
    ours = flow.encode_prompts(src.family, text_encoder, tokenizer, PROMPTS, src.text_layers, 64)
    # The pipeline's encode_prompt with its own default layers (no layer argument passed).
    theirs, their_ids = pipe.encode_prompt(prompt=PROMPTS, device="cpu", max_sequence_length=64)
    assert ours.shape == theirs.shape == (3, 64, 3 * 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    torch.testing.assert_close(flow.text_ids(3, 64), their_ids)
    # Different prompts give different embeddings (the tokenizer really sees the caption).
    assert not torch.allclose(ours[0], ours[1])


def test_latents_match_pipeline_vae_encoding(dev_pipe: Flux2Pipeline, tiny_dev: Path) -> None:
    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    vae = load_vae(src)
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = flow.encode_images(vae, pixels)
    theirs = dev_pipe._encode_vae_image(pixels, generator=torch.Generator().manual_seed(0))
    assert ours.shape == (2, 16, 4, 6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # Batch-norm normalisation is really applied (the tiny VAE has non-trivial statistics).
    raw = Flux2Pipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
    assert not torch.allclose(raw, ours)


def test_patchify_pack_and_ids_match_pipeline() -> None:
    x = torch.randn(2, 4, 8, 12)
    torch.testing.assert_close(flow.patchify(x), Flux2Pipeline._patchify_latents(x))
    p = flow.patchify(x)
    torch.testing.assert_close(flow.pack(p), Flux2Pipeline._pack_latents(p))
    torch.testing.assert_close(flow.latent_ids(2, 4, 6), Flux2Pipeline._prepare_latent_ids(p))
    ids = flow.latent_ids(1, 4, 6)[0]
    assert ids[:, 0].eq(0).all() and ids[:, 3].eq(0).all()  # image ids are (0, h, w, 0)
    assert flow.text_ids(1, 5)[0, :, :3].eq(0).all()  # text ids are (0, 0, 0, l)
    # Packed tokens unpack back to the grid with the pipeline's own id-based scatter.
    back = Flux2Pipeline._unpack_latents_with_ids(flow.pack(p), flow.latent_ids(2, 4, 6))
    torch.testing.assert_close(back, p)


def test_noise_and_target_agree_with_the_flow_match_scheduler() -> None:
    """x_t equals the scheduler's scale_noise, and an Euler step along the target reaches x at the next sigma."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[0.8, 0.5, 0.2], device="cpu")
    for i in range(2):
        sigma, nxt = float(sched.sigmas[i]), float(sched.sigmas[i + 1])
        xt = flow.add_noise(x0, noise, torch.tensor([sigma]))
        torch.testing.assert_close(xt, sched.scale_noise(x0, sched.timesteps[i : i + 1], noise))
        sched._step_index = i
        stepped = sched.step(noise - x0, sched.timesteps[i], xt, return_dict=False)[0]
        torch.testing.assert_close(stepped, flow.add_noise(x0, noise, torch.tensor([nxt])), atol=1e-5, rtol=1e-5)


def test_transformer_inputs_match_the_pipeline_call(dev_pipe: Flux2Pipeline) -> None:
    """Capture the pipeline's transformer call at sigma=1 and rebuild every input with our functions."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if torch.is_tensor(v)})

    handle = dev_pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    embeds = torch.randn(1, 32, 48, generator=torch.Generator().manual_seed(1))
    grid = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    try:
        dev_pipe(
            prompt_embeds=embeds,
            latents=grid,
            height=64,
            width=64,
            num_inference_steps=2,
            sigmas=[1.0, 0.5],
            guidance_scale=3.5,
            output_type="latent",
        )
    finally:
        handle.remove()
    # At sigma = 1, x_t is pure noise: our packing of (1 - 1) * x0 + 1 * noise must be what the pipeline fed.
    xt = flow.add_noise(torch.zeros_like(grid), grid, torch.tensor([1.0]))
    torch.testing.assert_close(captured["hidden_states"], flow.pack(xt))
    # The transformer gets timestep = sigma (the pipeline divides its 0-1000 timesteps by 1000).
    sched = dev_pipe.scheduler
    assert float(captured["timestep"][0]) == pytest.approx(float(sched.sigmas[0]), abs=1e-6)
    torch.testing.assert_close(captured["img_ids"], flow.latent_ids(1, 4, 4))
    torch.testing.assert_close(captured["txt_ids"], flow.text_ids(1, 32))
    torch.testing.assert_close(captured["guidance"], torch.full((1,), 3.5))


def test_flow_loss_is_mse_against_noise_minus_data() -> None:
    class Echo(torch.nn.Module):
        """Predicts a fixed tensor; lets us check the loss arithmetic without a real model."""

        def __init__(self, out: torch.Tensor):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()), requires_grad=False)
            self.out = out

        def forward(self, hidden_states: torch.Tensor, **kw: object) -> tuple[torch.Tensor]:
            return (self.out,)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    pred = torch.randn(2, 4, 4, generator=g)
    sig = torch.tensor([0.3, 0.7])
    loss = flow.flow_loss(
        Echo(pred), x0, torch.zeros(2, 3, 8), sig, noise, flow.latent_ids(2, 2, 2), flow.text_ids(2, 3), None
    )
    expected = ((pred - flow.pack(noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    weighted = flow.flow_loss(
        Echo(pred),
        x0,
        torch.zeros(2, 3, 8),
        sig,
        noise,
        flow.latent_ids(2, 2, 2),
        flow.text_ids(2, 3),
        None,
        "sigma_sqrt",
        reduce=False,
    )
    per = ((pred - flow.pack(noise - x0)) ** 2).mean(dim=(1, 2)) * sig**-2
    torch.testing.assert_close(weighted, per)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_sigma_sampling_is_seeded_and_in_range(scheme: str) -> None:
    a = flow.sample_sigmas(4096, scheme, torch.Generator().manual_seed(3))
    b = flow.sample_sigmas(4096, scheme, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert a.min() > 0 and a.max() < 1
    if scheme == "uniform":
        assert abs(a.mean().item() - 0.5) < 0.02 and abs(a.std().item() - (1 / 12) ** 0.5) < 0.02
    if scheme == "logit_normal":
        # sigmoid(N(0, 1)): symmetric around 0.5 and concentrated in the middle.
        assert abs(a.median().item() - 0.5) < 0.03 and ((a > 0.25) & (a < 0.75)).float().mean() > 0.6
    with pytest.raises(ValueError, match="training.timestep_sampling"):
        flow.sample_sigmas(2, "bogus", torch.Generator())
