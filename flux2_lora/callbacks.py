"""Stop and guard conditions checked by the loop after each optimizer step. Their state is checkpointed."""

from __future__ import annotations

import time
from typing import Any


class EarlyStopping:
    """Stop after `patience` validations without the validation loss improving by more than min_delta."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best = float("inf")
        self.bad = 0

    def update(self, val_loss: float, step: int) -> str:
        if not self.patience:
            return ""
        if val_loss < self.best - self.min_delta:
            self.best, self.bad = val_loss, 0
            return ""
        self.bad += 1
        if self.bad >= self.patience:
            return f"early stopping: validation loss has not improved on {self.best:.5f} for {self.bad} validations"
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.best, self.bad = d.get("best", float("inf")), d.get("bad", 0)


class WallClock:
    """Stop (after a checkpoint) once `minutes` of training time have passed in this process."""

    def __init__(self, minutes: float):
        self.limit = minutes * 60.0
        self.start = time.monotonic()

    def update(self, step: int) -> str:
        if self.limit and time.monotonic() - self.start >= self.limit:
            return f"max wall time of {self.limit / 60:.1f} minutes reached"
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass


class NanGuard:
    """Count steps skipped for a non-finite loss or gradient; stop after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.streak = 0
        self.skipped = 0

    def update(self, finite: bool, step: int) -> str:
        if finite:
            self.streak = 0
            return ""
        self.streak += 1
        self.skipped += 1
        if self.streak >= self.max_consecutive:
            return f"{self.streak} non-finite steps in a row (lower training.lr or use fp32/bf16)"
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "skipped": self.skipped}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.streak, self.skipped = d.get("streak", 0), d.get("skipped", 0)
