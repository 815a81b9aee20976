"""Editing with reference images: each piece equals what diffusers' FLUX.2 pipelines do with `image=[...]`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from PIL import Image

from flux2_lora import flow
from flux2_lora.config import ModelArgs
from flux2_lora.model import load_vae, resolve_model


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def _capture(pipe: Flux2Pipeline | Flux2KleinPipeline, **call: object) -> dict[str, torch.Tensor]:
    """The keyword tensors of the pipeline's first transformer call."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if torch.is_tensor(v)})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(num_inference_steps=1, sigmas=[1.0], output_type="latent", **call)
    finally:
        handle.remove()
    return captured


@pytest.mark.parametrize("family", ["dev", "klein"])
def test_reference_tokens_and_ids_match_the_pipeline(family: str, request: pytest.FixtureRequest) -> None:
    """Three references of different sizes (one above the pixel limit, one not a multiple of 16): our pixels,
    latents, packing and ids are exactly what the pipeline puts after the target's tokens."""
    path = request.getfixturevalue(f"tiny_{family}")
    cls = Flux2Pipeline if family == "dev" else Flux2KleinPipeline
    pipe = cls.from_pretrained(path)
    refs = [_image(88, 72, 1), _image(1040, 1024, 2), _image(64, 96, 3)]
    embeds = torch.randn(1, 16, 48, generator=torch.Generator().manual_seed(4))
    grid = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))
    kw: dict[str, object] = {"guidance_scale": 3.5} if family == "dev" else {}
    got = _capture(pipe, image=refs, prompt_embeds=embeds, latents=grid, height=64, width=96, **kw)

    vae = load_vae(resolve_model(ModelArgs(name_or_path=str(path))))
    pixels = [flow.reference_pixels(im) for im in refs]
    assert [tuple(p.shape[-2:]) for p in pixels] == [(64, 80), (1008, 1024), (96, 64)]  # (h, w): floored, scaled
    assert [flow.reference_size(im.width, im.height) for im in refs] == [(80, 64), (1024, 1008), (64, 96)]
    latents = [flow.encode_images(vae, p) for p in pixels]
    tokens = flow.pack(grid).shape[1]
    torch.testing.assert_close(got["hidden_states"][:, :tokens], flow.pack(grid))  # sigma 1: x_t is the noise
    torch.testing.assert_close(got["hidden_states"][:, tokens:], flow.pack_references(latents), rtol=0, atol=0)
    shapes = [tuple(x.shape[-2:]) for x in latents]
    ids = torch.cat([flow.latent_ids(1, 4, 6), flow.reference_ids(shapes, 1)], dim=1)
    torch.testing.assert_close(got["img_ids"], ids, rtol=0, atol=0)
    # Time index 10, 20, 30 for references 0, 1, 2; the target's is 0.
    assert sorted(set(got["img_ids"][0, :, 0].tolist())) == [0, 10, 20, 30]


def test_the_pixel_limit_is_the_pipelines_resize_rule() -> None:
    """data.max_reference_pixels below the default scales as the pipeline's _resize_to_target_area does."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    im = _image(300, 200, 6)
    px = flow.reference_pixels(im, max_pixels=128 * 128)
    scaled = Flux2ImageProcessor._resize_to_target_area(im, 128 * 128)
    want_w, want_h = scaled.width // 16 * 16, scaled.height // 16 * 16
    theirs = Flux2ImageProcessor(vae_scale_factor=16).preprocess(
        scaled, height=want_h, width=want_w, resize_mode="crop"
    )
    assert px.shape[-2:] == (want_h, want_w) == (96, 144)
    torch.testing.assert_close(px, theirs, rtol=0, atol=0)
    assert flow.reference_size(300, 200, 128 * 128) == (144, 96)


def test_the_training_forward_is_the_pipelines_with_references(tiny_dev: Path) -> None:
    """flow_loss with references feeds the transformer what the pipeline's denoising step feeds it (at sigma 1),
    and the loss is the MSE on the target's tokens only."""
    pipe = Flux2Pipeline.from_pretrained(tiny_dev)
    refs = [_image(64, 64, 7), _image(96, 64, 8)]
    embeds = torch.randn(1, 16, 48, generator=torch.Generator().manual_seed(9))
    grid = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(10))
    theirs = _capture(pipe, image=refs, prompt_embeds=embeds, latents=grid, height=64, width=64, guidance_scale=3.5)

    vae = load_vae(resolve_model(ModelArgs(name_or_path=str(tiny_dev))))
    latents = [flow.encode_images(vae, flow.reference_pixels(im)) for im in refs]
    ids = torch.cat([flow.latent_ids(1, 4, 4), flow.reference_ids([(4, 4), (4, 6)], 1)], dim=1)
    ours: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ours.update({k: v for k, v in kwargs.items() if torch.is_tensor(v)})

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict, result: tuple) -> None:
        out["pred"] = result[0]

    handles = [
        pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True),
        pipe.transformer.register_forward_hook(keep, with_kwargs=True),
    ]
    pipe.transformer.requires_grad_(False)  # frozen, as under training
    x0 = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(11))
    try:
        with torch.no_grad():
            loss = flow.flow_loss(
                pipe.transformer, x0, embeds, torch.tensor([1.0]), grid, ids, flow.text_ids(1, 16),
                torch.full((1,), 3.5), references=flow.pack_references(latents),
            )  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    for name in ("hidden_states", "img_ids", "txt_ids", "encoder_hidden_states", "guidance"):
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(ours["timestep"], theirs["timestep"])
    # The prediction covers target and reference tokens; the loss takes the target's 16 only.
    assert out["pred"].shape[1] == 16 + 16 + 24
    target = flow.pack(grid - x0)
    torch.testing.assert_close(loss, ((out["pred"][:, :16] - target) ** 2).mean())
