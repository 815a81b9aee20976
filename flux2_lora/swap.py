"""Block swapping: keep the frozen weights of N transformer blocks in host memory, copy each in just before it runs.

The last N blocks in execution order (double-stream blocks first, then single-stream) are swapped. Only their
frozen tensors move: the LoRA parameters stay on the device (their gradients and optimizer state live there).
Frozen weights never change, so "moving a block out" only drops its device copy; the host copy (pinned on CUDA)
is the one that stays. With gradient checkpointing every block's forward runs twice per step, once in forward and
once when backward recomputes it; both go through the module's `__call__`, so the same hooks copy the block in
before and drop it after. The device copy stays alive only as long as autograd holds it for that block's backward.

On CUDA the next swapped block (the following one in forward, the preceding one in backward) is copied on a side
stream while the current one computes; at most two swapped blocks are on the device at once. On the CPU the
device is the host: no tensor moves, but the schedule runs and is recorded the same way (`events`, `location`),
which is what the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .model import ModelError
from .quant import blocks as all_blocks


def _in_backward() -> bool:
    """True while autograd runs a backward pass (a checkpointed block being recomputed)."""
    try:
        return bool(torch._C._current_graph_task_id() != -1)
    except AttributeError:  # pragma: no cover - older torch
        return False


@dataclass
class _Slot:
    block: torch.nn.Module
    frozen: list[tuple[torch.nn.Module, str, bool]]  # (owner module, attribute name, is_buffer)
    host: list[torch.Tensor]  # host copies, same order as `frozen`
    pending: tuple[list[torch.Tensor], Any] | None = None  # prefetched device copies and their CUDA event


@dataclass
class BlockSwapper:
    """Owns the swapped blocks of one transformer (see the module docstring). `events` lists every move as
    (phase, block index, "in" | "out") with phase "forward" or "backward"; `location[i]` is "host" or "device"."""

    device: torch.device
    slots: dict[int, _Slot] = field(default_factory=dict)
    events: list[tuple[str, int, str]] = field(default_factory=list)
    location: dict[int, str] = field(default_factory=dict)
    record: bool = True
    _stream: Any = None
    _handles: list[Any] = field(default_factory=list)

    copies: bool = True  # move tensors (False on the CPU: the device is the host); tests may force True there

    # ------------------------------------------------------------------ moving tensors
    def _set(self, slot: _Slot, tensors: list[torch.Tensor]) -> None:
        for (owner, name, is_buffer), t in zip(slot.frozen, tensors, strict=True):
            if is_buffer:
                owner._buffers[name] = t
            else:
                owner._parameters[name] = torch.nn.Parameter(t, requires_grad=False)

    def _copy_in(self, slot: _Slot) -> list[torch.Tensor]:
        return [h.to(self.device, non_blocking=True) for h in slot.host]

    def prefetch(self, i: int) -> None:
        """Start copying block i to the device on the side stream (CUDA only; elsewhere nothing to do)."""
        slot = self.slots.get(i)
        if slot is None or slot.pending is not None or self.location[i] == "device" or self.device.type != "cuda":
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            tensors = self._copy_in(slot)
            event = torch.cuda.Event()
            event.record(self._stream)
        slot.pending = (tensors, event)

    def move_in(self, i: int, phase: str) -> None:
        slot = self.slots[i]
        if self.location[i] == "device":
            return
        if self.copies:
            if slot.pending is not None:
                tensors, event = slot.pending
                slot.pending = None
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in tensors:  # allocated on the side stream, used on this one
                    t.record_stream(current)
            else:
                tensors = self._copy_in(slot)
            self._set(slot, tensors)
        self.location[i] = "device"
        if self.record:
            self.events.append((phase, i, "in"))

    def move_out(self, i: int, phase: str) -> None:
        slot = self.slots[i]
        if self.copies:
            self._set(slot, slot.host)
        self.location[i] = "host"
        if self.record:
            self.events.append((phase, i, "out"))

    # ------------------------------------------------------------------ hooks
    def _pre(self, i: int) -> None:
        backward = _in_backward()
        self.move_in(i, "backward" if backward else "forward")
        self.prefetch(i - 1 if backward else i + 1)

    def _post(self, i: int) -> None:
        self.move_out(i, "backward" if _in_backward() else "forward")

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_block_swap(transformer: Any, n: int, device: torch.device | str) -> BlockSwapper:
    """Swap the last `n` blocks of `transformer`; move everything else to `device`. Returns the swapper.

    Call it after the LoRA is added and checkpointing is enabled, in place of `transformer.to(device)`.
    """
    device = torch.device(device)
    every = all_blocks(transformer)
    if not 0 < n <= len(every):
        raise ModelError(f"model.blocks_to_swap: must be between 1 and {len(every)} (the model's blocks), got {n}")
    swapper = BlockSwapper(device=device, copies=device.type != "cpu")
    swapped = range(len(every) - n, len(every))
    keep: set[int] = set()
    for i in swapped:
        block = every[i]
        frozen: list[tuple[torch.nn.Module, str, bool]] = []
        host: list[torch.Tensor] = []
        for module in block.modules():
            for name, p in module._parameters.items():
                if p is None:
                    continue
                if p.requires_grad:  # LoRA: stays on the device
                    if p.device != device:
                        module._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=True)
                    continue
                frozen.append((module, name, False))
                host.append(_host_copy(p.detach(), device))
            for name, b in module._buffers.items():
                if b is not None:
                    frozen.append((module, name, True))
                    host.append(_host_copy(b, device))
        slot = _Slot(block=block, frozen=frozen, host=host)
        swapper._set(slot, host)
        swapper.slots[i] = slot
        swapper.location[i] = "host"
        keep.update(id(m) for m in block.modules())
        swapper._handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: swapper._pre(i)))
        swapper._handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: swapper._post(i)))
    _full_recompute(transformer, {id(every[i]) for i in swapped})
    # Everything outside the swapped blocks goes to the device, module by module (no full copy first).
    for module in transformer.modules():
        if id(module) in keep:
            continue
        for name, p in module._parameters.items():
            if p is not None and p.device != device:
                module._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)
    return swapper


def _full_recompute(transformer: Any, swapped: set[int]) -> None:
    """Backward recomputes a swapped block to its end (no early stop), so its forward hook drops the device copy."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    plain = getattr(transformer, "_gradient_checkpointing_func", None)
    if plain is None:
        return

    def checkpointed(module: Any, *args: Any, **kwargs: Any) -> Any:
        if id(module) in swapped:
            with set_checkpoint_early_stop(False):
                return plain(module, *args, **kwargs)
        return plain(module, *args, **kwargs)

    transformer._gradient_checkpointing_func = checkpointed


def _host_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor in host memory, pinned when the device is a GPU (asynchronous copies need pinned memory)."""
    t = t.to("cpu")
    if device.type == "cuda":
        try:
            t = t.pin_memory()
        except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without pinning: plain host
            pass
    return t
