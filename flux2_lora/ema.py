"""An exponential moving average (EMA) of the LoRA's weights, kept in fp32 beside the training (`training.ema_decay`).

After every optimizer update that was not skipped: ema <- d * ema + (1 - d) * w (`torch._foreach_lerp_`), starting
from the LoRA's weights when training starts (or those of the checkpoint it resumes). No warmup and no bias
correction: after n updates the starting weights still weigh d**n in the EMA (d = 0.999 over 1000 steps: 37%), so
choose d with n * (1 - d) well above 1. The skip flag of the NaN guard stays on the device: a skipped update
moves the EMA by a weight of 0, without a host sync.

Where the EMA lives follows where the trainable weights live:
  - one process, DDP: a fp32 copy of each whole parameter on the training device;
  - FSDP2: the fp32 EMA of this process's local shard of each DTensor parameter;
  - DeepSpeed ZeRO-1/2/3: the EMA of this process's partition of DeepSpeed's fp32 master weights (on the device,
    or in host memory where `distributed.offload` keeps the master weights there).
`state()` gathers whole tensors by parameter name (every process calls it, like `distributed.trainable_state`);
`load()` takes whole tensors back and keeps this process's part. `swapped_in()` puts the EMA into the model for a
validation and afterwards the exact previous weights back, so training continues bitwise as if nothing happened.

diffusers' `EMAModel` is not used: it always warms the decay up ((1 + t) / (10 + t)), counts its steps on the
host (a skipped update would need a host sync to leave out), and under ZeRO-3 gathers every parameter each step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .distributed import global_shape, is_sharded, is_zero, like
from .errors import CheckpointError

EMA_STATE_FILE = "ema.safetensors"  # in a checkpoint: the EMA's whole fp32 tensors by parameter name (exact resume)


def _zero_local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of a ZeRO parameter's fp32 master weights (a view where DeepSpeed keeps it here)."""
    if hasattr(p, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)  # type: ignore[no-any-return]
    mapping = p._hp_mapping  # type: ignore[attr-defined]  # ZeRO-1/2: the fragment of the flat fp32 partition
    return mapping.get_hp_fragment() if mapping is not None else torch.empty(0)


def _zero_set_local(p: torch.Tensor, value: torch.Tensor) -> None:
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(p, value)
    elif value.numel():
        p._hp_mapping.get_hp_fragment().data.copy_(value)  # type: ignore[attr-defined]


def master_local(p: torch.Tensor) -> torch.Tensor:
    """The part of a trainable parameter's weights this process updates: a ZeRO partition of the fp32 master
    weights, a DTensor's local shard, else the parameter itself."""
    if is_zero(p):
        return _zero_local(p)
    if is_sharded(p):
        return p.to_local()  # type: ignore[attr-defined,no-any-return]
    return p.detach()


class LoraEMA:
    """The EMA of a model's trainable parameters (taken once, after `accelerator.prepare`)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"training.ema_decay: must be in (0, 1) for an EMA, got {decay}")
        self.decay = float(decay)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.fsdp_modules = _fsdp_modules(model) if any(is_sharded(p) for _, p in self.params) else []
        self.shadow: list[torch.Tensor] = []
        self.reset()

    def reset(self) -> None:
        """Start the EMA from the current weights."""
        self.shadow = [master_local(p).detach().to(torch.float32, copy=True) for _, p in self.params]

    @torch.no_grad()
    def update(self, skipped: torch.Tensor | bool = False) -> None:
        """ema <- d * ema + (1 - d) * w, unless `skipped` (a 0-d bool, on the device: read there, not on the host)."""
        weight = (1.0 - self.decay) * (~torch.as_tensor(skipped)).to(torch.float32)
        groups: dict[torch.device, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for (_, p), e in zip(self.params, self.shadow, strict=True):
            w = master_local(p)
            es, ws = groups.setdefault(e.device, ([], []))
            es.append(e)
            ws.append(w if w.dtype == torch.float32 else w.float())
        for device, (es, ws) in groups.items():
            # One 0-d weight tensor per tensor (the `List` overload): a tensor passed as the scalar weight would be
            # read on the host (`.item()`, a sync on a GPU).
            w_dev = weight.to(device, non_blocking=True)
            torch._foreach_lerp_(es, ws, [w_dev] * len(es))

    # ------------------------------------------------------------------------------ whole tensors
    def _whole(self, p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The whole EMA tensor of `p` from every process's part (a collective where `p` is sharded)."""
        if is_zero(p):
            # DeepSpeed gathers its fp32 master weights; lend it the EMA's part for the time of one gather.
            from deepspeed.utils import safe_get_full_fp32_param

            keep = _zero_local(p).clone()
            _zero_set_local(p, e.to(keep.device))
            try:
                return safe_get_full_fp32_param(p).detach().clone()  # type: ignore[no-any-return]
            finally:
                _zero_set_local(p, keep)
        if is_sharded(p):
            from torch.distributed.tensor import DTensor

            dt = DTensor.from_local(e, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())  # type: ignore[attr-defined]
            return dt.full_tensor()
        return e

    @torch.no_grad()
    def state(self) -> dict[str, torch.Tensor]:
        """Whole fp32 EMA tensors by parameter name, copied to the CPU (every process calls this: it gathers shards)."""
        pairs = zip(self.params, self.shadow, strict=True)
        return {n: self._whole(p, e).detach().to("cpu", copy=True).contiguous() for (n, p), e in pairs}

    @torch.no_grad()
    def load(self, whole: dict[str, torch.Tensor], where: str) -> None:
        """Take whole tensors (from `state()`, any process count) and keep this process's part of each (`where`:
        the file they came from, for the one-line error when they do not fit the model)."""
        names = [n for n, _ in self.params]
        missing, unknown = [n for n in names if n not in whole], [n for n in whole if n not in names]
        wrong = [n for n, p in self.params if n in whole and tuple(whole[n].shape) != global_shape(p)]
        if missing or unknown or wrong:
            raise CheckpointError(
                f"--resume: {where} does not fit this recipe's LoRA ({len(missing)} missing, {len(unknown)} unexpected, "
                f"{len(wrong)} of another shape, e.g. {(missing or unknown or wrong)[0]}); resume with the recipe that "
                "wrote it"
            )
        for (n, p), e in zip(self.params, self.shadow, strict=True):
            value = whole[n].to(torch.float32)
            if is_zero(p):
                from deepspeed.utils import safe_set_full_fp32_param

                keep = _zero_local(p).clone()
                safe_set_full_fp32_param(p, value.to(keep.device))
                e.copy_(_zero_local(p))
                _zero_set_local(p, keep)
            elif is_sharded(p):
                e.copy_(like(value, p).to_local())  # type: ignore[attr-defined]
            else:
                e.copy_(value)

    # ------------------------------------------------------------------------------ validation
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model runs with the EMA weights inside the block; after it, the previous weights exactly (every
        process enters it: under ZeRO the EMA is gathered, and ZeRO-3 re-partitions what rank 0 writes)."""
        whole = self.state() if any(is_zero(p) for _, p in self.params) else {}
        keep: list[torch.Tensor | None] = []
        with torch.no_grad():
            _reshard(self.fsdp_modules)
            for (n, p), e in zip(self.params, self.shadow, strict=True):
                keep.append(_set_working(p, whole[n] if is_zero(p) else e, None))
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), k in zip(self.params, keep, strict=True):
                    _set_working(p, None, k)
                _reshard(self.fsdp_modules)

    def describe(self, steps: int) -> str:
        """One line: the decay, and how much the starting weights still weigh in the EMA at the last step."""
        left = self.decay**steps
        hint = f" (a decay of {1 - 3 / steps:.4g} leaves 5%)" if left > 0.05 and steps > 6 else ""
        return (
            f"ema   decay {self.decay:g} (fp32, after every update that is not skipped): at step {steps} the starting "
            f"weights still weigh {100 * left:.3g}% in the EMA{hint}"
        )


def _set_working(p: torch.Tensor, value: torch.Tensor | None, restore: torch.Tensor | None) -> torch.Tensor | None:
    """Write `value` (this process's EMA part; the whole tensor under ZeRO) into the weights the forward reads and
    return what was there; or, with `restore`, put that back."""
    if hasattr(p, "ds_id"):  # ZeRO-3: the working copy is partitioned; write it whole from rank 0
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if torch.distributed.get_rank() != 0:
                return None
            old = p.data.clone() if restore is None else None
            p.data.copy_(restore if restore is not None else value.to(p.device, p.dtype))  # type: ignore[union-attr]
            return old
    target = p.to_local() if is_sharded(p) else p.data  # type: ignore[attr-defined]
    old = target.clone() if restore is None else None
    target.copy_(restore if restore is not None else value.to(target.device, target.dtype))  # type: ignore[union-attr]
    return old


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshard(modules: list[Any]) -> None:
    """FSDP2 keeps a module's parameters gathered after a forward without backward where it does not reshard after
    forward (and always at the root): drop those gathered copies, so that the next forward gathers the shards."""
    for module in modules:
        module.reshard()


def save_state(folder: Path, state: dict[str, torch.Tensor], decay: float) -> None:
    """Write a checkpoint's `ema.safetensors` (whole fp32 tensors by parameter name)."""
    from safetensors.torch import save_file

    save_file(state, str(folder / EMA_STATE_FILE), metadata={"decay": repr(decay)})


def read_state(folder: Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's EMA tensors, or None when it holds none (written with training.ema_decay 0)."""
    from safetensors.torch import load_file

    path = folder / EMA_STATE_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"--resume: {path} cannot be read ({str(e).strip().splitlines()[0]})") from None
    bad = next((k for k, t in tensors.items() if not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"--resume: {path} is damaged ({bad} has non-finite values)")
    return tensors
