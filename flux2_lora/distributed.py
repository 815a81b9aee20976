"""The one place where the multi-process strategy is applied: the Accelerator it builds, and the full tensors
that checkpoints and LoRA exports are written from.

- `ddp`: every process holds the whole model; accelerate wraps it in DistributedDataParallel.
- `fsdp`: FSDP2 through accelerate's plugin: each transformer block (double and single) and the root are
  `fully_shard`ed, so parameters - the frozen base included - are DTensors sharded over the processes
  (`distributed.shard_base: false` keeps them gathered after forward). Saving gathers the LoRA and its
  optimizer state into full tensors on every process; loading shards them again, so a checkpoint does
  not depend on the number of processes.

With one process every strategy is plain single-process training. DeepSpeed ZeRO (`zero2`, `zero3`) is
not in this version yet and is refused with a clear message.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import Recipe, RecipeError

BLOCK_CLASSES = ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]


def launched_strategy() -> str | None:
    """The strategy an `accelerate launch` config asked for (through accelerate's environment), if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "zero" + os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def resolve_strategy(recipe: Recipe) -> str:
    """The strategy this run uses: the recipe's, or with `auto` the launcher's, else DDP."""
    asked, launched = recipe.distributed.strategy, launched_strategy()
    if asked == "auto":
        strategy = launched or "ddp"
    elif launched is not None and launched != asked:
        raise RecipeError(
            f"distributed.strategy: the recipe says {asked} but accelerate was launched with a {launched} config; "
            "make them agree, or set distributed.strategy: auto to follow the launcher"
        )
    else:
        strategy = asked
    if strategy in ("zero2", "zero3"):
        raise RecipeError(
            f"distributed.strategy: {strategy} (DeepSpeed ZeRO) is not in this version yet; use ddp, or fsdp to "
            "shard the frozen base over the processes"
        )
    return strategy


def make_accelerator(recipe: Recipe, mixed_precision: str, trackers: list[str], out: str) -> tuple[Any, str]:
    """The Accelerator for this recipe's strategy, and the strategy's name."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, ProjectConfiguration

    strategy = resolve_strategy(recipe)
    kwargs: dict[str, Any] = {}
    if strategy == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=BLOCK_CLASSES,
            reshard_after_forward=recipe.distributed.shard_base,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
    acc = Accelerator(
        gradient_accumulation_steps=recipe.training.gradient_accumulation,
        mixed_precision=mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=out, logging_dir=os.path.join(out, "logs")),
        **kwargs,
    )
    if acc.num_processes == 1:
        strategy = "single"
    return acc, strategy


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (gathers a DTensor: every process must call this in the same order)."""
    return whole(t).detach().to("cpu").contiguous()


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value where it lives (a collective); other tensors unchanged."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out like `param`: sharded the same way when `param` is a DTensor."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)  # type: ignore[attr-defined]
    return value.to(param.device)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole trainable tensors by parameter name (all processes call this; it gathers sharded ones)."""
    return {n: full(p) for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state_dict with whole tensors (all processes call this; it gathers sharded state)."""
    sd = optimizer.state_dict()
    state = {idx: {k: full(v) if torch.is_tensor(v) else v for k, v in st.items()} for idx, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in saved.items():
            p = params[n]
            p.copy_(like(t.to(p.dtype), p))


def load_optimizer(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load whole-tensor optimizer state, sharding each state tensor like its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: like(v, p) if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0 else v for k, v in st.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
