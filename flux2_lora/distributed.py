"""The one place where the multi-process strategy is applied: the Accelerator it builds, and the full tensors
that checkpoints and LoRA exports are written from.

- `ddp`: every process holds the whole model; accelerate wraps it in DistributedDataParallel.
- `fsdp`: FSDP2 through accelerate's plugin: each transformer block (double and single) and the root are
  `fully_shard`ed, so parameters - the frozen base included - are DTensors sharded over the processes
  (`distributed.shard_base: false` keeps them gathered after forward). Saving gathers the LoRA and its
  optimizer state into full tensors on every process; loading shards them again, so a checkpoint does
  not depend on the number of processes.

- `zero2` / `zero3`: DeepSpeed ZeRO through accelerate's plugin (`deepspeed_config` is the JSON): the
  optimizer state and gradients (ZeRO-2), and the parameters too (ZeRO-3), are partitioned over the
  processes; `distributed.offload` moves the optimizer state (and with ZeRO-3 the parameters) to the CPU.
  DeepSpeed clips and steps inside `accelerator.backward`, so under ZeRO the NaN guard counts a non-finite
  step (and stops after too many) but cannot skip it. Checkpoints hold the fp32 master weights and AdamW's
  moments gathered per parameter (DeepSpeed's `safe_get_full_*`), in torch's own layout.

With one process DDP and FSDP are plain single-process training. A checkpoint holds whole tensors under
every strategy, so it resumes under another strategy too (the number of processes must stay the same:
the data position depends on it).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import Recipe, RecipeError

BLOCK_CLASSES = ["Flux2TransformerBlock", "Flux2SingleTransformerBlock"]


def launched_strategy() -> str | None:
    """The strategy an `accelerate launch` config asked for (through accelerate's environment), if any."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and Path(config_file).is_file():  # a DeepSpeed JSON names its own stage
            stage = str(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", stage))
        return f"zero{stage or 2}"
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
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise RecipeError(
                f"distributed.strategy: {strategy} needs DeepSpeed; pip install 'flux2-lora[deepspeed]' "
                "(DS_BUILD_OPS=0 is enough), or use ddp / fsdp"
            ) from None
    return strategy


def deepspeed_config(recipe: Recipe, mixed_precision: str, stage: int) -> dict[str, Any]:
    """The DeepSpeed JSON for a ZeRO stage from the recipe."""
    d, t = recipe.distributed, recipe.training
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation,
        "gradient_clipping": t.max_grad_norm if t.max_grad_norm > 0 else 0.0,
        "zero_optimization": {
            "stage": stage,
            "offload_optimizer": {"device": "cpu" if d.offload in ("optimizer", "all") else "none"},
            "offload_param": {"device": "cpu" if d.offload == "all" else "none"},
            # ZeRO-3 shards every parameter; with shard_base false small and large ones alike stay whole.
            "stage3_param_persistence_threshold": 0 if d.shard_base else 10**12,
            "stage3_gather_16bit_weights_on_model_save": stage == 3,
        },
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: the same optimizer as every other strategy
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def make_accelerator(recipe: Recipe, mixed_precision: str, trackers: list[str], out: str) -> tuple[Any, str]:
    """The Accelerator for this recipe's strategy, and the strategy's name."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, ProjectConfiguration

    strategy = resolve_strategy(recipe)
    kwargs: dict[str, Any] = {}
    if strategy in ("zero2", "zero3") and not torch.cuda.is_available():
        from accelerate.utils import InitProcessGroupKwargs

        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]  # DeepSpeed on CPU processes
    if strategy in ("zero2", "zero3") and launched_strategy() is None:
        from accelerate.utils import DeepSpeedPlugin

        config = deepspeed_config(recipe, mixed_precision, int(strategy[-1]))
        # No zero.Init while loading: the frozen transformer is partitioned in prepare() (and the cache stage's
        # text encoder, loaded after the Accelerator exists, must not be partitioned at all).
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)
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
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:  # a launcher's DeepSpeed JSON may leave these to the training script
        ds, t = plugin.deepspeed_config, recipe.training
        for key, value in (
            ("train_micro_batch_size_per_gpu", t.batch_size),
            ("gradient_accumulation_steps", t.gradient_accumulation),
            ("gradient_clipping", t.max_grad_norm if t.max_grad_norm > 0 else 0.0),
        ):
            if ds.get(key, "auto") == "auto":
                ds[key] = value
        if ds.get("train_batch_size") == "auto":
            del ds["train_batch_size"]
    elif acc.num_processes == 1:
        strategy = "single"
    return acc, strategy


@contextlib.contextmanager
def plain_loading(accelerator: Any) -> Iterator[None]:
    """Load models as plain modules under DeepSpeed: accelerate registers its config with transformers, which
    then sees ZeRO-3 and refuses a device_map (or partitions at construction). The text encoder of the cache
    stage must stay whole, and the transformer is partitioned by prepare(), so loading goes without it."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.dschf = None
        plugin.set_deepspeed_weakref()


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


def is_zero(t: torch.Tensor) -> bool:
    """A parameter managed by DeepSpeed ZeRO (its fp32 master and optimizer state live in ZeRO's partitions)."""
    return hasattr(t, "ds_id") or hasattr(t, "_hp_mapping")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole trainable tensors by parameter name (all processes call this; it gathers sharded ones).

    Under ZeRO these are the fp32 master weights, gathered from the partitions."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            if is_zero(p):
                from deepspeed.utils import safe_get_full_fp32_param

                out[n] = safe_get_full_fp32_param(p).detach().to("cpu").contiguous()
            else:
                out[n] = full(p)
    return out


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def zero_inner_optimizer(optimizer: Any) -> Any:
    """torch's AdamW inside DeepSpeed's ZeRO optimizer (inside accelerate's wrapper)."""
    zero = getattr(optimizer, "optimizer", optimizer)
    return getattr(zero, "optimizer", zero)


def optimizer_state(optimizer: Any, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The optimizer's state_dict with whole tensors (all processes call this; it gathers sharded state).

    Under ZeRO the state is read per parameter from DeepSpeed's partitions and written in torch AdamW's own
    layout, so a checkpoint resumes under any strategy."""
    trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    if trainable and is_zero(trainable[0]):
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = zero_inner_optimizer(optimizer)
        step = next((st["step"] for st in inner.state.values() if "step" in st), 0)
        state = {}
        for i, p in enumerate(trainable):
            state[i] = {"step": torch.tensor(float(step))}
            for k in ADAM_KEYS:
                state[i][k] = safe_get_full_optimizer_state(p, k).detach().to("cpu").contiguous()
        group = {k: v for k, v in inner.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [group | {"params": list(range(len(trainable)))}]}
    sd = optimizer.state_dict()
    state = {idx: {k: full(v) if torch.is_tensor(v) else v for k, v in st.items()} for idx, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_trainable(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in saved.items():
            p = params[n]
            if is_zero(p):
                _zero_set_param(p, t)
            else:
                p.copy_(like(t.to(p.dtype), p))


def _zero_set_param(p: torch.Tensor, value: torch.Tensor) -> None:
    """Set a ZeRO parameter everywhere it lives: the fp32 master partition and the module's working copy."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value.to(torch.float32))
    if hasattr(p, "ds_id"):  # ZeRO-3: the working copy is partitioned too
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                p.data.copy_(value.to(p.device, p.dtype))
    else:
        p.data.copy_(value.to(p.device, p.dtype))


def _zero_init_optimizer_state(optimizer: Any) -> None:
    """Create AdamW's state for ZeRO's flat fp32 partitions before the first step (torch creates it lazily in
    step()), and let DeepSpeed link it to the parameters, so that a resume can write into it."""
    zero = getattr(optimizer, "optimizer", optimizer)
    inner = zero_inner_optimizer(optimizer)
    flats = [f for group in inner.param_groups for f in group["params"]]
    flats += list(getattr(zero, "fp32_partitioned_groups_flat", []))  # ZeRO-3 keeps its own list
    on_device = bool(inner.param_groups[0].get("fused") or inner.param_groups[0].get("capturable"))
    for flat in flats:
        st = inner.state[flat]
        st.setdefault("step", torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu"))
        for key in ADAM_KEYS:
            st.setdefault(key, torch.zeros_like(flat))
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2
        zero._lazy_init_hp_params_optimizer_state()


def global_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also when ZeRO-3 has partitioned it away (its local shape is then (0,))."""
    return tuple(getattr(p, "ds_shape", p.shape))


def load_optimizer(optimizer: Any, sd: dict[str, Any], model: torch.nn.Module | None = None) -> None:
    """Load whole-tensor optimizer state, sharding each state tensor like its parameter."""
    trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    if trainable and is_zero(trainable[0]):
        from deepspeed.utils import safe_set_full_optimizer_state

        _zero_init_optimizer_state(optimizer)
        for idx, st in sd["state"].items():
            for k in ADAM_KEYS:
                safe_set_full_optimizer_state(trainable[int(idx)], st[k].to(torch.float32), k)
        saved_group = {k: v for k, v in sd["param_groups"][0].items() if k != "params"}
        for group in zero_inner_optimizer(optimizer).param_groups:  # the scheduler's current lr among them
            group.update({k: v for k, v in saved_group.items() if k in group})
        step = next((float(st["step"]) for st in sd["state"].values() if "step" in st), None)
        if step is not None:
            for st in zero_inner_optimizer(optimizer).state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"].fill_(step)
                elif "step" in st:
                    st["step"] = int(step)
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, st in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: like(v, p) if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0 else v for k, v in st.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
