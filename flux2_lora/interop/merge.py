"""`export --merge`: fuse a LoRA (LoKr, LoHa) into its base model with diffusers' fuse_lora and save the whole model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import os_reason
from ..safety import LoraFileError, require_safetensors_folder
from .fit import check_family, check_fits, model_config
from .layouts import load_lora
from .lycoris import load_into
from .write import _missing_folders, adapter_config, convert_tensors, require_plain

MERGE_INFO = "merged_lora.json"


def _stored_dtype(folder: Path) -> torch.dtype:
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118
                t = sf.get_slice(k)
                dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return torch.float32


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy_file)
    else:
        _link_or_copy_file(str(src), str(dst))


def _link_or_copy_file(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same file system: no second copy of a 48 GB text encoder
    except OSError:
        shutil.copy2(src, dst)


def _inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or somewhere under it (after resolving links)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_folder(output: Path, overwrite: bool = False, field: str = "--output") -> None:
    """Refuse a model-folder path that is a file (or under one), and an existing non-empty folder unless
    `overwrite` and it is a merged model this command wrote (it holds merged_lora.json): --overwrite never
    deletes a folder of anything else. A missing or empty folder is fine."""
    for parent in output.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise LoraFileError(f"{field}: {output}: {parent} is a file, not a folder; choose another path")
            break
    if (output.exists() or output.is_symlink()) and not output.is_dir():
        raise LoraFileError(f"{field}: {output} is a file; --merge writes a model folder, choose a folder path")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not (output / MERGE_INFO).is_file():
        raise LoraFileError(
            f"{field}: {output} exists and is not a merged model (no {MERGE_INFO}), so it is never replaced, "
            "even with --overwrite; choose a new or empty folder"
        )
    if not overwrite:
        raise LoraFileError(f"{field}: {output} exists (a merged model); pass --overwrite to replace it")


def merge_lora(
    lora_spec: str,
    model: str,
    output: Path,
    scale: float = 1.0,
    max_shard_size: str = "5GB",
    dtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Fuse a LoRA (any format) into the base transformer and write the whole model, diffusers layout, to `output`.

    The transformer is loaded in its stored dtype (or `dtype`), the LoRA loaded through diffusers and fused with
    `fuse_lora(lora_scale=scale)`, the adapter removed, and the transformer saved with `save_pretrained` as sharded
    safetensors. The other components are hard-linked (or copied) from the base model folder.

    The model is written to a temporary folder beside `output` and renamed into place once complete; an existing
    merged model there is replaced only with `overwrite` (see check_output_folder). A write that fails leaves no
    temporary folder and the old model as it was; an operating-system failure is one LoraFileError line."""
    from ..config import ModelArgs
    from ..model import DTYPES, resolve_model

    output = Path(output).expanduser()
    check_output_folder(output, overwrite)
    lora = load_lora(lora_spec)
    if not lora.lycoris:  # a LoKr/LoHa is merged through PEFT below; a DoRA is refused
        require_plain(lora)
    if lora.path is not None and _inside(lora.path, output):
        raise LoraFileError(f"--output: {output} holds the LoRA {lora.path}; choose another folder")
    src = resolve_model(ModelArgs(name_or_path=model))
    if _inside(src.path, output) or _inside(output, src.path):
        raise LoraFileError(f"--output: {output} overlaps the base model folder {src.path}; choose a folder outside it")
    check_family(lora, src.family, "--lora")
    config = model_config(src.path)
    check_fits(lora, config, src.name, "--lora")
    require_safetensors_folder(src.path / "transformer", "--model")
    from diffusers import Flux2Transformer2DModel

    torch_dtype = _stored_dtype(src.path / "transformer") if dtype == "auto" else DTYPES[dtype]
    transformer = Flux2Transformer2DModel.from_pretrained(
        src.path / "transformer", torch_dtype=torch_dtype, use_safetensors=True
    )
    if lora.lycoris:  # PEFT's LoKrConfig/LoHaConfig with the file's factors (diffusers' loader reads no LoHa)
        load_into(transformer, lora.lycoris, "merge", lora.name)
    else:  # a LoraConfig built from the modules (ranks, alphas), so diffusers applies exactly the file's scales
        transformer.load_lora_adapter(
            convert_tensors(lora, "diffusers"),
            prefix="transformer",
            adapter_name="merge",
            metadata={f"transformer.{k}": v for k, v in adapter_config(lora).items()},
        )
    transformer.fuse_lora(lora_scale=scale, adapter_names=["merge"])
    transformer.unload_lora()
    info = {
        "base_model": model,
        "lora": str(lora.path),
        "lora_format": lora.format,
        "lora_type": lora.kind,
        "scale": scale,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "lora_metadata": lora.ours(),
    }
    created = _missing_folders(output.parent)
    tmp = output.with_name(f".tmp-{output.name}")
    old = output.with_name(f".old-{output.name}")
    done = False
    try:
        if tmp.exists():  # left by a merge that was killed
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
        for item in src.path.iterdir():
            if item.name != "transformer" and not item.name.startswith("."):
                _link_or_copy(item, tmp / item.name)
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=1) + "\n")
        check_output_folder(output, overwrite)  # again: something may have appeared there meanwhile
        if output.is_dir() and any(output.iterdir()):
            if old.exists():
                shutil.rmtree(old)
            os.replace(output, old)  # the old model is set aside, and put back if the rename below fails
            try:
                os.replace(tmp, output)
            except BaseException:
                os.replace(old, output)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            if output.exists():
                output.rmdir()
            os.replace(tmp, output)
        done = True
    except Exception as e:
        reason = os_reason(e)
        if reason is None:
            raise
        raise LoraFileError(f"--output: cannot write the merged model {output}: {reason}") from None
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
    return output
