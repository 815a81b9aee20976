"""The optimizer and learning-rate schedule of a run, built from `recipe.training` (used by `train.Trainer`)."""

from __future__ import annotations

from typing import Any

import torch

from .config import Recipe


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.training
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    # Fused AdamW (one kernel for all LoRA tensors, on CUDA and CPU) also skips a step on device through
    # `found_inf`, so the NaN guard needs no host sync.
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(
        params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay, fused=fused or None
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True when `optimizer.step()` honours a `found_inf` tensor (fused AdamW), so skipping needs no host sync."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe) -> Any:
    from diffusers.optimization import get_scheduler

    t = recipe.training
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.max_steps)
