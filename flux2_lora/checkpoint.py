"""LoRA export and pickle-free, atomic, resumable checkpoints.

A checkpoint folder `checkpoints/step-N/` holds:
  lora.safetensors       the LoRA in diffusers format (loads with Flux2Pipeline.load_lora_weights)
  trainable.safetensors  every trainable tensor by parameter name (exact restore)
  optimizer.safetensors  optimizer state tensors; optimizer.json the rest of its state
  state.json             step, scheduler, callbacks, data position; rng.safetensors the RNG states
It is written into `.tmp-step-N`, fsynced, renamed, and only then is `latest` (a one-line file)
replaced atomically, so a kill at any moment leaves the previous checkpoint intact.
Nothing here uses pickle: everything is safetensors or JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .distributed import global_shape, load_optimizer, load_trainable

LORA_FILE = "lora.safetensors"
METADATA_PREFIX = "flux2_lora."


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the path and the reason."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# LoRA export (diffusers format)
# ---------------------------------------------------------------------------------------------


def lora_state_dict(transformer: Any, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors with PEFT's names (no `.default`), contiguous on the CPU.

    `state_dict`: whole tensors by parameter name, when the model's own are sharded (gathered by the caller)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, state_dict=state_dict)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def save_lora(
    path: Path,
    transformer: Any,
    pipeline_cls: Any,
    lora_config: dict[str, Any],
    metadata: dict[str, Any],
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `path` (a .safetensors file) with `pipeline_cls.save_lora_weights`, plus our metadata.

    Keys are `transformer.<module>.lora_A/B.weight`; the header carries diffusers' adapter metadata
    and `flux2_lora.*` fields (base model, trigger, rank, alpha, targets, steps).
    """
    layers = lora_state_dict(transformer, state_dict)
    if dtype is not None:
        layers = {k: v.to(dtype) for k, v in layers.items()}
    tmp_dir = path.parent / f".tmp-{path.stem}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    adapter_meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora_config.items()}
    pipeline_cls.save_lora_weights(
        tmp_dir,
        transformer_lora_layers=layers,
        weight_name=path.name,
        transformer_lora_adapter_metadata=adapter_meta,
    )
    written = tmp_dir / path.name
    with safe_open(str(written), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header.update({f"{METADATA_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    tmp_file = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp_file), metadata=header)
    with open(tmp_file, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp_file, path)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def read_lora_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ---------------------------------------------------------------------------------------------
# Resumable state
# ---------------------------------------------------------------------------------------------


def _split_tensors(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by {"__tensor__": key}, collecting it in `tensors`."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {str(k): _split_tensors(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def _optimizer_to_files(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as (tensors for safetensors, JSON). Handles nested state (bitsandbytes 8-bit)."""
    tensors: dict[str, torch.Tensor] = {}
    state = {str(idx): _split_tensors(st, str(idx), tensors) for idx, st in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {int(idx): _join_tensors(st, tensors) for idx, st in meta["state"].items()}
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    rng: dict[str, torch.Tensor],
    export_lora: Any,
    keep_last: int,
) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, delete all but the last keep_last."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_files(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    export_lora(tmp / LORA_FILE)
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    _retain(root, keep_last)
    return final


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and _step_of(p) >= 0]
    return sorted(dirs, key=_step_of)


def _retain(root: Path, keep_last: int) -> None:
    for p in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(spec: str, checkpoints_root: Path) -> Path | None:
    """`latest` (None when the run has no checkpoint yet) or an explicit checkpoint folder."""
    if spec == "latest":
        pointer = checkpoints_root / "latest"
        if pointer.exists():
            target = checkpoints_root / pointer.read_text().strip()
            if (target / "state.json").exists():
                return target
        ckpts = [c for c in list_checkpoints(checkpoints_root) if (c / "state.json").exists()]
        return ckpts[-1] if ckpts else None
    path = Path(spec).expanduser()
    if not (path / "state.json").exists():
        raise CheckpointError(
            f"--resume: {spec} is not a checkpoint folder (no state.json); use latest or checkpoints/step-N"
        )
    return path


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json (step, data position, recipe), without loading any tensor."""
    try:
        return dict(json.loads((path / "state.json").read_text()))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--resume: {path}/state.json cannot be read ({e})") from None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore trainable tensors and optimizer state in place; return (state, rng)."""
    for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"):
        if not (path / name).exists():
            raise CheckpointError(f"--resume: {path} is incomplete ({name} missing)")
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    unknown = [n for n in saved if n not in params]
    if missing or unknown:
        raise CheckpointError(
            f"--resume: {path} does not match this recipe's LoRA ({len(missing)} missing, {len(unknown)} unexpected "
            f"tensors, e.g. {(missing or unknown)[0]}); resume with the recipe that wrote it"
        )
    for n, t in saved.items():
        if global_shape(params[n]) != tuple(t.shape):
            raise CheckpointError(
                f"--resume: {path}: {n} has shape {tuple(t.shape)}, the model {global_shape(params[n])}"
            )
    load_trainable(model, saved)  # sharded like the model's parameters where they are sharded
    meta = json.loads((path / "optimizer.json").read_text())
    load_optimizer(optimizer, _optimizer_from_files(load_file(str(path / "optimizer.safetensors")), meta), model)
    state = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    return state, rng
