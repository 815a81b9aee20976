"""What a Trainer does at each validation: the fixed-seed validation loss (`validation_loss`), then the sample
images and their quality scores (`validate_and_sample`), logged beside the training metrics.

With `validation.use_ema` both run with the EMA of the LoRA's weights swapped into the model (`ema.LoraEMA`), and
the exact previous weights go back afterwards, so training continues bitwise as if no validation had run; the
metrics record says `"val_ema": true`, which `eval select-best` reads to pair a logged loss with the right file.

Each function takes the `train.Trainer` (typed `Any`: this module must not import `train`) and reads what its
setup made: accelerator, model, recipe, state, val_samples, ema, and its `_flow_loss`, `_log` and `_print`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .draws import Refs
from .run_files import log_images
from .sampling import render_samples


@torch.no_grad()
def validation_loss(trainer: Any) -> float:
    """Mean loss over held-out items at fixed sigmas with fixed noise: comparable across steps and runs."""
    v = trainer.recipe.validation
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, item in enumerate(trainer.val_samples):
        g = torch.Generator().manual_seed(v.seed + i)
        x0 = item["latents"].unsqueeze(0)
        noise = torch.randn(x0.shape, generator=g)
        embeds = item["prompt_embeds"].unsqueeze(0)
        # An editing sample is scored with its references (the first data.max_references of them).
        count = min(len(item.get("references", [])), trainer.recipe.data.max_references)
        refs: list[Refs] = [tuple(item[f"ref.{k}"] for k in range(count))]
        mask = item["mask"].unsqueeze(0) if "mask" in item else None  # a masked sample: its mean over the mask
        for s in v.sigmas:
            loss = trainer._flow_loss(model, x0, embeds, torch.tensor([s]), noise, refs, None, mask).mean()
            total += float(loss)
            n += 1
    model.train(was_training)
    return total / max(n, 1)


def validate_and_sample(trainer: Any) -> float:
    """Validation loss, logged and handed to `trainer.on_validation`, then the samples (every process calls this)."""
    step = trainer.state.step
    use_ema = trainer.recipe.validation.use_ema and getattr(trainer, "ema", None) is not None
    with trainer.ema.swapped_in() if use_ema else contextlib.nullcontext():
        val = trainer.validation_loss()
        trainer.state.val_history.append((step, val))
        trainer._log({"step": step, "val_loss": val, **({"val_ema": True} if use_ema else {})})
        trainer._print(f"step {step}: validation loss {val:.5f}" + (" (EMA weights)" if use_ema else ""))
        for hook in trainer.on_validation:
            hook(step, val)
        if trainer.recipe.validation.prompts and (trainer.is_main or trainer._sharded):
            paths = render_samples(trainer, step, save=trainer.is_main)
            if paths:
                log_images(trainer.accelerator, paths, step)
                if trainer.quality is not None:
                    trainer._log({"step": step, **trainer.quality(paths, step)})
    trainer.accelerator.wait_for_everyone()
    return val
