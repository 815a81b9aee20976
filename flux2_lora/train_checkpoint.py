"""What a Trainer writes and reads back: its checkpoints (`save_checkpoint`), the final LoRA (`export_lora`), and a
resume (`check_resume` before anything loads, `restore` once the model and optimizer are built).

The files themselves (layout, atomic writes, retention, `latest`) are `checkpoint.py`; this module decides what
goes into them. Each function takes the `train.Trainer` (typed `Any`: this module must not import `train`) and
reads the attributes its setup made: accelerator, model, optimizer, lr_scheduler, state, callbacks, recipe, out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .callbacks import TrainingError
from .distributed import all_finite, optimizer_state, trainable_state
from .ema import EMA_STATE_FILE, read_state, save_state
from .model import adapter_kind, pipeline_class
from .run_files import drop_metrics_after
from .sources import largest_resolution

# Version of the data order (data/stream.py): a checkpoint with another one resumes, but not bitwise.
DATA_ORDER = 2


@dataclass
class TrainState:
    """What the loop itself must remember across a resume (saved as JSON in each checkpoint)."""

    step: int = 0
    val_history: list[tuple[int, float]] = field(default_factory=list)
    callbacks: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------- saving
def lora_metadata(trainer: Any) -> dict[str, Any]:
    r = trainer.recipe
    return {
        "base_model": r.model.name_or_path,
        "family": trainer.src.family,
        "trigger": r.data.trigger or "",
        "type": adapter_kind(r.lora),
        "rank": r.lora.rank,
        "alpha": r.lora.alpha if r.lora.alpha is not None else r.lora.rank,
        "targets": r.lora.targets,
        "steps": trainer.state.step,
        "resolution": largest_resolution(r.data),
    }


def require_finite(trainer: Any) -> None:
    """Stop, writing nothing, when the LoRA's weights are no longer finite (every process calls this)."""
    if all_finite(trainer.accelerator, trainer.trainable):
        return
    ckpts = ckpt.list_checkpoints(trainer.out / "checkpoints")
    last = f"the last checkpoint, {ckpts[-1]}, is from before" if ckpts else "no checkpoint was written before it"
    raise TrainingError(
        f"training diverged: the LoRA's weights are non-finite (NaN/inf) at step {trainer.state.step}, so nothing "
        f"was saved ({last}); lower training.lr (now {trainer.recipe.training.lr:g}) and start again"
    )


def ema_path(path: Path) -> Path:
    """Where the EMA's LoRA goes beside the LoRA at `path` (lora.safetensors -> lora_ema.safetensors)."""
    return path.with_name(f"{path.stem}_ema{path.suffix}")


def write_loras(
    trainer: Any, model: Any, path: Path, trainable: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None
) -> None:
    """The LoRA at `path` and, with training.ema_decay, the EMA of its weights beside it (`ema_path`): the same
    diffusers format, keys and alpha folding; the EMA's header adds `flux2_lora.ema_decay`."""
    cls, meta = pipeline_class(trainer.src), lora_metadata(trainer)
    ckpt.save_lora(path, model, cls, trainer.lora_config, meta, state_dict=trainable)
    if ema is not None:
        meta = {**meta, "weights": "ema", "ema_decay": trainer.ema.decay}
        ckpt.save_lora(ema_path(path), model, cls, trainer.lora_config, meta, state_dict=ema)


def export_lora(trainer: Any, path: Path) -> Path:
    """The LoRA as one diffusers-format file at `path`, with its EMA beside it where there is one (every process
    calls this; the main one writes)."""
    require_finite(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = trainable_state(model)  # every process: gathers sharded LoRA tensors
    ema = trainer.ema.state() if trainer.ema is not None else None  # gathers the EMA's shards alike
    if trainer.is_main:
        write_loras(trainer, model, path, trainable, ema)
    trainer.accelerator.wait_for_everyone()
    return path


def save_checkpoint(trainer: Any) -> None:
    """OUTPUT/checkpoints/step-N: LoRA weights, optimizer, schedule, callbacks, RNG and the data position."""
    require_finite(trainer)  # a checkpoint with NaN weights would only resume into NaN
    acc = trainer.accelerator
    step = trainer.state.step
    model = acc.unwrap_model(trainer.model)
    # Every process takes part in gathering sharded tensors; the main process writes them.
    trainable, optimizer = trainable_state(model), optimizer_state(trainer.optimizer, model)
    ema = trainer.ema.state() if trainer.ema is not None else None
    if trainer.is_main:
        state = {
            "step": step,
            "val_history": trainer.state.val_history,
            "lr_scheduler": trainer.lr_scheduler.state_dict(),
            "callbacks": {k: cb.state_dict() for k, cb in trainer.callbacks.items()},
            "world_size": acc.num_processes,
            "strategy": trainer.strategy,
            # The data position is `step` global batches of this size (any process count may resume it).
            "global_batch": trainer.global_batch,
            "data_order": DATA_ORDER,
            "num_workers": trainer.num_workers,
            "recipe": trainer.recipe.to_dict(),
        }
        rng = {"torch": torch.get_rng_state()}  # LoRA dropout; the data draws need no state (see draws.py)
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        path = ckpt.save_checkpoint(
            trainer.out / "checkpoints",
            step,
            trainable,
            optimizer,
            state,
            rng,
            export_lora=lambda p: write_files(trainer, model, p, trainable, ema),
            keep_last=trainer.recipe.output.keep_last,
        )
        trainer._print(f"checkpoint saved: {path}")
    acc.wait_for_everyone()


def write_files(
    trainer: Any, model: Any, path: Path, trainable: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None
) -> None:
    """A checkpoint's LoRA files (`write_loras`) and, with an EMA, its exact fp32 tensors (ema.safetensors)."""
    write_loras(trainer, model, path, trainable, ema)
    if ema is not None:
        save_state(path.parent, ema, trainer.ema.decay)


# -------------------------------------------------------------------------------------------- resuming
def check_resume(trainer: Any) -> Path | None:
    """Choose the checkpoint to resume (None: start from step 0) and refuse, before anything is loaded, one this
    run cannot continue exactly (one line each). Then set aside the checkpoints after it: they belong to the line
    of training this resume replaces, and must neither be deleted by retention nor be what `latest` names."""
    if not trainer.resume:
        return None
    root = trainer.out / "checkpoints"
    path, notes = ckpt.resolve_resume(trainer.resume, root)
    for note in notes:
        trainer._print(note)
    start = ckpt.read_state(path)["step"] if path is not None else 0
    if path is not None:
        check_state(trainer, path)
    trainer.accelerator.wait_for_everyone()  # every process has chosen before anything moves
    if trainer.is_main:
        # A checkpoint from elsewhere (a set-aside folder, another run) continues another line of training: every
        # checkpoint in `root` belongs to the line it replaces, older steps too (retention would delete them).
        own = path is None or path.resolve().parent == root.resolve()
        moved = ckpt.set_aside_after(root, start if own else -1)
        if moved:
            why = f"after step {start}" if own else f"not the line of {path}"
            trainer._print(
                f"resume: set aside {', '.join(p.name for p in moved)} ({why}, from the line of "
                f"training this resume replaces) in {moved[0].parent}"
            )
    trainer.accelerator.wait_for_everyone()
    return path


def check_state(trainer: Any, path: Path) -> None:
    """Refuse a checkpoint of another global batch, another optimizer or past training.max_steps; note one of another
    data order."""
    state = ckpt.read_state(path)
    t = trainer.recipe.training
    saved = state.get("global_batch")
    if saved is None:  # written before the global-batch data order
        old = state.get("recipe", {}).get("training", {})
        saved = old.get("batch_size", 1) * state.get("world_size", 1) * old.get("gradient_accumulation", 1)
    if saved != trainer.global_batch:
        raise ckpt.CheckpointError(
            f"--resume: {path} trained global batches of {saved} samples, this run's are {trainer.global_batch} "
            f"(training.batch_size {t.batch_size} x {trainer.accelerator.num_processes} process(es) x "
            f"training.gradient_accumulation {t.gradient_accumulation}); choose batch size and accumulation so "
            f"that their product with the processes is {saved}"
        )
    optimizer = state.get("recipe", {}).get("training", {}).get("optimizer", "adamw")
    if optimizer != t.optimizer:  # another optimizer's state would load without a word and fail at its first step
        raise ckpt.CheckpointError(
            f"--resume: {path} was trained with training.optimizer {optimizer}, this recipe uses {t.optimizer}; "
            f"resume with {optimizer} (an optimizer's state does not carry over to another)"
        )
    if state.get("data_order") != DATA_ORDER:
        trainer._print(
            f"resume: {path} was written by an older version with another data order; training continues "
            "from its weights, but not on the exact samples an uninterrupted run would have seen"
        )
    if state["step"] > t.max_steps:
        raise ckpt.CheckpointError(
            f"--resume: {path} is at step {state['step']}, past training.max_steps {t.max_steps}; "
            "raise --steps to train further"
        )


def restore(trainer: Any, path: Path) -> None:
    """Load the checkpoint into the trainer: weights, optimizer, lr schedule, callbacks, `trainer.state` and RNG."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    state, rng = ckpt.load_checkpoint(path, model, trainer.optimizer)
    t = trainer.recipe.training
    if "lr_scheduler" not in state or "torch" not in rng:
        raise ckpt.CheckpointError(f"--resume: {path} is damaged (no learning-rate schedule or RNG state)")
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if trainer.ema is not None:
        saved = read_state(path)
        if saved is None:  # a checkpoint of a run without an EMA: it starts here, from the resumed weights
            trainer.ema.reset()
            trainer._print(f"resume: {path} holds no EMA (training.ema_decay was 0); the EMA starts from its weights")
        else:
            trainer.ema.load(saved, str(path / EMA_STATE_FILE))
    before = state.get("recipe", {}).get("training", {}).get("max_steps", t.max_steps)
    if before != t.max_steps:  # extended (or shortened) run: the schedule now runs to the new last step
        sched = trainer.lr_scheduler  # LambdaLR: lr = base lr x lambda(step), the lambda made for the new total
        lrs = [base * f(sched.last_epoch) for f, base in zip(sched.lr_lambdas, sched.base_lrs, strict=True)]
        for group, lr in zip(trainer.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        trainer._print(
            f"resume: training.max_steps {before} -> {t.max_steps}; the {t.lr_scheduler} lr schedule now ends "
            f"at step {t.max_steps} (lr {lrs[0]:.3g} at step {state['step']})"
        )
    for k, cb in trainer.callbacks.items():
        cb.load_state_dict(state.get("callbacks", {}).get(k, {}))
    history = [tuple(v) for v in state.get("val_history", [])]
    trainer.state = TrainState(step=state["step"], val_history=history)  # type: ignore[arg-type]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if trainer.is_main:
        drop_metrics_after(trainer.out, trainer.state.step)
    moved = state.get("world_size", 1) != trainer.accelerator.num_processes
    trainer._print(
        f"resumed from {path} at step {trainer.state.step}"
        + (
            f" (written by {state.get('world_size')} processes, continuing on {trainer.accelerator.num_processes})"
            if moved
            else ""
        )
    )
