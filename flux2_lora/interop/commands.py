"""`flux2-lora export` and `flux2-lora lora inspect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .fit import format_inspect, inspect_lora
from .layouts import EXPORT_FORMATS, check_output_file, load_lora, write_lora
from .merge import check_output_folder, merge_lora
from .safety import resolve_lora_path


def add_flag(parser: Any, name: str, help: str) -> None:
    """A yes/no option given bare (`--merge`), or with a value (`--merge true`, `--merge=false`)."""
    parser.add_argument(name, type=bool, nargs="?", const=True, default=False, help=help)


def cmd_export(argv: list[str]) -> int:
    """`export --lora L --format F --output OUT` or `export --merge --lora L --model M --output DIR [--scale S]`;
    an existing OUT is replaced only with --overwrite."""
    from ..cli import CliError, _parse, command_parser

    p = command_parser(
        "export",
        "Write a LoRA in another layout (diffusers, comfyui, kohya), or fuse it into its base model (--merge).",
    )
    p.add_argument("--lora", type=str, required=True, help="LoRA file in any known layout, or a run folder.")
    p.add_argument("--output", type=str, required=True, help="File to write (a folder with --merge).")
    p.add_argument("--format", type=str, default="diffusers", help="diffusers | comfyui | kohya.")
    p.add_argument("--dtype", type=str, default="keep", help="keep | fp32 | bf16 | fp16 (the written tensors).")
    add_flag(p, "--merge", "Fuse the LoRA into --model and write the whole model.")
    add_flag(p, "--overwrite", "Replace --output if it exists (with --merge: only a model folder --merge wrote).")
    p.add_argument("--model", type=str | None, default=None, help="Base model for --merge (folder, hub id, builtin:).")
    p.add_argument("--scale", type=float, default=1.0, help="LoRA strength for --merge.")
    p.add_argument("--max-shard-size", type=str, default="5GB", help="Largest transformer shard for --merge.")
    a = _parse(p, argv)
    dtypes = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if a.dtype not in dtypes:
        raise CliError(f"--dtype: must be one of {', '.join(dtypes)} (got {a.dtype})")
    if a.merge:
        if not a.model:
            raise CliError("--model: required with --merge (the base model to fuse the LoRA into)")
        merge_dtype = "auto" if a.dtype == "keep" else a.dtype
        check_output_folder(Path(a.output).expanduser(), a.overwrite)  # before anything is loaded
        out = merge_lora(a.lora, a.model, Path(a.output), a.scale, a.max_shard_size, merge_dtype, a.overwrite)
        shards = sorted(p.name for p in (out / "transformer").glob("*.safetensors"))
        print(f"merged {a.lora} (scale {a.scale}) into {a.model}: {out} (transformer in {len(shards)} shard(s))")
        return 0
    if a.format not in EXPORT_FORMATS:
        raise CliError(f"--format: must be one of {', '.join(EXPORT_FORMATS)} (got {a.format})")
    out_path = Path(a.output).expanduser()
    if out_path.suffix != ".safetensors":
        raise CliError(f"--output: {a.output} must end in .safetensors")
    src = resolve_lora_path(a.lora)
    if out_path.resolve() == src.resolve():
        raise CliError(f"--output: {a.output} is the input file; choose another path")
    check_output_file(out_path, a.overwrite)  # before the LoRA is read
    lora = load_lora(src)
    write_lora(lora, out_path, a.format, dtypes[a.dtype], overwrite=a.overwrite)
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
    add_flag(p, "--json", "Print JSON.")
    a = _parse(p, argv[1:])
    info = inspect_lora(a.file, a.model)
    print(json.dumps(info, indent=1) if a.json else format_inspect(info))
    return 0
