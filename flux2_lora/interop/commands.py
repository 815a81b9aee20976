"""`flux2-lora export` and `flux2-lora lora inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .fit import format_inspect, inspect_lora
from .layouts import EXPORT_FORMATS, load_lora, write_lora
from .merge import merge_lora


def cmd_export(argv: list[str]) -> int:
    """`export --lora L --format F --output OUT` or `export --merge --lora L --model M --output DIR [--scale S]`."""
    from ..cli import CliError, _parse, command_parser

    p = command_parser(
        "export",
        "Write a LoRA in another layout (diffusers, comfyui, kohya), or fuse it into its base model (--merge).",
    )
    p.add_argument("--lora", type=str, required=True, help="LoRA file in any known layout, or a run folder.")
    p.add_argument("--output", type=str, required=True, help="File to write (a folder with --merge).")
    p.add_argument("--format", type=str, default="diffusers", help="diffusers | comfyui | kohya.")
    p.add_argument("--dtype", type=str, default="keep", help="keep | fp32 | bf16 | fp16 (the written tensors).")
    p.add_argument("--merge", type=bool, default=False, help="Fuse the LoRA into --model and write the whole model.")
    p.add_argument("--model", type=str | None, default=None, help="Base model for --merge (folder, hub id, builtin:).")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength for --merge.")
    p.add_argument("--max-shard-size", type=str, default="5GB", help="Largest transformer shard for --merge.")
    a = _parse(p, [x if x != "--merge" else "--merge=true" for x in argv])
    dtypes = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if a.dtype not in dtypes:
        raise CliError(f"--dtype: must be one of {', '.join(dtypes)} (got {a.dtype})")
    if a.merge:
        if not a.model:
            raise CliError("--model: required with --merge (the base model to fuse the LoRA into)")
        merge_dtype = "auto" if a.dtype == "keep" else a.dtype
        out = merge_lora(a.lora, a.model, Path(a.output), a.scale, a.max_shard_size, merge_dtype)
        shards = sorted(p.name for p in (out / "transformer").glob("*.safetensors"))
        print(f"merged {a.lora} (scale {a.scale}) into {a.model}: {out} (transformer in {len(shards)} shard(s))")
        return 0
    if a.format not in EXPORT_FORMATS:
        raise CliError(f"--format: must be one of {', '.join(EXPORT_FORMATS)} (got {a.format})")
    out_path = Path(a.output).expanduser()
    if out_path.suffix != ".safetensors":
        raise CliError(f"--output: {a.output} must end in .safetensors")
    lora = load_lora(a.lora)
    if lora.path is not None and out_path.resolve() == lora.path.resolve():
        raise CliError(f"--output: {a.output} is the input file; choose another path")
    write_lora(lora, out_path, a.format, dtypes[a.dtype])
    print(f"wrote {out_path} ({a.format}, {len(lora.modules)} modules, from {lora.format})")
    return 0


def cmd_lora(argv: list[str]) -> int:
    from ..cli import CliError, _parse, command_parser

    if not argv or argv[0] != "inspect":
        raise CliError("lora: expected `lora inspect FILE [--model M] [--json]`")
    p = command_parser(
        "lora inspect", "Format, rank, alpha, targets, metadata and size of a LoRA, and which model it fits."
    )
    p.add_argument("file", type=str, help="LoRA file (any known layout) or a run folder.")
    p.add_argument("--model", type=str | None, default=None, help="Check against this model instead of the known ones.")
    p.add_argument("--json", type=bool, default=False, help="Print JSON.")
    a = _parse(p, [x if x != "--json" else "--json=true" for x in argv[1:]])
    info = inspect_lora(a.file, a.model)
    print(json.dumps(info, indent=1) if a.json else format_inspect(info))
    return 0
