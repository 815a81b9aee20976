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

Loading (`load_frozen_transformer`, `place_for_prepare`): under fsdp and zero3 with `shard_base` (the default) the
frozen transformer is loaded sharded, so that no device ever holds it whole and a node holds at most one host copy.
fsdp: only the main process reads it (into host memory), the others build it on the meta device, and prepare()
broadcasts it tensor by tensor into the shards (accelerate's `cpu_ram_efficient_loading`). zero3: it is built
under `deepspeed.zero.Init` (partitioned as it is created) and filled one gathered parameter at a time from the
main process's memory-mapped safetensors. Quantized bases train under ddp (and nf4 under zero2); the others are
refused in one line before the cache stage (`check_quantize_strategy`).

With one process DDP and FSDP are plain single-process training. A checkpoint holds whole tensors under
every strategy, so it resumes under another strategy and on another number of processes too (the data
position is a count of global batches: the global batch, batch x processes x accumulation, must stay the same).
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
# Optimizers whose state spans whole parameters: Prodigy's step size d comes from sums over every parameter (on FSDP2
# shards each process sums its own and the processes' d drift apart), Adafactor factors each matrix's second moment
# (its row/column state is a plain tensor beside DTensor parameters: FSDP2 fails; ZeRO's flat partitions are 1-D).
WHOLE_TENSOR_OPTIMIZERS = ("prodigy", "adafactor")


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
    if recipe.training.optimizer in WHOLE_TENSOR_OPTIMIZERS and strategy in ("fsdp", "zero2", "zero3"):
        raise RecipeError(
            f"training.optimizer: {recipe.training.optimizer} cannot train with distributed.strategy {strategy} (its "
            "state spans whole parameters, which fsdp/zero split across processes); use ddp, or optimizer adamw"
        )
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
            # DeepSpeed's default buckets (5e8 values) allocate ~1.9 GiB of fp32 per process whatever the model;
            # a LoRA's gradients are small (77 M values at rank 16 on FLUX.2-dev), so 5e7 (200 MB) is plenty.
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
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
        previous = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "False")
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=BLOCK_CLASSES,
            reshard_after_forward=recipe.distributed.shard_base,
            state_dict_type="FULL_STATE_DICT",
            # shard_base: only the main process reads the weights; prepare() broadcasts them into the shards.
            cpu_ram_efficient_loading=recipe.distributed.shard_base,
        )
        # The plugin also tells transformers through the environment to load models on the meta device on all
        # but the first process of each node; the cache stage's text encoder must load whole, so take that back.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = previous
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


def shards_at_load(strategy: str, shard_base: bool, num_processes: int, applied: bool = True) -> bool:
    """Whether the frozen transformer is loaded sharded: fsdp and zero3 with `distributed.shard_base` (the default)
    on several processes, where accelerate really applies the strategy (`applied`: on CPU processes it wraps an
    FSDP launch config in DDP). Then only the main process reads the weights, and no device ever holds them whole."""
    return strategy in ("fsdp", "zero3") and shard_base and num_processes > 1 and applied


def strategy_applied(acc: Any) -> bool:
    """True when accelerate shards with FSDP or DeepSpeed here (not when it fell back to DDP on CPU processes)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


# The quantized bases each strategy cannot train, and why (tried on 2 CPU processes with int8; see the README).
# - fsdp: FSDP2 shards every parameter, and torchao's tensors have no split/view (int8, fp8); accelerate leaves a
#   bitsandbytes nf4 base out of the sharding and loads it whole on every GPU first (nf4).
# - zero2 / zero3: DeepSpeed keeps weak references to every parameter, so moving the model swaps no torchao tensor
#   (int8, fp8); ZeRO-3 builds the transformer partitioned, which a bitsandbytes load cannot (nf4).
QUANTIZE_REFUSED = {"fsdp": ("int8", "fp8", "nf4"), "zero2": ("int8", "fp8"), "zero3": ("int8", "fp8", "nf4")}


def check_quantize_strategy(recipe: Recipe, strategy: str) -> None:
    """Refuse, in one line and before the cache stage, a quantized base that the strategy cannot train (`strategy`
    as `make_accelerator` resolved it: fsdp on one process is plain training, "single")."""
    q = recipe.model.quantize
    if q not in QUANTIZE_REFUSED.get(strategy, ()):
        return
    from .model import ModelError

    works = [s for s in ("ddp", "zero2") if q not in QUANTIZE_REFUSED.get(s, ())]
    raise ModelError(
        f"model.quantize: {q} cannot be trained with distributed.strategy: {strategy} (it cannot shard or move an "
        f"{q} base); use strategy {' or '.join(works)} (each process holds the {q} base whole), "
        f"or model.quantize: none with {strategy}"
    )


def load_frozen_transformer(
    acc: Any,
    strategy: str,
    src: Any,
    dtype: torch.dtype,
    shard_base: bool = True,
    fp8_compute: bool = False,
    **load: Any,
) -> Any:
    """The frozen transformer as the strategy needs it before `place_for_prepare` and `prepare()`; with
    `fp8_compute` its block linears then run as fp8 matmuls (`quant.fp8_compute_blocks`, on every process, before
    the LoRA is added, whichever way it was loaded)."""
    model = _load_frozen(acc, strategy, src, dtype, shard_base, **load)
    if fp8_compute:
        from .quant import fp8_compute_blocks

        fp8_compute_blocks(model, acc.device)
    return model


def _load_frozen(acc: Any, strategy: str, src: Any, dtype: torch.dtype, shard_base: bool, **load: Any) -> Any:
    """The frozen transformer, loaded as the strategy needs it.

    Sharded loading (`shards_at_load`):
    - fsdp: the main process reads it into host memory (no device); the others build it on the meta device.
      `prepare()` (accelerate's `cpu_ram_efficient_loading`) moves the model to meta, `fully_shard`s it, and
      broadcasts the main process's tensors one at a time into the shards, the LoRA's initial values among them.
    - zero3: built under `deepspeed.zero.Init`, so every parameter is partitioned as it is created; then each one
      is gathered in turn, the main process copies its value from the memory-mapped safetensors file, and
      DeepSpeed broadcasts it and partitions it again.
    Otherwise each process loads it whole (`model.load_transformer` with the keyword arguments in `load`).
    """
    from .model import load_transformer

    if not shards_at_load(strategy, shard_base, acc.num_processes, strategy_applied(acc)):
        return load_transformer(src, dtype, **load)
    if acc.device.type == "cuda":  # sharded_load_line reports the device's peak from here to after prepare()
        torch.cuda.reset_peak_memory_stats(acc.device)
    if strategy == "fsdp":
        if acc.is_main_process:
            return load_transformer(src, dtype, None)
        return _meta_transformer(src, dtype)
    return _zero3_transformer(acc, src, dtype)


def _transformer_config(src: Any) -> dict[str, Any]:
    from diffusers import Flux2Transformer2DModel

    from .model import safetensors_only

    return dict(Flux2Transformer2DModel.load_config(safetensors_only(src.path / "transformer")))


def _meta_transformer(src: Any, dtype: torch.dtype) -> Any:
    """The transformer's structure without its weights: parameters on the meta device at `dtype` (buffers real)."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    with init_empty_weights(include_buffers=False):
        model = Flux2Transformer2DModel.from_config(_transformer_config(src))
    return model.to(dtype).requires_grad_(False).eval()


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (one file, or a sharded checkpoint with its index)."""
    from safetensors import safe_open

    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    found: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:  # reads the header only
            found.update(dict.fromkeys(f.keys(), file))
    return found


def _zero3_init_config(acc: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config for `zero.Init`: the run's, without the `auto` values that prepare() fills in later,
    and with the fp16/bf16 switches saying `dtype` (zero.Init takes its dtype from them: its own `dtype` argument
    is ignored where the accelerator has no fp16, as on CPUs)."""

    def concrete(d: dict[str, Any]) -> dict[str, Any]:
        return {k: concrete(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}

    config = concrete(acc.state.deepspeed_plugin.deepspeed_config)
    config.setdefault("train_micro_batch_size_per_gpu", 1)
    config["bf16"] = {"enabled": dtype == torch.bfloat16}
    config["fp16"] = {"enabled": dtype == torch.float16}
    return config


def _zero3_transformer(acc: Any, src: Any, dtype: torch.dtype) -> Any:
    import deepspeed
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    from .model import ModelError, safetensors_only

    folder = safetensors_only(src.path / "transformer")
    with deepspeed.zero.Init(config_dict_or_path=_zero3_init_config(acc, dtype)):
        model = Flux2Transformer2DModel.from_config(_transformer_config(src))
    model.requires_grad_(False).eval()
    if any(p.dtype != dtype for p in model.parameters()):
        raise ModelError(
            f"model.dtype: DeepSpeed built the transformer in {next(model.parameters()).dtype}, not {dtype}"
        )
    files = _weight_files(folder)  # every process reads the headers, so all agree on a missing tensor
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = sorted(set(tensors) - set(files))
    if missing:
        raise ModelError(f"model.name_or_path: {folder} lacks {len(missing)} transformer tensors (e.g. {missing[0]})")
    opened: tuple[Path, Any] | None = None  # one file mapped at a time (the tensors come in the files' order)
    try:
        for name, t in tensors.items():
            partitioned = hasattr(t, "ds_id")
            with deepspeed.zero.GatheredParameters([t], modifier_rank=0, enabled=partitioned):
                if acc.is_main_process or not partitioned:  # buffers are not partitioned: each process reads them
                    if opened is None or opened[0] != files[name]:
                        if opened is not None:
                            opened[1].__exit__(None, None, None)
                        handle = safe_open(str(files[name]), framework="pt")
                        opened = (files[name], handle.__enter__())
                    with torch.no_grad():
                        t.data.copy_(opened[1].get_tensor(name).to(t.dtype))
    finally:
        if opened is not None:
            opened[1].__exit__(None, None, None)
    return model


def place_for_prepare(model: Any, acc: Any, strategy: str, shard_base: bool = True) -> None:
    """Put the model (frozen transformer + LoRA) where `prepare()` expects it: on the device, or for a sharded
    load where it is (the main process's host copy is broadcast into the shards). A process that built the
    transformer on meta gets real tensors for the LoRA (the optimizer tells parameters apart by their storage);
    their values are the main process's, broadcast by prepare()."""
    if not shards_at_load(strategy, shard_base, acc.num_processes, strategy_applied(acc)):
        model.to(acc.device)
        if strategy == "ddp":
            # DDP broadcasts every parameter from the main process; torchao's quantized tensors cannot be broadcast,
            # and every process quantized the same weights the same way, so they are left out of it.
            from torch.nn.parallel import DistributedDataParallel

            quantized = [n for n, p in model.named_parameters() if type(p).__module__.startswith("torchao")]
            if quantized:
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, quantized)
        return
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if strategy == "fsdp" and p.requires_grad and p.is_meta:
                    module._parameters[name] = torch.nn.Parameter(torch.zeros_like(p, device="cpu"))
                elif strategy == "zero3" and not hasattr(p, "ds_id"):
                    p.data = p.data.to(acc.device)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: a DTensor's local shard, a ZeRO-3 partition, else itself."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    if is_sharded(t):
        return t.to_local()  # type: ignore[attr-defined,no-any-return]
    return t


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of a parameter that this process holds: a DTensor's local shard, a ZeRO-3 partition, none on meta."""
    t = local_tensor(t)
    return 0 if t.is_meta else t.numel() * t.element_size()


def all_finite(acc: Any, tensors: list[torch.Tensor]) -> bool:
    """True when every value of `tensors` is finite on every process (a collective; one host sync)."""
    parts = [local_tensor(t) for t in tensors]
    ok = torch.stack([torch.isfinite(p).all() for p in parts if p.numel()]).all() if parts else torch.tensor(True)
    flag = ok.to(acc.device, torch.float32).reshape(1)
    return bool(acc.reduce(flag, reduction="sum").item() == acc.num_processes) if acc.num_processes > 1 else bool(flag)


def whole_bytes(t: torch.Tensor) -> int:
    """Bytes of a parameter's whole value (also when it is sharded or partitioned away)."""
    numel = getattr(t, "ds_numel", None) or t.numel()
    return int(numel) * t.element_size()


def frozen_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole) of the frozen parameters."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return sum(local_bytes(p) for p in frozen), sum(whole_bytes(p) for p in frozen)


def sharded_load_line(acc: Any, strategy: str, model: torch.nn.Module) -> str:
    """One line on what the sharded frozen transformer costs each process after prepare() (all processes call
    this: the figures are gathered); on GPUs also each device's peak from the start of the load."""
    from accelerate.utils import gather_object

    from .memory import human_bytes

    held, whole = frozen_bytes(model)
    peak = torch.cuda.max_memory_allocated(acc.device) if acc.device.type == "cuda" else None
    rows = gather_object([(held, peak)])
    line = (
        f"dist  {strategy}: frozen transformer loaded sharded (this process holds {human_bytes(held)} of "
        f"{human_bytes(whole)}; processes 0-{len(rows) - 1}: " + ", ".join(human_bytes(h) for h, _ in rows)
    )
    if peak is not None:
        line += "; device peak while loading: " + ", ".join(human_bytes(p or 0) for _, p in rows)
    return line + ")"


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
