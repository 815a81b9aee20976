"""The run folder (OUTPUT/) and what the trainer writes into it besides checkpoints: the lock, recipe.yaml,
metrics.jsonl, the TensorBoard / W&B trackers, and a failed read or write of these files told in one line.

The checkpoints themselves are `checkpoint.py` (the files) and `train_checkpoint.py` (what a Trainer puts in them).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoint as ckpt
from .config import Recipe

if TYPE_CHECKING:
    import torch


def lock_output(out: Path) -> Any:
    """Create OUTPUT and hold an exclusive lock on OUTPUT/.lock for the life of the run (keep what this returns):
    two runs never write one folder."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / ".lock", "a+")  # noqa: SIM115 - kept open on purpose: the lock lives as long as the run
    try:
        # A POSIX record lock: released when this process dies, and not inherited by forked data workers.
        fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "another process"
        fh.close()
        raise ckpt.CheckpointError(
            f"output.dir: {out} is in use by a running job (pid {owner}); wait for it or choose another --output"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def prepare_output(out: Path, recipe: Recipe, resume: str | None) -> None:
    """Refuse an OUTPUT (locked by `lock_output`) that cannot take this run; then make samples/ and write
    recipe.yaml. The main process only."""
    for name in ("checkpoints", "samples", "logs"):
        if (out / name).exists() and not (out / name).is_dir():
            raise ckpt.CheckpointError(
                f"output.dir: {out / name} is a file where the run keeps its {name} folder; choose another --output"
            )
    if not resume and ckpt.list_checkpoints(out / "checkpoints"):
        raise ckpt.CheckpointError(
            f"output.dir: {out} already holds checkpoints; continue it with --resume latest or choose another --output"
        )
    (out / "samples").mkdir(exist_ok=True)
    write_recipe(out / "recipe.yaml", recipe)


def write_recipe(path: Path, recipe: Recipe) -> None:
    import yaml

    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- metrics.jsonl and trackers
def init_trackers(accelerator: Any, recipe: Recipe, out: Path) -> None:
    """Start the TensorBoard / W&B trackers that `recipe.logging` asks for, with the recipe as their config."""
    lg = recipe.logging
    init_kwargs = {"wandb": {"mode": lg.wandb_mode, "dir": str(out)}} if lg.wandb else {}
    accelerator.init_trackers(lg.wandb_project, config=flat_dict(recipe.to_dict()), init_kwargs=init_kwargs)


def log_metrics(accelerator: Any, out: Path, rec: dict[str, Any]) -> None:
    """One record (it has a "step") to the trackers and as one line of OUTPUT/metrics.jsonl."""
    step = rec["step"]
    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def drop_metrics_after(out: Path, step: int) -> None:
    """On a resume: drop what the interrupted run logged after the checkpoint's step (those steps train again)."""
    if not (out / "metrics.jsonl").exists():
        return
    lines = (out / "metrics.jsonl").read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    ckpt.atomic_write_text(out / "metrics.jsonl", "".join(ln + "\n" for ln in kept))


def log_images(accelerator: Any, paths: list[Path], step: int) -> None:
    """The sample images of a validation, to TensorBoard and W&B (whichever trackers run)."""
    import numpy as np
    from PIL import Image

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("samples", images, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": [wandb.Image(str(p)) for p in paths]}, step=step)


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted keys, with values trackers accept (numbers, strings, booleans)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_dict(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


# ------------------------------------------------------------------------------------ storage failures
# Operating-system errors that mean "this machine cannot store the run" (not a bug): reported in one line.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def storage_error(e: BaseException, out: Path) -> ckpt.CheckpointError | None:
    """A failed read or write of the run's files as one line: the path, the reason, what is intact, what to do."""
    if isinstance(e, ckpt.CheckpointError) and str(e).startswith("cannot write"):
        text = str(e)
        reasons = {os.strerror(n): n for n in STORAGE_ERRNOS}
        code = next((n for r, n in reasons.items() if text.endswith(r)), None)
    elif isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        text, code = f"{e.filename or out}: {e.strerror}", e.errno
    else:
        return None
    ckpts = ckpt.list_checkpoints(out / "checkpoints")
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        todo = "free some space and "
    elif code is not None:
        todo = "make the output folder writable (or choose another --output) and "
    else:
        todo = ""
    if ckpts:
        return ckpt.CheckpointError(
            f"{text}; the last checkpoint, {ckpts[-1]}, is intact; {todo}continue with --resume latest"
        )
    return ckpt.CheckpointError(f"{text}; no checkpoint had been written yet; {todo}start again")


def role_metrics(accelerator: Any, loss: torch.Tensor, count: torch.Tensor) -> dict[str, float]:
    """`loss_train` / `loss_regularisation` for metrics.jsonl: the mean plain loss of each role's samples over the
    logging window, from per-role sums and counts (summed over processes; both are reset)."""
    sums, counts = accelerator.reduce(loss, "sum").tolist(), accelerator.reduce(count, "sum").tolist()
    loss.zero_()
    count.zero_()
    return {f"loss_{name}": sums[k] / counts[k] for k, name in enumerate(("train", "regularisation")) if counts[k] > 0}
