"""Writing a LoRA in our layouts (diffusers, comfyui, kohya): the tensors, the header, the file (`export`).

Reading and the in-memory form are `layouts.py`; this module builds on it, never the reverse. A write goes to a
temporary file beside the output, renamed into place when complete: a failed write leaves nothing behind, and an
existing output is replaced only with overwrite.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import METADATA_PREFIX, os_reason
from ..errors import UsageError
from ..safety import LoraFileError, resolve_lora_path
from .layouts import (
    ADAPTER_METADATA_KEY,
    EXPORT_FORMATS,
    LoraFile,
    LoraModule,
    check_finite,
    describe_targets,
    kohya_stem,
    load_lora,
    most_common,
    to_bfl,
)

# `export --dtype`: the dtype of the written tensors (keep: as they are in the file read).
EXPORT_DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def fuse(parts: list[LoraModule | None], bake: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One (down, up, alpha) for a fused qkv from its q, k, v modules (None: that part is not adapted).

    down = the parts' downs stacked (rank R = sum of ranks), up = block-diagonal, so up @ down is the three
    updates stacked. If every part has the same scale s, alpha = s * R keeps it (bake=False); otherwise, or with
    bake=True, each part's scale is multiplied into its up block and alpha = R (scale 1)."""
    present = [p for p in parts if p is not None]
    out_rows = present[0].up.shape[0]
    dtype = present[0].up.dtype
    total = sum(p.rank for p in present)
    same = len({p.scale for p in present}) == 1
    down = torch.cat([p.down for p in present], dim=0)
    up = torch.zeros(out_rows * len(parts), total, dtype=dtype)
    col = 0
    for i, p in enumerate(parts):
        if p is None:
            continue
        block = p.up if (same and not bake) else (p.up.float() * p.scale).to(dtype)
        up[i * out_rows : (i + 1) * out_rows, col : col + p.rank] = block
        col += p.rank
    alpha = present[0].scale * total if (same and not bake) else float(total)
    return down, up, alpha


def _bfl_groups(lora: LoraFile) -> dict[str, list[LoraModule | None]]:
    """BFL name -> its module (one) or its q, k, v parts (three, None where a part is not adapted)."""
    groups: dict[str, list[LoraModule | None]] = {}
    for name, module in sorted(lora.modules.items()):
        mapped = to_bfl(name)
        if mapped is None:
            raise LoraFileError(f"{lora.name}: {name} has no ComfyUI/BFL name; export it as diffusers instead")
        bfl, part = mapped
        if part is None:
            groups[bfl] = [module]
        else:
            groups.setdefault(bfl, [None, None, None])[part] = module
    return groups


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (t if dtype is None else t.to(dtype)).contiguous()


def convert_tensors(lora: LoraFile, fmt: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The LoRA's tensors under `fmt`'s keys (EXPORT_FORMATS)."""
    out: dict[str, torch.Tensor] = {}
    if fmt == "diffusers":  # the scale multiplied into B, alpha = rank (adapter_config): scale 1 in every reader
        for name, m in sorted(lora.modules.items()):
            up = m.up if m.scale == 1.0 else (m.up.float() * m.scale).to(m.up.dtype)
            out[f"transformer.{name}.lora_A.weight"] = _cast(m.down, dtype)
            out[f"transformer.{name}.lora_B.weight"] = _cast(up, dtype)
        return out
    groups = _bfl_groups(lora)
    for bfl, parts in groups.items():
        if len(parts) == 3:
            down, up, alpha = fuse(parts, bake=fmt == "comfyui")
        else:
            one = parts[0]
            assert one is not None
            down, up, alpha = one.down, one.up, one.alpha
            if fmt == "comfyui" and one.scale != 1.0:  # no alpha keys in this layout: the scale goes into B
                up, alpha = (one.up.float() * one.scale).to(one.up.dtype), float(one.rank)
        if fmt == "comfyui":
            out[f"diffusion_model.{bfl}.lora_A.weight"] = _cast(down, dtype)
            out[f"diffusion_model.{bfl}.lora_B.weight"] = _cast(up, dtype)
        elif fmt == "kohya":
            stem = kohya_stem(bfl)
            out[f"{stem}.lora_down.weight"] = _cast(down, dtype)
            out[f"{stem}.lora_up.weight"] = _cast(up, dtype)
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        else:
            raise LoraFileError(f"--format: unknown format {fmt!r} (use {', '.join(EXPORT_FORMATS)})")
    return out


def adapter_config(lora: LoraFile) -> dict[str, Any]:
    """The PEFT LoraConfig dict for `convert_tensors(lora, "diffusers")` (for diffusers' loader): the modules'
    ranks, and alpha = rank everywhere, since those tensors carry each scale in B."""
    r = most_common(lora.ranks())
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {re.escape(n): m.rank for n, m in lora.modules.items() if m.rank != r},
        "alpha_pattern": {re.escape(n): m.rank for n, m in lora.modules.items() if m.rank != r},
        "target_modules": sorted(lora.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
    }


def export_metadata(lora: LoraFile, fmt: str) -> dict[str, str]:
    """The header of an exported file: our fields (base model, family, trigger, rank, alpha, targets, steps,
    format), filled from the source where it has them, plus what each layout's own tools read."""
    md = lora.metadata
    ours = lora.ours()
    rank = most_common(lora.ranks())
    alpha = most_common(lora.alphas())
    ours.setdefault("base_model", md.get("ss_base_model_version", md.get("modelspec.architecture", "")))
    ours.setdefault("family", "")
    ours.setdefault("trigger", md.get("modelspec.trigger_phrase", ""))
    ours.setdefault("rank", str(rank))
    ours.setdefault("alpha", json.dumps(alpha if alpha != int(alpha) else int(alpha)))
    ours.setdefault("targets", describe_targets(set(lora.modules)))
    ours.setdefault("steps", md.get("ss_steps", ""))
    ours["format"] = fmt
    if lora.format != fmt:
        ours["converted_from"] = lora.format
    header = {f"{METADATA_PREFIX}{k}": v for k, v in ours.items()}
    if ours["trigger"]:
        header["modelspec.trigger_phrase"] = ours["trigger"]
    if fmt == "diffusers":
        cfg = adapter_config(lora)  # alpha = rank: the scale is in B
        header[ADAPTER_METADATA_KEY] = json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, sort_keys=True)
        header["format"] = "pt"
    elif fmt == "kohya":
        header["ss_network_dim"] = str(rank)
        header["ss_network_alpha"] = header[f"{METADATA_PREFIX}alpha"]
        if ours["steps"]:
            header["ss_steps"] = ours["steps"]
    # comfyui: diffusers' loader reads `lora_adapter_metadata` as the LoraConfig, which would not match the
    # split qkv modules it builds from a fused file, so that key is never written there (nor for kohya).
    return header


def require_plain(lora: LoraFile) -> None:
    """Conversions carry A, B and alpha: a DoRA adapter's magnitude vectors would be lost, and a LoKr's or LoHa's
    factors of separate q, k, v have no exact fused-qkv form (comfyui, kohya); their own file is already in the
    layout diffusers (LoKr) and ComfyUI read."""
    if lora.kind in ("lokr", "loha"):
        raise LoraFileError(
            f"{lora.name} is a {lora.type_name} adapter: export converts LoRA factors only (a Kronecker or Hadamard "
            "product of separate q, k, v has no exact fused-qkv form); use the file as it is: ComfyUI reads it"
            + (" and so does diffusers' load_lora_weights" if lora.kind == "lokr" else "")
        )
    if lora.dora:
        raise LoraFileError(
            f"{lora.name} is a DoRA adapter (magnitude vectors): only plain LoRAs are converted or merged; "
            "load the file as it is"
        )


def check_output_file(path: Path, overwrite: bool = False, field: str = "--output") -> None:
    """Refuse a file path that cannot be written (a folder, or under a file), and an existing file unless
    `overwrite`. A missing parent folder is fine: it is created."""
    for parent in path.parents:  # the nearest existing ancestor must be a folder
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise LoraFileError(f"{field}: {path}: {parent} is a file, not a folder; choose another path")
            break
    if path.is_dir():
        raise LoraFileError(f"{field}: {path} is a folder; pass a file path (e.g. {path / 'lora.safetensors'})")
    if path.exists() and not path.is_file():
        raise LoraFileError(f"{field}: {path} exists and is not a regular file; choose another path")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise LoraFileError(f"{field}: {path} exists; pass --overwrite to replace it")


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, nearest the root first."""
    missing = [d for d in (folder, *folder.parents) if not (d.exists() or d.is_symlink())]
    return missing[::-1]


def write_lora(lora: LoraFile, path: Path, fmt: str, dtype: torch.dtype | None = None, overwrite: bool = True) -> Path:
    """Write `lora` as `fmt` to `path`, atomically: a temporary file beside it, renamed over it once complete.

    An existing file is replaced only with `overwrite`; a missing parent folder is created. A write that fails
    (disk full, read-only, no permission, interrupted) leaves nothing behind: no temporary file, no folder it
    created, the old file as it was; an operating-system failure is one LoraFileError line with the reason."""
    from safetensors.torch import save_file

    path = Path(path)
    if fmt not in EXPORT_FORMATS:
        raise LoraFileError(f"--format: unknown format {fmt!r} (use {', '.join(EXPORT_FORMATS)})")
    require_plain(lora)
    check_output_file(path, overwrite)
    tensors = convert_tensors(lora, fmt, dtype)
    check_finite(tensors, str(path), "--output")  # e.g. a value past fp16's range after --dtype fp16: never written
    header = export_metadata(lora, fmt)
    created = _missing_folders(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    done = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=header)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        done = True
    except Exception as e:
        reason = os_reason(e)
        if reason is None:
            raise
        raise LoraFileError(f"--output: cannot write {path}: {reason}") from None
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
    return path


def export_lora(
    spec: str, output: str, fmt: str = "diffusers", dtype: torch.dtype | None = None, overwrite: bool = False
) -> tuple[Path, LoraFile]:
    """`export`: the LoRA at `spec` (any known layout, or a run folder) written as `fmt` to the `.safetensors` file
    `output` (see write_lora). The output is checked before the LoRA is read; returns its path and the LoRA read."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format: must be one of {', '.join(EXPORT_FORMATS)} (got {fmt})")
    out_path = Path(output).expanduser()
    if out_path.suffix != ".safetensors":
        raise UsageError(f"--output: {output} must end in .safetensors")
    src = resolve_lora_path(spec)
    if out_path.resolve() == src.resolve():
        raise UsageError(f"--output: {output} is the input file; choose another path")
    check_output_file(out_path, overwrite)  # before the LoRA is read
    lora = load_lora(src)
    write_lora(lora, out_path, fmt, dtype, overwrite=overwrite)
    return out_path, lora
