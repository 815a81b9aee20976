"""`flux2-lora train` and `flux2-lora model make-tiny`."""

from __future__ import annotations

from typing import Literal

from ..config import Recipe


def train(recipe: Recipe, resume: str | None = None) -> int:
    """Train a FLUX.2 LoRA. Presets: {presets}. Every field: recipes/base.yaml.

    Args:
        resume: `latest` or a checkpoints/step-N folder.
    """
    from ..train import Trainer, run

    trainer = Trainer(recipe, resume)
    final = run(trainer)
    return 0 if final is not None else trainer.signals.exit_code


def make_tiny(*, out: str, family: Literal["dev", "klein"] = "dev", seed: int = 0) -> None:
    """Write a tiny random FLUX.2 pipeline.

    Args:
        out: Folder to write (diffusers save_pretrained layout).
        family: FLUX.2 family.
        seed: Weight seed.
    """
    from ..model import make_tiny_pipeline

    print(make_tiny_pipeline(out, family=family, seed=seed))
