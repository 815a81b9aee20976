"""`flux2-lora export` and `flux2-lora lora inspect`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError


def export(
    *,
    lora: str,
    output: str,
    format: str = "diffusers",
    dtype: str = "keep",
    merge: bool = False,
    overwrite: bool = False,
    model: str | None = None,
    scale: float = 1.0,
    max_shard_size: str = "5GB",
) -> None:
    """Write a LoRA in another layout (diffusers, comfyui, kohya), or fuse it into its base model (--merge).

    `export --lora L --format F --output OUT` or `export --merge --lora L --model M --output DIR [--scale S]`; an
    existing OUT is replaced only with --overwrite.

    Args:
        lora: LoRA file in any known layout, or a run folder.
        output: File to write (a folder with --merge).
        format: diffusers | comfyui | kohya.
        dtype: keep | fp32 | bf16 | fp16 (the written tensors).
        merge: Fuse the LoRA into --model and write the whole model.
        overwrite: Replace --output if it exists (with --merge: only a model folder --merge wrote).
        model: Base model for --merge (folder, hub id, builtin:).
        scale: LoRA strength for --merge.
        max_shard_size: Largest transformer shard for --merge.
    """
    from ..interop.merge import merge_lora
    from ..interop.write import EXPORT_DTYPES, export_lora

    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"--dtype: must be one of {', '.join(EXPORT_DTYPES)} (got {dtype})")
    if merge:
        if not model:
            raise UsageError("--model: required with --merge (the base model to fuse the LoRA into)")
        merge_dtype = "auto" if dtype == "keep" else dtype
        out = merge_lora(lora, model, Path(output), scale, max_shard_size, merge_dtype, overwrite)
        shards = sorted(p.name for p in (out / "transformer").glob("*.safetensors"))
        print(f"merged {lora} (scale {scale}) into {model}: {out} (transformer in {len(shards)} shard(s))")
        return
    out_path, read = export_lora(lora, output, format, EXPORT_DTYPES[dtype], overwrite)
    print(f"wrote {out_path} ({format}, {len(read.modules)} modules, from {read.format})")


def inspect(file: str, /, *, model: str | None = None, json_: bool = False) -> None:
    """Format, rank, alpha, targets, metadata and size of a LoRA, and which model it fits.

    Args:
        file: LoRA file (any known layout) or a run folder.
        model: Check against this model instead of the known ones.
        json_: Print JSON.
    """
    from ..interop.fit import format_inspect, inspect_lora

    info = inspect_lora(file, model)
    print(json.dumps(info, indent=1) if json_ else format_inspect(info))
