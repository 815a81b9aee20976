"""Sample images with the current LoRA through diffusers' own FLUX.2 pipeline (fixed seeds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .flow import frozen_dtype
from .model import load_scheduler, load_vae, pipeline_class


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid


@torch.no_grad()
def render_samples(trainer: Any, step: int, save: bool = True) -> list[Path]:
    """One PNG per sample prompt (seed = validation.seed + prompt index) and a grid, under OUTPUT/samples.

    With sharded parameters (FSDP2, ZeRO-3) every process must run the forward passes; only the one with
    `save` writes the images."""
    r = trainer.recipe
    v = r.validation
    src = trainer.src
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    dtype = frozen_dtype(model)
    vae = load_vae(src, dtype=dtype).to(trainer.device)  # the pipeline hands the VAE latents in this dtype
    cls = pipeline_class(src)
    pipe = cls(scheduler=load_scheduler(src), vae=vae, text_encoder=None, tokenizer=None, transformer=model)
    pipe.set_progress_bar_config(disable=True)
    size = v.sample_resolution or r.data.resolution
    out_dir = trainer.out / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    images = []
    empty = trainer.empty_embeds.unsqueeze(0).to(trainer.device, dtype)
    for j, embeds in enumerate(trainer.sample_embeds):
        kwargs: dict[str, Any] = dict(
            prompt_embeds=embeds.unsqueeze(0).to(trainer.device, dtype),
            height=size,
            width=size,
            num_inference_steps=v.sample_steps,
            guidance_scale=v.sample_guidance,
            generator=torch.Generator().manual_seed(v.seed + j),
            text_encoder_out_layers=src.text_layers,
        )
        if src.family == "klein":
            kwargs["negative_prompt_embeds"] = empty
        image = pipe(**kwargs).images[0]
        path = out_dir / f"step-{step:06d}-prompt-{j}.png"
        if save:
            image.save(path)
            paths.append(path)
        images.append(image)
    if images and save:
        image_grid(images).save(out_dir / f"step-{step:06d}-grid.png")
    del pipe
    vae.to("cpu")
    del vae
    model.train(was_training)
    return paths
