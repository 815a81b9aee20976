"""Quality metrics on CLIP embeddings (all inputs L2-normalised, rows = images or texts), and the ranking score.

clip_score   100 * max(cos(image, text), 0) per pair: how well a generation matches its prompt.
diversity    mean pairwise cosine distance 1 - cos between generations of one prompt over seeds
             (0: every seed gave the same picture; higher: more varied).
overfitting  cosine similarity of each generation to its nearest training image; a generation at or above
             the threshold (default 0.95) is flagged as a likely copy of that training image.

The composite score that ranks checkpoints (`select-best`), over the N checkpoints being compared:

    score = w_loss * L + w_clip * C + w_diversity * D - w_overfit * O

    L = (loss_max - loss) / (loss_max - loss_min)      1 for the lowest validation loss, 0 for the highest
    C = (clip - clip_min) / (clip_max - clip_min)      1 for the highest mean CLIP score
    D = (div - div_min) / (div_max - div_min)          1 for the most diverse
    O = share of the checkpoint's generations flagged as overfit (0..1, not rescaled)

A term whose values are all equal contributes its full weight to every checkpoint (it cannot separate
them); a term whose weight is 0 is not computed. Ties go to the lower validation loss, then the earlier step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

OVERFIT_THRESHOLD = 0.95
DEFAULT_WEIGHTS = {"loss": 1.0, "clip": 1.0, "diversity": 0.5, "overfit": 2.0}


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score, 100 * max(cos, 0), for matching rows of (N, D) image and text embeddings."""
    return 100.0 * (image_emb * text_emb).sum(-1).clamp(min=0.0)


def diversity(image_emb: torch.Tensor) -> float:
    """Mean pairwise cosine distance (1 - cos) of N >= 2 image embeddings; 0.0 for fewer than two."""
    n = image_emb.shape[0]
    if n < 2:
        return 0.0
    sim = image_emb @ image_emb.T
    iu = torch.triu_indices(n, n, offset=1)
    dist = (1.0 - sim[iu[0], iu[1]]).clamp(min=0.0)
    value = float(dist.mean())
    return 0.0 if value < 1e-6 else value  # identical images: float noise, not diversity


@dataclass
class Overfit:
    """Nearest training image of each generation and whether it is flagged as memorised."""

    similarity: list[float]
    nearest: list[int]
    flagged: list[bool]
    threshold: float

    @property
    def fraction(self) -> float:
        return sum(self.flagged) / len(self.flagged) if self.flagged else 0.0

    @property
    def mean_similarity(self) -> float:
        return sum(self.similarity) / len(self.similarity) if self.similarity else 0.0

    @property
    def max_similarity(self) -> float:
        return max(self.similarity, default=0.0)


def overfitting(gen_emb: torch.Tensor, train_emb: torch.Tensor, threshold: float = OVERFIT_THRESHOLD) -> Overfit:
    """For each generation: cosine similarity to the nearest training image, its index, and sim >= threshold."""
    if gen_emb.shape[0] == 0 or train_emb.shape[0] == 0:
        return Overfit([], [], [], threshold)
    best, idx = (gen_emb @ train_emb.T).max(dim=1)
    sims = [min(float(s), 1.0) for s in best]
    return Overfit(sims, [int(i) for i in idx], [s >= threshold - 1e-6 for s in sims], threshold)


def _unit(values: Sequence[float | None], higher_is_better: bool) -> list[float]:
    """Min-max rescale to [0, 1] with 1 the best; all-equal (or missing) values give 1."""
    present = [v for v in values if v is not None]
    if not present:
        return [1.0] * len(values)
    lo, hi = min(present), max(present)
    out = []
    for v in values:
        if v is None or hi == lo:
            out.append(1.0 if v is not None else 0.0)
        else:
            out.append((v - lo) / (hi - lo) if higher_is_better else (hi - v) / (hi - lo))
    return out


def rank(rows: list[dict[str, Any]], weights: dict[str, float]) -> list[dict[str, Any]]:
    """Rows (each with `val_loss`, `clip_score`, `diversity`, `overfit_fraction`, `step`) sorted best first.

    Each returned row gains `score` and `terms` (the rescaled L, C, D, O before weighting)."""
    w = {**DEFAULT_WEIGHTS, **weights}
    terms = {
        "loss": _unit([r.get("val_loss") for r in rows], higher_is_better=False),
        "clip": _unit([r.get("clip_score") for r in rows], higher_is_better=True),
        "diversity": _unit([r.get("diversity") for r in rows], higher_is_better=True),
        "overfit": [float(r.get("overfit_fraction") or 0.0) for r in rows],
    }
    out = []
    for i, r in enumerate(rows):
        t = {k: terms[k][i] for k in terms}
        score = sum(w[k] * t[k] for k in ("loss", "clip", "diversity")) - w["overfit"] * t["overfit"]
        out.append({**r, "score": round(score, 6), "terms": {k: round(v, 6) for k, v in t.items()}})

    def key(r: dict[str, Any]) -> tuple[float, float, int]:
        loss = r.get("val_loss")
        return (-r["score"], loss if loss is not None else float("inf"), int(r.get("step") or 0))

    return sorted(out, key=key)
