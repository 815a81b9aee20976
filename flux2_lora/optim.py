"""The optimizer and learning-rate schedule of a run, built from `recipe.training` (used by `train.Trainer`).

- `adamw`: torch's fused AdamW. `adamw8bit`: bitsandbytes' AdamW8bit.
- `prodigy`: prodigyopt's Prodigy, which estimates its own step size d; `training.lr` multiplies it (1.0, checked in
  config.validate). Its diffusion settings are diffusers' DreamBooth LoRA scripts' defaults (after Prodigy's README):
  bias correction and safeguard_warmup on, decoupled weight decay.
- `adafactor`: transformers' Adafactor with the recipe's lr as given (relative_step, scale_parameter and warmup_init
  off, as its docstring recommends for an external schedule), no first moment: factored second moments only.

Neither of the last two honours `found_inf`, so the NaN guard skips their step from the host (`Trainer._step_unless`).
Their state is saved per parameter like AdamW's (`distributed.optimizer_state`): Prodigy's tensors (exp_avg,
exp_avg_sq, s, p0) and its group scalars (d, d0, d_max, d_numerator, k, ...) in optimizer.json, Adafactor's row and
column moments and step.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch

from .config import Recipe


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.training
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay" on every process
            return Prodigy(
                params,
                lr=t.lr,
                betas=t.betas,
                eps=t.eps,
                weight_decay=t.weight_decay,
                decouple=True,
                use_bias_correction=True,
                safeguard_warmup=True,
            )
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=t.lr, weight_decay=t.weight_decay, relative_step=False, scale_parameter=False, warmup_init=False
        )
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
