"""Stop and guard conditions checked by the loop after each optimizer step. Their state is checkpointed."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch

from .errors import TrainingError


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


class Interrupted(TrainingError):
    """A signal arrived before the training loop started (nothing to checkpoint yet)."""

    def __init__(self, signame: str, stage: str):
        requeue = signame != "SIGINT"
        super().__init__(
            f"interrupted by {signame} during {stage}, before the first training step; no checkpoint was written, "
            "so the next run starts this stage again (a finished cache is reused)"
        )
        self.exit_code = SignalStop.EXIT_REQUEUE if requeue else SignalStop.EXIT_INTERRUPTED


class SignalStop:
    """SIGUSR1 / SIGTERM (a scheduler's warning before a time limit or preemption) and Ctrl-C: checkpoint and exit.

    Before the loop (`stage` set: loading, the cache stage) a signal raises Interrupted, naming the stage. In the
    loop the handler only records the signal; the loop stops after the current optimizer step, writes a checkpoint,
    and the process exits with EXIT_REQUEUE (SIGUSR1/SIGTERM: batch scripts read it as "requeue me, resume from
    latest") or EXIT_INTERRUPTED (Ctrl-C). A second Ctrl-C exits at once.
    """

    EXIT_REQUEUE = 75  # EX_TEMPFAIL
    EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

    def __init__(self) -> None:
        self.received = ""
        self.stage: str | None = "setup"
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def arm(self) -> None:
        """From now on a signal stops the loop after the current step (with a checkpoint) instead of raising."""
        self.stage = None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stage is not None:
            raise Interrupted(name, self.stage)
        if name == "SIGINT":
            if self.received == "SIGINT":
                raise KeyboardInterrupt
            os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint (Ctrl-C again to exit at once)\n")
        self.received = self.received or name

    def update(self, step: int) -> str:
        return f"received {self.received}" if self.received else ""

    @property
    def exit_code(self) -> int:
        return self.EXIT_INTERRUPTED if self.received == "SIGINT" else self.EXIT_REQUEUE

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class StopVote:
    """A stop asked for by any process is taken by all of them at the same step, without a per-step host sync.

    Each step, every process adds its local flags (a signal; any other reason, e.g. its own clock) to an
    all-reduce on the device; the host reads the result one step later (it waits only for that earlier reduce,
    which finished before the current step's work), so all processes see the same values at the same step and
    take the same path. One process needs no vote. Returns (reason, stopped by a signal).
    """

    def __init__(self, accelerator: Any, device: torch.device):
        self.acc, self.device = accelerator, device
        self.pin = device.type == "cuda"
        self.pending: tuple[torch.Tensor, Any, str, str] | None = None

    def update(self, signal_reason: str, other_reason: str) -> tuple[str, bool]:
        if self.acc.num_processes == 1:
            return signal_reason or other_reason, bool(signal_reason)
        local = torch.tensor([float(bool(signal_reason)), float(bool(other_reason))], pin_memory=self.pin)
        total = self.acc.reduce(local.to(self.device, non_blocking=True), reduction="sum")
        host = torch.empty(2, pin_memory=self.pin)
        host.copy_(total, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        previous, self.pending = self.pending, (host, event, signal_reason, other_reason)
        if previous is None:
            return "", False
        prev_host, prev_event, prev_signal, prev_other = previous
        if prev_event is not None:
            prev_event.synchronize()
        signalled, other = (float(v) > 0 for v in prev_host)
        if signalled:
            return prev_signal or signal_reason or "received a signal on another process", True
        if other:
            return prev_other or other_reason or "another process asked to stop", False
        return "", False
