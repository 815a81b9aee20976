"""`export --merge`: fuse a LoRA into its base model with diffusers' fuse_lora and save the whole model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .fit import check_family, check_fits, model_config
from .layouts import adapter_config, convert_tensors, load_lora, require_plain
from .safety import LoraFileError, require_safetensors_folder

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


def merge_lora(
    lora_spec: str,
    model: str,
    output: Path,
    scale: float = 1.0,
    max_shard_size: str = "5GB",
    dtype: str = "auto",
) -> Path:
    """Fuse a LoRA (any format) into the base transformer and write the whole model, diffusers layout, to `output`.

    The transformer is loaded in its stored dtype (or `dtype`), the LoRA loaded through diffusers and fused with
    `fuse_lora(lora_scale=scale)`, the adapter removed, and the transformer saved with `save_pretrained` as sharded
    safetensors. The other components are hard-linked (or copied) from the base model folder."""
    from ..config import ModelArgs
    from ..model import DTYPES, resolve_model

    lora = load_lora(lora_spec)
    require_plain(lora)
    output = Path(output).expanduser()
    if output.exists() and any(output.iterdir()):
        raise LoraFileError(f"--output: {output} exists and is not empty; choose a new folder")
    src = resolve_model(ModelArgs(name_or_path=model))
    check_family(lora, src.family, "--lora")
    config = model_config(src.path)
    check_fits(lora, config, src.name, "--lora")
    require_safetensors_folder(src.path / "transformer", "--model")
    from diffusers import Flux2Transformer2DModel

    torch_dtype = _stored_dtype(src.path / "transformer") if dtype == "auto" else DTYPES[dtype]
    transformer = Flux2Transformer2DModel.from_pretrained(
        src.path / "transformer", torch_dtype=torch_dtype, use_safetensors=True
    )
    # A LoraConfig built from the modules (ranks, alphas), so diffusers applies exactly the file's scales.
    transformer.load_lora_adapter(
        convert_tensors(lora, "diffusers"),
        prefix="transformer",
        adapter_name="merge",
        metadata={f"transformer.{k}": v for k, v in adapter_config(lora).items()},
    )
    transformer.fuse_lora(lora_scale=scale, adapter_names=["merge"])
    transformer.unload_lora()
    tmp = output.with_name(f".tmp-{output.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=max_shard_size)
    for item in src.path.iterdir():
        if item.name != "transformer" and not item.name.startswith("."):
            _link_or_copy(item, tmp / item.name)
    info = {
        "base_model": model,
        "lora": str(lora.path),
        "lora_format": lora.format,
        "scale": scale,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "lora_metadata": lora.ours(),
    }
    (tmp / MERGE_INFO).write_text(json.dumps(info, indent=1) + "\n")
    if output.exists():
        output.rmdir()
    os.replace(tmp, output)
    return output
