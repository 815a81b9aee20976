"""Sample images with the current LoRA through diffusers' own FLUX.2 pipeline (fixed seeds).

A sample prompt with reference images (`validation.prompts: [{prompt: ..., images: [...]}]`) renders as an edit,
`pipeline(image=[...])` at the sample size; the grid shows its references in a strip left of the sample.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .flow import frozen_dtype
from .model import load_scheduler, load_vae, pipeline_class
from .references import open_reference
from .sources import largest_resolution

BACKDROP = (40, 40, 40)  # behind the references in a strip or tile


def reference_tile(references: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """The references laid out in a (width, height) tile, in order, each scaled to fit its cell (aspect kept), in as
    many columns as makes them largest; an empty list gives an empty tile."""
    width, height = size
    tile = Image.new("RGB", size, BACKDROP)
    n = len(references)
    if not n:
        return tile

    def cell(cols: int) -> tuple[int, int]:
        return width // cols, height // math.ceil(n / cols)

    cols = max(range(1, n + 1), key=lambda c: min(cell(c)))
    cw, ch = cell(cols)
    for k, ref in enumerate(references):
        scale = min(cw / ref.width, ch / ref.height)
        thumb = ref.resize((max(1, int(ref.width * scale)), max(1, int(ref.height * scale))), Image.Resampling.LANCZOS)
        x, y = (k % cols) * cw + (cw - thumb.width) // 2, (k // cols) * ch + (ch - thumb.height) // 2
        tile.paste(thumb, (x, y))
    return tile


def beside_references(image: Image.Image, references: list[Image.Image]) -> Image.Image:
    """The sample with a strip of its references on its left, a third of its width (blank without references)."""
    strip = reference_tile(references, (max(1, image.width // 3), image.height))
    out = Image.new("RGB", (strip.width + image.width, image.height))
    out.paste(strip, (0, 0))
    out.paste(image, (strip.width, 0))
    return out


def sample_references(validation: Any) -> list[list[Image.Image]]:
    """The reference images of each sample prompt (`validation.prompts`), in order; [] for a plain prompt."""
    return [
        [open_reference(path, f"validation.prompts[{j}].images[{k}]") for k, path in enumerate(paths)]
        for j, paths in enumerate(validation.prompt_images())
    ]


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

    A prompt with reference images renders with `image=[...]` (the references, at the sample size); in the grid each
    sample then has its references in a strip on its left (the PNGs hold the sample alone).

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
    size = v.sample_resolution or largest_resolution(r.data)
    out_dir = trainer.out / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    images = []
    references = sample_references(v)
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
        if references[j]:
            kwargs["image"] = references[j]
        image = pipe(**kwargs).images[0]
        path = out_dir / f"step-{step:06d}-prompt-{j}.png"
        if save:
            image.save(path)
            paths.append(path)
        images.append(image)
    if images and save:
        if any(references):
            images = [beside_references(im, refs) for im, refs in zip(images, references, strict=True)]
        image_grid(images).save(out_dir / f"step-{step:06d}-grid.png")
    del pipe
    vae.to("cpu")
    del vae
    model.train(was_training)
    return paths
