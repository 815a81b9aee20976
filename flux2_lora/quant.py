"""A quantized frozen base: the transformer's block linears stored in int8 / fp8 (torchao) or nf4 (bitsandbytes).

Only the linear layers inside `transformer_blocks` and `single_transformer_blocks` are quantized (the same rule as
`is_quantizable` below); norms, embeddings (`x_embedder`, `context_embedder`, time/guidance embedders), the
modulation layers and the final `norm_out` / `proj_out` stay at the model dtype. The LoRA is added afterwards by
PEFT, which wraps torchao and bitsandbytes linears in its own LoRA layers, so the trained adapter is the same
tensors under the same keys as without quantization.

torchao paths (int8, fp8) quantize while loading, one block at a time: the model is read into host memory, then
each block is moved to the device and quantized there, so the device never holds more than one block at the model
dtype. nf4 goes through diffusers' `BitsAndBytesConfig`, which quantizes each weight as it is loaded onto the GPU.
Only int8 runs on the CPU; nf4 and fp8 are written for GPUs and have not run on one in this repository yet.

fp8 compute (`model.fp8_compute`) is not a storage format: the block linears (the same `is_quantizable` rule) become
torchao's `Float8Linear` (`convert_to_float8_training`, dynamic tensorwise scaling: input and weight cast to e4m3,
the output gradient to e5m2, each with a scale from its absolute maximum at every call), before PEFT adds the LoRA.
PEFT wraps a `Float8Linear` like any `nn.Linear` (it is one), so the adapter's lora_A / lora_B stay plain linears in
fp32 (the model dtype under autocast) and the saved LoRA has the same keys. The weights stay bf16 in memory; each
matmul casts its operands to fp8 as it runs. What torchao's float8 training does with a frozen weight, read from its
source (0.18): in eager mode the backward still computes the weight-gradient GEMM (then dropped) and the forward keeps
each converted linear's high-precision input for it; under `model.compile` AOTAutograd prunes both (checked on the
CPU: two GEMMs left in the compiled backward of two frozen Float8Linears, no saved input). The CPU cannot run fp8
matmuls; the tests use torchao's emulation (`Float8LinearConfig(emulate=True)`) through the private switch
FP8_EMULATE_ENV, which is not a recipe field.

The cache stage's text encoder (`model.text_encoder_quantize`) is quantized by transformers while it loads
(`text_encoder_quant_config`): every linear layer but the output head, int8 through torchao (CPU or GPU) or nf4
through bitsandbytes (GPU), each weight quantized as it is read, so no full-precision copy is ever on the device.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from typing import Any

import torch

from .errors import ModelError

log = logging.getLogger(__name__)

KINDS = ("none", "nf4", "int8", "fp8")
TEXT_ENCODER_KINDS = ("none", "int8", "nf4")


class QuantizationError(ModelError):
    """A quantization that cannot run here; the message is one line with what to do instead."""


def is_quantizable(name: str, module: torch.nn.Module) -> bool:
    """Block linears are quantized; embeddings, norms, modulation and the final projection stay high precision."""
    return isinstance(module, torch.nn.Linear) and "transformer_blocks." in name and "lora_" not in name


def check_quantize(kind: str, device: torch.device, field: str = "model.quantize") -> None:
    """Raise QuantizationError (one line) when `kind` cannot run on `device` or its library is missing.

    `field` names the recipe field in the message (model.quantize or model.text_encoder_quantize)."""
    if kind == "none":
        return
    kinds = TEXT_ENCODER_KINDS if field == "model.text_encoder_quantize" else KINDS
    if kind not in kinds:
        raise QuantizationError(f"{field}: unknown value {kind!r} ({', '.join(kinds[:-1])} or {kinds[-1]})")
    on_gpu = device.type == "cuda"
    if kind == "nf4":
        if not on_gpu:
            raise QuantizationError(
                f"{field}: nf4 (bitsandbytes 4-bit) needs a CUDA GPU; on the CPU use {field}: int8 (torchao) or none"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise QuantizationError(f"{field}: nf4 needs bitsandbytes: pip install 'flux2-lora[bitsandbytes]'")
        return
    if importlib.util.find_spec("torchao") is None:
        raise QuantizationError(f"{field}: {kind} needs torchao: pip install 'flux2-lora[quant]'")
    if kind == "fp8":
        if not on_gpu:
            raise QuantizationError(
                f"{field}: fp8 needs a CUDA GPU with compute capability >= 8.9 (Ada, Hopper); on the CPU "
                f"use {field}: int8"
            )
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise QuantizationError(
                f"{field}: fp8 needs compute capability >= 8.9, this GPU has {cap[0]}.{cap[1]}; "
                f"use {field}: int8 or nf4"
            )


# Test-only (not a recipe field): "1" runs model.fp8_compute with torchao's emulated fp8 matmuls (operands rounded to
# fp8 and back, matmul in high precision), on any device: the fp8 numerics on the CPU, never faster.
FP8_EMULATE_ENV = "FLUX2_LORA_FP8_EMULATE"


def fp8_emulated() -> bool:
    return os.environ.get(FP8_EMULATE_ENV) == "1"


def check_fp8_compute(enabled: bool, device: torch.device) -> None:
    """Raise QuantizationError (one line) when model.fp8_compute is on and cannot run on `device`."""
    if not enabled:
        return
    _fp8_needs_torchao()
    if fp8_emulated():
        return
    if device.type != "cuda":
        raise QuantizationError(
            f"model.fp8_compute: fp8 matmuls need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper, "
            f"Blackwell); this run is on the {device.type}: set model.fp8_compute: false"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise QuantizationError(
            f"model.fp8_compute: fp8 matmuls need compute capability >= 8.9 (Ada, Hopper, Blackwell), this GPU "
            f"({torch.cuda.get_device_name(device)}) has {cap[0]}.{cap[1]}: set model.fp8_compute: false"
        )


def _fp8_needs_torchao() -> None:
    if importlib.util.find_spec("torchao") is None:
        raise QuantizationError("model.fp8_compute: needs torchao: pip install 'flux2-lora[quant]'")


def runs_in_fp8(module: torch.nn.Module, name: str) -> bool:
    """model.fp8_compute's rule: a plain block linear (`is_quantizable`) whose sizes are multiples of 16, as
    torch._scaled_mm needs (every block linear of FLUX.2-dev and klein is); PEFT's layers and the rest stay."""
    return (
        type(module) is torch.nn.Linear
        and is_quantizable(name, module)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_fp8_compute(transformer: Any, emulate: bool = False) -> int:
    """The block linears become torchao Float8Linear (fp8 matmuls, dynamic tensorwise scaling); returns how many.

    Call it before the LoRA is added (PEFT then wraps each Float8Linear as its base layer). The weights are not
    touched: the same bf16 tensors, on whatever device (the meta device too). `emulate`: torchao's emulated
    matmuls, for the CPU tests (FP8_EMULATE_ENV)."""
    _fp8_needs_torchao()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(emulate=emulate)  # the tensorwise recipe: e4m3 input/weight, e5m2 gradients
    convert_to_float8_training(transformer, module_filter_fn=runs_in_fp8, config=config)
    return fp8_linear_count(transformer)


def fp8_linear_count(transformer: Any) -> int:
    """How many linears run as fp8 matmuls (torchao Float8Linear)."""
    from torchao.float8.float8_linear import Float8Linear

    return sum(isinstance(m, Float8Linear) for m in transformer.modules())


def fp8_compute_blocks(transformer: Any, device: torch.device) -> int:
    """model.fp8_compute on the loaded frozen base that will train on `device`: checked, then converted (with
    torchao's emulation where FP8_EMULATE_ENV asks for it). Returns how many linears run in fp8."""
    check_fp8_compute(True, device)
    n = convert_fp8_compute(transformer, emulate=fp8_emulated())
    log.info("fp8 compute: %d block linears run as fp8 matmuls%s", n, " (emulated)" if fp8_emulated() else "")
    return n


def blocks(transformer: Any) -> list[torch.nn.Module]:
    """The transformer blocks in the order they run: double-stream, then single-stream."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def _torchao_config(kind: str) -> Any:
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def quantize_blocks(transformer: Any, kind: str, device: torch.device | str, keep_on_host: int = 0) -> int:
    """torchao int8/fp8: quantize the block linears in place, one block at a time on `device`. Returns how many.

    The transformer is expected in host memory. Each block is moved to `device`, quantized there (fast on a GPU,
    and the device holds one block at the model dtype at most), and left there; the last `keep_on_host` blocks
    are moved back to host memory afterwards (block swapping reads them from there). Modules outside the blocks
    are not touched.
    """
    from torchao.quantization import quantize_

    config = _torchao_config(kind)
    device = torch.device(device)
    every = blocks(transformer)
    count = 0
    for i, block in enumerate(every):
        block.to(device)
        names = {id(m) for n, m in block.named_modules() if is_quantizable(f"transformer_blocks.{n}", m)}
        count += len(names)
        quantize_(block, config, filter_fn=lambda m, _fqn, names=names: id(m) in names)
        if i >= len(every) - keep_on_host:
            block.to("cpu")
    quiet_peft_torchao()
    return count


def quiet_peft_torchao() -> None:
    """PEFT warns that merge() needs a requantization function; this trainer never merges into the quantized base."""
    warnings.filterwarnings("ignore", message=r"TorchaoLoraLinear was instantiated without")


def bnb_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """diffusers' BitsAndBytesConfig for nf4: only block linears are quantized (the rest is skipped by name)."""
    from diffusers import BitsAndBytesConfig

    keep = [
        "x_embedder",
        "context_embedder",
        "time_guidance_embed",
        "double_stream_modulation_img",
        "double_stream_modulation_txt",
        "single_stream_modulation",
        "norm_out",
        "proj_out",
    ]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=keep,
    )


def quantized_count(transformer: Any) -> int:
    """How many block linears hold a quantized weight (torchao tensor subclass or bitsandbytes parameter)."""
    n = 0
    for _, m in transformer.named_modules():
        w = getattr(m, "weight", None)
        if w is None or not isinstance(m, torch.nn.Linear):
            continue
        cls = type(w).__module__
        if cls.startswith("torchao") or cls.startswith("bitsandbytes"):
            n += 1
    return n


def text_encoder_quant_config(kind: str, compute_dtype: torch.dtype) -> Any:
    """transformers' quantization config for the text encoder, applied weight by weight while it loads; None for none.

    Every linear layer is quantized except what transformers keeps by default (the output head, which the prompt
    embeddings never use); embeddings and norms are not linear layers and stay at the load dtype."""
    if kind == "none":
        return None
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if kind == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise QuantizationError(f"model.text_encoder_quantize: unknown value {kind!r} (none, int8 or nf4)")
