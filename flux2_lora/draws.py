"""Every random draw of a training sample, from (seed, data pass, sample key) alone.

A sample gets the same flip, caption dropout, sigma, noise and (editing) reference choice whichever process or
micro-batch it lands in and whether or not the run was resumed: the draws need no RNG state, and N processes give
the LoRA of one process with the same global batches. The reference draws (reference dropout, the choice of
data.max_references) use a generator of their own, so a dataset without references draws exactly as before they
existed; so does the choice of a cached caption variant (data/captions.py), made where the sample is read.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .flow import sample_sigmas, shift_sigmas

Refs = tuple[torch.Tensor, ...]  # one sample's reference latents (C, H_i, W_i), in order


def sample_seed(seed: int, data_pass: int, key: str) -> int:
    """A stable 63-bit seed for one sample's random draws in one pass over the data."""
    digest = hashlib.blake2b(f"{seed}:{data_pass}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def choose_caption_variant(count: int, seed: int) -> int:
    """Which of a sample's `count` cached caption variants it trains with in one pass (data/captions.py): a uniform
    choice from `seed` = sample_seed(seed, data pass, draw key + "#caption"), a generator of its own."""
    if count <= 1:
        return 0
    return int(torch.randint(count, (), generator=torch.Generator().manual_seed(seed)))


def choose_references(count: int, seed: int, dropout: float, most: int) -> tuple[int, ...]:
    """Which of a sample's `count` references it trains with: none with probability `dropout`, else all of them,
    or a seeded choice of `most` of them in their order."""
    g = torch.Generator().manual_seed(seed)
    if dropout > 0 and bool(torch.rand((), generator=g) < dropout):
        return ()
    if count <= most:
        return tuple(range(count))
    return tuple(sorted(torch.randperm(count, generator=g)[:most].tolist()))


def draw_batch(
    batch: dict[str, Any], data: Any, training: Any, empty_embeds: torch.Tensor, pin: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[Refs], torch.Tensor | None]:
    """(latents, prompt embeddings, sigmas, noise, references, loss mask) of one micro-batch (`data.stream.collate`),
    with its flips, caption dropout and, for an editing dataset, each sample's references after reference dropout and
    data.max_references; the loss mask (B, h, w) is None without masks, a flipped sample's flipped (data/masks.py).
    `data`/`training` are the recipe's groups; `pin` pins host copies for the GPU."""
    d, t = data, training
    latents, embeds, mask = batch["latents"], batch["prompt_embeds"], batch.get("mask")
    all_refs: list[torch.Tensor] = batch.get("references", [])
    sigmas, noises, refs = [], [], []
    dropouts = batch.get("caption_dropout") or [None] * len(batch["keys"])  # per sample: its source's
    for j, (key, data_pass) in enumerate(zip(batch["keys"], batch["passes"], strict=True)):
        caption_dropout = d.caption_dropout if dropouts[j] is None else dropouts[j]
        # (a batch tensor is copied only when one of its samples changes)
        g = torch.Generator().manual_seed(sample_seed(t.seed, data_pass, key))
        flip = d.random_flip and bool(torch.rand((), generator=g) < 0.5)
        if flip:
            latents = latents.clone() if latents is batch["latents"] else latents
            latents[j] = batch["latents_flip"][j]
            if mask is not None:
                mask = mask.clone() if mask is batch["mask"] else mask
                mask[j] = batch["mask_flip"][j]
        if caption_dropout > 0 and bool(torch.rand((), generator=g) < caption_dropout):
            embeds = embeds.clone() if embeds is batch["prompt_embeds"] else embeds
            embeds[j] = empty_embeds
        sigma = sample_sigmas(1, t.timestep_sampling, g, t.logit_mean, t.logit_std, t.mode_scale)
        # training.timestep_shift draws nothing; `auto` shifts by the sample's bucket: its latent grid's tokens.
        sigmas.append(shift_sigmas(sigma, t.timestep_shift, latents.shape[-2] * latents.shape[-1]))
        noises.append(torch.randn(latents.shape[1:], generator=g))
        if all_refs:  # a flipped target trains with flipped references
            source = batch["references_flip"] if flip else all_refs
            seed = sample_seed(t.seed, data_pass, key + "#references")
            chosen = choose_references(len(all_refs), seed, d.reference_dropout, d.max_references)
            refs.append(tuple(source[n][j] for n in chosen))
        else:
            refs.append(())
    sigma, noise = torch.cat(sigmas), torch.stack(noises)
    if pin:  # pinned host memory keeps the copies to the device asynchronous
        latents = latents if latents is batch["latents"] else latents.pin_memory()
        embeds = embeds if embeds is batch["prompt_embeds"] else embeds.pin_memory()
        sigma, noise = sigma.pin_memory(), noise.pin_memory()
        mask = mask if mask is None or mask is batch["mask"] else mask.pin_memory()
    return latents, embeds, sigma, noise, refs, mask


__all__ = ["Refs", "choose_caption_variant", "choose_references", "draw_batch", "sample_seed"]
