"""Memory estimate for a recipe: what one training process holds at its peak, part by part.

The estimate is computed, not guessed from a table:

- The transformer is built from its real config on the meta device (no weights, no memory), the LoRA is
  added through PEFT exactly as training adds it, and one training step (forward, loss, backward) is
  run on meta tensors under `TensorMemory`, a dispatch mode that counts every tensor storage while it
  is alive. The peak it sees minus what existed before the step is the activation memory, with or
  without gradient checkpointing, for the real block structure and sequence length.
- On meta tensors PyTorch would take the math attention path and keep the full attention matrix; GPUs
  run flash/cuDNN attention, which keeps only the output and the log-sum-exp. The simulation routes
  attention through the flash kernel's own meta implementation, so it counts what a GPU keeps.
- Frozen weights, LoRA parameters, gradients and optimizer state are counted from the parameters:
  LoRA weights, their gradients and AdamW's two moments are fp32 (8-bit AdamW keeps 2 bytes a value; the other
  optimizers' state is counted per tensor as they keep it, see `optimizer_state_bytes`); the EMA of the LoRA
  (training.ema_decay) is one more fp32 copy of it;
  a quantized base counts the bytes of its format (nf4 with double quantisation ~0.52 B/param, int8 and
  fp8 ~1 B/param plus scales) for the block linears it replaces, the rest stays at the model dtype.
- fp8 compute (`model.fp8_compute`) keeps the weights at the model dtype (torchao's float8 training casts them
  to fp8 as each matmul runs); the simulated step runs with the block linears converted exactly as training converts
  them (`quant.convert_fp8_compute`, torch._scaled_mm's meta kernel), so the activations count what torchao keeps in
  eager mode: each converted linear's high-precision input (saved for a weight gradient that a frozen weight does
  not need; torch.compile prunes it, the estimate does not assume compile), the fp8 copies and scales of the
  operands while a matmul runs and that weight-gradient GEMM's output before it is dropped. Nothing is saved in fp8.
- Block swapping (`model.blocks_to_swap: N`) takes the frozen weights of the last N blocks off the device and
  adds back the two largest of them (the block running and the next one being copied in).

The result is comparable to `torch.cuda.max_memory_allocated()` (scripts/bench_gpu.py checks it);
the CUDA context (~0.5 GiB) and allocator fragmentation come on top and are listed as a reserve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .quant import is_quantizable
from .sources import largest_resolution

GiB = 2**30

# Transformer configs of the published FLUX.2 models (diffusers' scripts/convert_flux2_to_diffusers.py),
# so that a plan for them needs no download. A local folder or a hub snapshot is read from disk instead.
_COMMON = {
    "patch_size": 1,
    "in_channels": 128,
    "attention_head_dim": 128,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
}
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "black-forest-labs/FLUX.2-dev": {
        "family": "dev",
        "transformer": {**_COMMON, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
                        "joint_attention_dim": 15360},
        "text_encoder_params": 24.0e9,  # Mistral Small 3.1 (24 B), published size
        "text_encoder_config": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 32768,
                                "vocab_size": 131072},
    },
    "black-forest-labs/FLUX.2-klein-4B": {
        "family": "klein",
        "transformer": {**_COMMON, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                        "joint_attention_dim": 7680, "guidance_embeds": False},
        "text_encoder_params": 4.02e9,  # Qwen3-4B, published size
        "text_encoder_config": {"hidden_size": 2560, "num_hidden_layers": 36, "intermediate_size": 9728,
                                "vocab_size": 151936},
    },
    "black-forest-labs/FLUX.2-klein-9B": {
        "family": "klein",
        "transformer": {**_COMMON, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                        "joint_attention_dim": 12288, "guidance_embeds": False},
        "text_encoder_params": 8.19e9,  # Qwen3-8B, published size
        "text_encoder_config": {"hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288,
                                "vocab_size": 151936},
    },
}  # fmt: skip
TEXT_BATCH = 8  # prompts per text-encoder call in the cache stage (data.cache)
VAE_PARAMS = 84e6  # AutoencoderKLFlux2 at its published size, when no local copy is there to count

# Bytes per weight of a quantized frozen linear layer (scales included).
QUANT_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0 + 4 / 4096, "fp8": 1.0 + 4 / 4096}
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0}  # state bytes per trainable value (two moments)
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")  # training.optimizer's values
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class TensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages alive while the mode is active (current and peak).

    Every storage an operation returns is counted once, when it first appears, and uncounted when it is
    freed (a weak reference to the storage). `track()` adds tensors that existed before (weights, inputs).
    Works on real tensors and on meta tensors alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def track(self, *objs: Any) -> None:
        for t in tree_leaves(objs):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self._seen:
                continue
            n = st.nbytes()
            self._seen[st] = n
            self.current += n
            weakref.finalize(st, self._free, n)
        self.peak = max(self.peak, self.current)

    def _free(self, n: int) -> None:
        self.current -= n

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


@contextlib.contextmanager
def flash_attention_on_meta() -> Iterator[None]:
    """Route scaled_dot_product_attention on meta tensors through the flash kernel's meta implementation.

    A module-level swap rather than a TorchFunctionMode: backward (and the recomputation of checkpointed
    blocks) runs on autograd's device thread, where a thread-local mode is not active.
    """
    plain = torch.nn.functional.scaled_dot_product_attention
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")

    def sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        a = {**dict(zip(names, args, strict=False)), **kwargs}
        if a["query"].device.type == "meta" and a.get("attn_mask") is None and not a.get("dropout_p"):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                a["query"], a["key"], a["value"], is_causal=bool(a.get("is_causal")), scale=a.get("scale")
            )[0]
        return plain(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = plain


@dataclass
class ModelShape:
    """What the estimate needs to know about a model: its transformer config and the cache-stage sizes."""

    name: str
    family: str
    transformer: dict[str, Any]
    text_encoder_params: float
    vae_params: float
    counted: str  # how the text encoder and VAE sizes were obtained
    text_encoder_config: dict[str, Any] = field(default_factory=dict)  # its config.json (sizes of the activations)


def model_shape(name_or_path: str) -> ModelShape:
    """The transformer config and encoder sizes of a published model id, a local folder, or a builtin tiny model."""
    from .config import ModelArgs
    from .model import ModelError, resolve_model

    if name_or_path in KNOWN_MODELS:
        m = KNOWN_MODELS[name_or_path]
        return ModelShape(
            name_or_path, m["family"], dict(m["transformer"]), m["text_encoder_params"], VAE_PARAMS, "published sizes",
            dict(m["text_encoder_config"]),
        )  # fmt: skip
    try:
        src = resolve_model(ModelArgs(name_or_path=name_or_path))
    except ModelError as e:
        known = ", ".join(KNOWN_MODELS)
        raise ModelError(f"{e} (plans without a download are available for: {known})") from None
    config = json.loads((src.path / "transformer" / "config.json").read_text())
    return ModelShape(
        str(src.path),
        src.family,
        {k: v for k, v in config.items() if not k.startswith("_")},
        _count_on_meta(src.path / "text_encoder", "text_encoder"),
        _count_on_meta(src.path / "vae", "vae"),
        "counted from the local configs",
        json.loads((src.path / "text_encoder" / "config.json").read_text()),
    )


def _count_on_meta(folder: Path, kind: str) -> float:
    """Parameters of a saved component, instantiated from its config on the meta device (no weights read)."""
    with torch.device("meta"):
        if kind == "vae":
            from diffusers import AutoencoderKLFlux2

            model = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(folder))
        else:
            import transformers

            config = transformers.AutoConfig.from_pretrained(folder)
            cls = getattr(transformers, config.architectures[0])
            model = cls._from_config(config)
    return float(sum(p.numel() for p in model.parameters()))


@dataclass
class Setup:
    """The recipe values that decide the memory of one training process."""

    resolution: int = 1024
    batch_size: int = 1
    text_tokens: int = 512
    rank: int = 16
    targets: str = "attention"
    adapter: str = "lora"  # lora.type: LoKr and LoHa factors (PEFT's, built in the simulation) count otherwise
    dtype: str = "bf16"
    autocast: bool = True  # mixed precision on a GPU: LoRA matmuls run in the model dtype
    gradient_checkpointing: bool = True
    checkpoint_every: int = 1
    optimizer: str = "adamw"
    quantize: str = "none"
    blocks_to_swap: int = 0
    text_encoder_quantize: str = "none"  # cache stage only
    shards: int = 1  # GPUs that fully shard parameters, gradients and optimizer state (fsdp, zero3)
    reference_tokens: int = 0  # editing: the reference tokens of the largest sample, after the target's
    ema: bool = False  # training.ema_decay > 0: an fp32 EMA of the LoRA beside it (sharded like it)
    fp8_compute: bool = False  # model.fp8_compute: block linears as torchao Float8Linear (activations, not weights)

    @classmethod
    def from_recipe(cls, recipe: Any, on_gpu: bool = True) -> Setup:
        from .model import adapter_kind

        m, t = recipe.model, recipe.training
        return cls(
            resolution=largest_resolution(recipe.data),
            batch_size=t.batch_size,
            text_tokens=m.max_sequence_length,
            rank=recipe.lora.rank,
            targets=recipe.lora.targets,
            adapter=adapter_kind(recipe.lora),
            dtype=m.dtype,
            autocast=on_gpu and t.mixed_precision != "no" and m.dtype != "fp32",
            gradient_checkpointing=m.gradient_checkpointing,
            checkpoint_every=m.gradient_checkpointing_every,
            optimizer=t.optimizer,
            quantize=getattr(m, "quantize", "none"),
            blocks_to_swap=getattr(m, "blocks_to_swap", 0),
            text_encoder_quantize=getattr(m, "text_encoder_quantize", "none"),
            ema=t.ema_decay > 0,
            fp8_compute=getattr(m, "fp8_compute", False),
        )


@dataclass
class Estimate:
    """Bytes per part at the training peak of one process, and the cache stage's own peak."""

    parts: dict[str, float] = field(default_factory=dict)
    cache_stage: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)  # counts: frozen, lora, quantized
    reserve: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self) -> str:
        rows = [f"  {k:58s} {human_bytes(v):>12}" for k, v in self.parts.items()]
        rows.append(f"  {'training peak (allocated)':58s} {human_bytes(self.total):>12}")
        rows.append(f"  {'+ CUDA context and allocator reserve':58s} {human_bytes(self.reserve):>12}")
        rows.append(f"  {'needed on the GPU':58s} {human_bytes(self.total + self.reserve):>12}")
        rows.append("  cache stage (before training; the transformer is not loaded then):")
        rows += [f"    {k:56s} {human_bytes(v):>12}" for k, v in self.cache_stage.items()]
        return "\n".join(rows)


def human_bytes(n: float) -> str:
    """GiB for the sizes that matter on a GPU, MiB / KiB for the tiny model's (so they do not print as 0.00)."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.2f} KiB"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def build_meta_transformer(config: dict[str, Any], dtype: torch.dtype) -> Any:
    """The FLUX.2 transformer of `config` on the meta device: the real module tree, no memory."""
    from diffusers import Flux2Transformer2DModel

    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            model = Flux2Transformer2DModel.from_config(config).to(dtype)
    finally:
        quiet.setLevel(level)
    model.requires_grad_(False)
    return model


def simulate_step(transformer: Any, setup: Setup) -> tuple[int, int]:
    """(bytes alive before, peak bytes during) one forward + backward of the training loss, on meta tensors.

    An editing sample's references join the sequence as `setup.reference_tokens` clean tokens after the target's."""
    from .flow import flow_loss, latent_ids, reference_ids, text_ids

    cfg = transformer.config
    side = setup.resolution // 16  # VAE /8, then 2x2 patchify
    b, dev = setup.batch_size, torch.device("meta")
    with dev:
        latents = torch.randn(b, cfg.in_channels, side, side)
        noise = torch.randn(b, cfg.in_channels, side, side)
        embeds = torch.randn(b, setup.text_tokens, cfg.joint_attention_dim)
        sigmas = torch.rand(b)
        guidance = torch.full((b,), 4.0) if cfg.guidance_embeds else None
        refs = torch.randn(b, setup.reference_tokens, cfg.in_channels) if setup.reference_tokens else None
    img_ids, txt_ids = latent_ids(b, side, side, dev), text_ids(b, setup.text_tokens, dev)
    if refs is not None:
        img_ids = torch.cat([img_ids, reference_ids([(1, setup.reference_tokens)], b, dev)], dim=1)
    mem = TensorMemory()
    mem.track(list(transformer.parameters()), list(transformer.buffers()))
    mem.track(latents, noise, embeds, sigmas, guidance, img_ids, txt_ids, refs)
    before = mem.current
    with flash_attention_on_meta(), mem:
        loss = flow_loss(transformer, latents, embeds, sigmas, noise, img_ids, txt_ids, guidance, references=refs)
        loss.backward()
    return before, mem.peak


_SIMULATED: dict[str, tuple[float, dict[str, float], int, list[tuple[float, float]]]] = {}


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """The memory plan for training `shape` with `setup` on one process (see the module docstring)."""
    # The simulation depends on neither the optimizer nor the quantization; plans that vary only those reuse it.
    unused = {"optimizer": "", "quantize": "", "blocks_to_swap": 0, "text_encoder_quantize": "", "shards": 1, "ema": 0}
    key = json.dumps([shape.transformer, dataclasses.asdict(setup) | unused], default=str)
    if key not in _SIMULATED:
        _SIMULATED[key] = _simulate(shape, setup)
    activations, counts, largest, per_block = _SIMULATED[key]
    n_frozen, n_lora = counts["frozen"], counts["lora"]
    n_quant = counts["quantizable"] if setup.quantize != "none" else 0.0
    dtype_bytes = DTYPE_BYTES[setup.dtype]
    weights = (n_frozen - n_quant) * dtype_bytes + n_quant * QUANT_BYTES.get(setup.quantize, dtype_bytes)
    swap = min(max(setup.blocks_to_swap, 0), len(per_block))
    if swap:  # the last `swap` blocks live in host memory; two of them at most are on the device at once
        q = QUANT_BYTES.get(setup.quantize, dtype_bytes)
        sizes = [plain * dtype_bytes + (quant * q if setup.quantize != "none" else quant * dtype_bytes)
                 for plain, quant in per_block[-swap:]]  # fmt: skip
        weights -= sum(sizes) - sum(sorted(sizes)[-2:])

    shards = max(setup.shards, 1)
    if shards > 1:  # each GPU keeps 1/N of every block and gathers the running block and the next one whole
        q = QUANT_BYTES.get(setup.quantize, dtype_bytes)
        sizes = [plain * dtype_bytes + quant * (q if setup.quantize != "none" else dtype_bytes)
                 for plain, quant in per_block]  # fmt: skip
        weights = weights / shards + sum(sorted(sizes)[-2:])

    est = Estimate()
    label = f"{setup.quantize} blocks + {setup.dtype}" if setup.quantize != "none" else setup.dtype
    if swap:
        label += f", {swap} blocks swapped to host"
    if shards > 1:
        label += f", 1/{shards} per GPU + 2 gathered blocks"
    est.parts[f"frozen transformer weights ({label})"] = weights
    est.parts["LoRA parameters (fp32)"] = n_lora * 4 / shards
    est.parts["LoRA gradients (fp32)"] = n_lora * 4 / shards
    state = counts.get(f"{setup.optimizer} state", n_lora * OPTIMIZER_BYTES.get(setup.optimizer, 8.0))
    est.parts[f"optimizer state ({setup.optimizer})"] = state / shards
    if setup.ema:
        est.parts["EMA of the LoRA (fp32)"] = n_lora * 4 / shards
    if setup.gradient_checkpointing:
        how = "checkpointing every block" if setup.checkpoint_every == 1 else f"every {setup.checkpoint_every}th"
    else:
        how = "no checkpointing"
    fp8 = ", fp8 matmuls" if setup.fp8_compute else ""
    est.parts[f"activations ({how}, {setup.resolution}px, batch {setup.batch_size}{fp8})"] = activations
    if setup.quantize != "none":
        est.parts["dequantized weight of the largest layer"] = largest * dtype_bytes
    est.reserve = 0.5 * GiB + 0.05 * est.total
    te_q = setup.text_encoder_quantize
    te_label = f"{te_q} linears" if te_q != "none" else setup.dtype  # embeddings and head counted as linears too
    est.cache_stage[f"text encoder ({human_count(shape.text_encoder_params)} params, {te_label})"] = (
        shape.text_encoder_params * QUANT_BYTES.get(te_q, dtype_bytes)
    )
    if shape.text_encoder_config:
        est.cache_stage[f"text encoder activations ({TEXT_BATCH} prompts x {setup.text_tokens} tokens)"] = (
            text_encoder_activation_bytes(shape.text_encoder_config, TEXT_BATCH, setup.text_tokens, dtype_bytes)
        )
    est.cache_stage[f"VAE ({human_count(shape.vae_params)} params, {setup.dtype})"] = shape.vae_params * dtype_bytes
    est.params = {"frozen": n_frozen, "lora": n_lora, "quantized": n_quant}
    return est


def optimizer_state_bytes(optimizer: str, params: Iterable[tuple[str, tuple[int, ...]]]) -> float:
    """Bytes of `optimizer`'s state for fp32 trainable tensors given as (name, shape), as each optimizer keeps it.

    adamw: exp_avg and exp_avg_sq, 8 B a value; adamw8bit: the two moments in 8 bits, 2 B. prodigy (prodigyopt):
    exp_avg, exp_avg_sq, s and p0 (the starting values), 16 B, where p0 is one value for a tensor that starts at
    zero (PEFT's lora_B): 12 B. adafactor (transformers', no first moment): a matrix keeps the row and column means
    of its squared gradient, 4 B x (rows + cols); a vector (DoRA's magnitude) its whole second moment, 4 B a value."""
    total = 0.0
    for name, shape in params:
        n = math.prod(shape)
        if optimizer == "prodigy":
            total += 12 * n + (4 if "lora_B." in name else 4 * n)
        elif optimizer == "adafactor":
            total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n)
        else:
            total += OPTIMIZER_BYTES.get(optimizer, 8.0) * n
    return total


def _simulate(shape: ModelShape, setup: Setup) -> tuple[float, dict[str, float], int, list[tuple[float, float]]]:
    """(activation bytes, parameter counts, largest quantizable weight, per block in run order its frozen
    (not quantizable, quantizable) counts) from one simulated step on meta tensors."""
    from .model import add_lora, enable_checkpointing

    dtype_bytes = DTYPE_BYTES[setup.dtype]
    # Simulate in the dtype the matmuls run in: with autocast the LoRA branch computes in the model dtype.
    model = build_meta_transformer(shape.transformer, {2: torch.bfloat16, 4: torch.float32}[dtype_bytes])
    if setup.fp8_compute:  # as training converts them: before the LoRA, which PEFT then wraps around them
        from .quant import convert_fp8_compute

        convert_fp8_compute(model)
    add_lora(model, setup.rank, setup.rank, 0.0, setup.targets, "gaussian", setup.adapter)
    lora = [p for p in model.parameters() if p.requires_grad]
    if setup.autocast:
        for p in lora:
            p.data = p.data.to(torch.bfloat16 if dtype_bytes == 2 else torch.float32)
    if setup.gradient_checkpointing:
        enable_checkpointing(model, setup.checkpoint_every)
    model.train()
    before, peak = simulate_step(model, setup)
    sim_lora_bytes = sum(p.numel() * p.element_size() for p in lora)
    activations = peak - before - sim_lora_bytes  # the simulated gradients are accounted below, in fp32

    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    quantizable = {f"{name}.weight" for name, module in model.named_modules() if is_quantizable(name, module)}
    counts = {
        "frozen": float(sum(p.numel() for _, p in frozen)),
        "lora": float(sum(p.numel() for p in lora)),
        "quantizable": float(sum(p.numel() for n, p in frozen if n in quantizable)),
    }
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    counts |= {f"{o} state": optimizer_state_bytes(o, named) for o in OPTIMIZERS}  # bytes, per optimizer
    largest = max((p.numel() for n, p in frozen if n in quantizable), default=0)
    per_block: list[tuple[float, float]] = []
    for prefix, n_blocks in (("transformer_blocks.", model.config.num_layers),
                             ("single_transformer_blocks.", model.config.num_single_layers)):  # fmt: skip
        for i in range(n_blocks):
            mine = [(n, p.numel()) for n, p in frozen if n.startswith(f"{prefix}{i}.")]
            q = float(sum(k for n, k in mine if n in quantizable))
            per_block.append((float(sum(k for _, k in mine)) - q, q))
    return float(max(activations, 0)), counts, largest, per_block


# ---------------------------------------------------------------------------------------------
# The cache stage's text encoder: its size on the device, read from the files before loading
# ---------------------------------------------------------------------------------------------


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the .safetensors files of `folder`, from their JSON headers only (no weights read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def text_encoder_bytes(folder: Path, dtype_bytes: int, quantize: str, batch: int, tokens: int) -> tuple[float, float]:
    """(weights, activations) in bytes of the text encoder in `folder` encoding `batch` prompts of `tokens` tokens.

    Weights: counted from the safetensors headers; with `quantize` the 2-D `.weight` tensors other than embeddings
    and the output head (the linear layers) count at the quantized size. Activations: every layer's hidden state
    (text_encoder_activation_bytes), from config.json."""
    q = QUANT_BYTES.get(quantize) if quantize != "none" else None
    weights = 0.0
    for name, shape in safetensors_shapes(folder).items():
        numel = 1
        for k in shape:
            numel *= k
        linear = len(shape) == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name
        weights += numel * (q if q is not None and linear else dtype_bytes)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    return weights, text_encoder_activation_bytes(config, batch, tokens, dtype_bytes)


def text_encoder_activation_bytes(config: dict[str, Any], batch: int, tokens: int, dtype_bytes: int) -> float:
    """Activations of one text-encoder call: every layer's hidden state (the embedding keeps them all), one MLP's
    intermediates, and the output head's logits (fp32), from the encoder's config (its text part for Mistral-3)."""
    text = config.get("text_config", config)
    hidden, layers = int(text.get("hidden_size", 0)), int(text.get("num_hidden_layers", 0))
    inner, vocab = int(text.get("intermediate_size", 0)), int(text.get("vocab_size", 0))
    return float(batch * tokens * ((hidden * (layers + 1) + 3 * inner) * dtype_bytes + vocab * 4))
