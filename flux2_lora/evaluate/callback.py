"""The evaluation metrics as a training callback: CLIP score and overfitting of each validation's samples.

Enabled by `validation.clip_score` / `validation.overfit_check`. The CLIP model loads once when training sets up
(a missing weights file stops the run before the first step), the training images are embedded once, and at
each validation the sample images (one per `validation.prompts` entry, fixed seeds) are scored. The values go
to metrics.jsonl and TensorBoard beside `val_loss`:

  clip_score               mean CLIP score of the samples against their prompts (trigger word left out)
  overfit_max_similarity   highest CLIP similarity of a sample to its nearest training image
  overfit_fraction         share of samples at or above validation.overfit_threshold (likely memorised)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import Recipe, RecipeError
from . import EvalError
from .clip import ClipModel, load_clip
from .generate import strip_trigger, training_images
from .metrics import clip_score, overfitting


class TrainingQuality:
    """Scores validation samples; built by `from_recipe`, called with the sample PNG paths (prompt order)."""

    def __init__(self, clip: ClipModel, texts: torch.Tensor | None, train: torch.Tensor | None, threshold: float):
        self.clip, self.texts, self.train, self.threshold = clip, texts, train, threshold

    @classmethod
    def from_recipe(cls, recipe: Recipe, device: torch.device | str = "cpu") -> TrainingQuality | None:
        v = recipe.validation
        if not (v.clip_score or v.overfit_check):
            return None
        try:
            clip = load_clip(v.clip_model, v.clip_weights, device=device)
            texts = (
                clip.embed_texts([strip_trigger(p, recipe.data.trigger) for p in v.prompt_texts()])
                if v.clip_score
                else None
            )
            train = None
            if v.overfit_check:
                _, _, images = training_images(recipe.data.dataset or "", recipe.data.instance_prompt)
                train = clip.embed_images(images)
        except EvalError as e:
            msg = (
                str(e)
                .replace("--clip-weights", "validation.clip_weights")
                .replace("--clip-model", "validation.clip_model")
            )
            raise RecipeError(msg.replace("--training-data", "validation.overfit_check: data.dataset")) from None
        return cls(clip, texts, train, v.overfit_threshold)

    def __call__(self, paths: list[Path], step: int) -> dict[str, Any]:
        images = [Image.open(p).convert("RGB") for p in paths]
        emb = self.clip.embed_images(images)
        out: dict[str, Any] = {}
        parts = []
        if self.texts is not None:
            out["clip_score"] = float(clip_score(emb, self.texts[: len(images)]).mean())
            parts.append(f"CLIP score {out['clip_score']:.2f}")
        if self.train is not None:
            of = overfitting(emb, self.train, self.threshold)
            out["overfit_max_similarity"] = of.max_similarity
            out["overfit_fraction"] = of.fraction
            parts.append(
                f"nearest training image similarity {of.max_similarity:.3f} "
                f"({sum(of.flagged)} of {len(of.flagged)} samples >= {self.threshold})"
            )
        tqdm.write(f"step {step}: " + ", ".join(parts), file=sys.stdout)
        return out
