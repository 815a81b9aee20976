"""LoRA export and pickle-free, atomic, resumable checkpoints.

A checkpoint folder `checkpoints/step-N/` holds:
  lora.safetensors       the LoRA in diffusers format (loads with Flux2Pipeline.load_lora_weights)
  trainable.safetensors  every trainable tensor by parameter name (exact restore)
  optimizer.safetensors  optimizer state tensors; optimizer.json the rest of its state
  state.json             step, scheduler, callbacks, data position; rng.safetensors the RNG states
  lora_ema.safetensors   with training.ema_decay: the EMA of the LoRA, like lora.safetensors; ema.safetensors its
                         exact fp32 tensors by parameter name (what a resume reads; ema.py)
It is written into `.tmp-step-N`, fsynced, renamed, and only then is `latest` (a one-line file)
replaced atomically, so a kill at any moment leaves the previous checkpoint intact. A write that fails (a full disk,
a read-only folder) removes its temporary folder and raises a CheckpointError naming the file and the OS reason.

Lineage: the folder holds the checkpoints of one line of training. A run resumed from step S first sets the
checkpoints after S aside (into `checkpoints/set-aside-<time>/`, never deleted), so retention (`keep_last`) only ever
counts this lineage, the checkpoint just written is never deleted, and `latest` always names a checkpoint that exists.
`--resume latest` takes the newest checkpoint that passes `check_checkpoint` and names each damaged one it skips.
Nothing here uses pickle: everything is safetensors or JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .distributed import global_shape, load_optimizer, load_trainable
from .ema import EMA_STATE_FILE
from .errors import CheckpointError
from .resources import LORA_FILE, METADATA_PREFIX

# What a resumable checkpoint holds besides its LoRA (which resuming does not read).
RESUME_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")


def os_reason(e: BaseException) -> str | None:
    """The operating system's reason for a failed read or write: an OSError's, or the one inside a safetensors
    error (it reports `Os { code: 28, ... }` without an errno). None for other errors."""
    if isinstance(e, OSError) and e.errno is not None:
        return e.strerror or os.strerror(e.errno)
    m = re.search(r"(?:os error |code: )(\d+)", str(e))
    if m and type(e).__name__ == "SafetensorError":
        return os.strerror(int(m.group(1)))
    return None


@contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turn a failed write inside the block (disk full, read-only, no permission) into one CheckpointError line."""
    try:
        yield
    except Exception as e:
        reason = os_reason(e)
        if reason is None:
            raise
        name = getattr(e, "filename", None) or path
        raise CheckpointError(f"cannot write {what} {name}: {reason}") from None


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write non-finite tensors: a LoRA with NaN or inf in it breaks every image it touches."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{what}: {k} has {n} non-finite values (NaN/inf); not written")


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

    Keys are `transformer.<module>.lora_A/B.weight` (LoKr: `.lokr_w1`, `.lokr_w2` or `.lokr_w2_a/_b`; LoHa:
    `.hada_w1_a/_b`, `.hada_w2_a/_b`, PEFT's names, which diffusers (LoKr) and ComfyUI (both) read); the header
    carries diffusers' adapter metadata (the PEFT config) and `flux2_lora.*` fields (base model, trigger, type,
    rank, alpha, targets, steps).

    The scale alpha/rank is multiplied into each lora_B and the file says alpha = rank (scale 1), so every reader
    applies the same update, also those that ignore the header's alpha (ComfyUI's loader applies scale 1 to a
    diffusers-format file). The recipe's alpha stays in `flux2_lora.alpha`; `flux2_lora.scale_in_B` says it was
    folded in.
    """
    layers = lora_state_dict(transformer, state_dict)
    # LoRA/DoRA: the scale goes into lora_B; LoKr/LoHa (PEFT's LoKrConfig/LoHaConfig, `alpha`): into the first factor,
    # lokr_w1 (or lokr_w1_a) / hada_w1_a, one per module; ComfyUI applies scale 1 to such factors without `.alpha`.
    lycoris = lora_config.get("peft_type") in ("LOKR", "LOHA")
    alpha_key, into = ("alpha", (".lokr_w1", ".lokr_w1_a", ".hada_w1_a")) if lycoris else ("lora_alpha", None)
    scale = float(lora_config.get(alpha_key) or lora_config["r"]) / float(lora_config["r"])
    if lora_config.get("rank_pattern") or lora_config.get("alpha_pattern") or lora_config.get("use_rslora"):
        raise CheckpointError(f"{path}: per-module ranks or alphas (rank_pattern/alpha_pattern, rsLoRA) are not saved")
    if scale != 1.0:
        layers = {k: (v * scale if (k.endswith(into) if into else ".lora_B." in k) else v) for k, v in layers.items()}
    # Dropout is for training only: diffusers 0.42 leaves the adapter layers it injects in train mode, so a header
    # dropout would drop at inference (a different image every call).
    dropouts = ("lora_dropout", "rank_dropout", "module_dropout")
    no_dropout: dict[str, float] = {k: 0.0 for k in dropouts if k in lora_config}
    lora_config = {**lora_config, alpha_key: lora_config["r"], **no_dropout}
    metadata = {**metadata, ("scale_in_w1" if lycoris else "scale_in_B"): scale}
    if dtype is not None:
        layers = {k: v.to(dtype) for k, v in layers.items()}
    check_finite(layers, str(path))
    tmp_dir = path.parent / f".tmp-{path.stem}"
    tmp_file = path.with_name(f".{path.name}.tmp")
    try:
        with writing("the LoRA", path):
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
            header.update(
                {f"{METADATA_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
            )
            save_file(tensors, str(tmp_file), metadata=header)
            with open(tmp_file, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_file, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_file.unlink(missing_ok=True)
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
    """Write checkpoints/step-N atomically, point `latest` at it, and keep the last keep_last of this lineage.

    A failed write (disk full, read-only) leaves no temporary folder and the earlier checkpoints as they were."""
    check_finite(trainable, f"checkpoint step-{step}")
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    try:
        with writing("checkpoint", final):
            root.mkdir(parents=True, exist_ok=True)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _retain(root, keep_last, final)
    return final


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def list_checkpoints(root: Path) -> list[Path]:
    """The `step-N` folders in `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and _step_of(p) >= 0]
    return sorted(dirs, key=_step_of)


def _retain(root: Path, keep_last: int, current: Path) -> None:
    """Delete all but the newest keep_last checkpoints up to `current` (just written; never deleted). Nothing newer
    than `current` is touched: a run resumed from an older step set those aside before it started."""
    older = [p for p in list_checkpoints(root) if _step_of(p) < _step_of(current)]
    for p in older[: max(len(older) - (keep_last - 1), 0)]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def point_latest(root: Path) -> None:
    """`latest` names the newest checkpoint in `root`, or is removed when there is none."""
    ckpts = list_checkpoints(root)
    pointer = root / "latest"
    if pointer.is_dir() and not pointer.is_symlink():  # not ours: set it aside like a replaced checkpoint
        os.replace(pointer, root / f"set-aside-latest-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    if ckpts:
        atomic_write_text(pointer, ckpts[-1].name + "\n")
    else:
        pointer.unlink(missing_ok=True)


def set_aside_after(root: Path, step: int) -> list[Path]:
    """Move the checkpoints after `step` (of a line of training being replaced by a resume from `step`) into
    `root/set-aside-<UTC time>/`, keep nothing pointing at them, and return where they are now."""
    later = [p for p in list_checkpoints(root) if _step_of(p) > step]
    if not later:
        if root.is_dir():
            point_latest(root)
        return []
    aside = root / f"set-aside-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    n = 1
    while aside.exists():
        aside, n = root / f"{aside.name.split('.')[0]}.{n}", n + 1
    aside.mkdir()
    for p in later:
        os.replace(p, aside / p.name)
    _fsync_dir(root)
    point_latest(root)
    return [aside / p.name for p in later]


def _tensor_refs(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            yield str(obj["__tensor__"])
        else:
            for v in obj.values():
                yield from _tensor_refs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _tensor_refs(v)


def _json_file(path: Path) -> Any:
    return json.loads(path.read_text())


def check_checkpoint(path: Path, values: bool = True) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed, naming the file (None: it can).

    Cheap and complete for structure: every file is present, each safetensors header parses and its data is all
    there (safetensors checks the sizes against the header), the JSON files parse with the fields resuming reads,
    and the optimizer's tensor references exist; with `values`, the weights hold no NaN/inf (one read of
    trainable.safetensors; load_checkpoint checks the values it loads instead of reading them twice)."""
    for name in RESUME_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    keys: dict[str, set[str]] = {}
    optional = [name for name in (EMA_STATE_FILE,) if (path / name).is_file()]  # only with training.ema_decay
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", *optional):
        try:
            with safe_open(str(path / name), framework="pt") as f:
                keys[name] = set(f.keys())
        except Exception as e:
            return f"{name} is damaged ({_first_line(e)})"
    try:
        state = _json_file(path / "state.json")
    except (OSError, ValueError) as e:
        return f"state.json is damaged ({_first_line(e)})"
    if not isinstance(state, dict):
        return "state.json is damaged (not a JSON object)"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"state.json is damaged (step {step!r} is not a whole number >= 0)"
    if _step_of(path) >= 0 and _step_of(path) != step:
        return f"state.json says step {step}, the folder is {path.name}"
    for key, kind in (("lr_scheduler", dict), ("val_history", list), ("callbacks", dict)):  # the trainer's fields
        if key in state and not isinstance(state[key], kind):
            return f"state.json is damaged ({key} is not a JSON {kind.__name__})"
    try:
        opt = _json_file(path / "optimizer.json")
    except (OSError, ValueError) as e:
        return f"optimizer.json is damaged ({_first_line(e)})"
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("param_groups"), list)
        or not isinstance(opt.get("state"), dict)
    ):
        return "optimizer.json is damaged (param_groups or state missing)"
    missing = [k for k in _tensor_refs(opt["state"]) if k not in keys["optimizer.safetensors"]]
    if missing:
        return f"optimizer.safetensors is damaged ({len(missing)} optimizer tensors missing, e.g. {missing[0]})"
    if not values:
        return None
    # The weights themselves (a LoRA's size): NaN/inf is never written, so it can only be damage.
    try:
        with safe_open(str(path / "trainable.safetensors"), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has no items()
                t = f.get_tensor(k)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return f"trainable.safetensors is damaged ({k} has non-finite values)"
    except Exception as e:
        return f"trainable.safetensors is damaged ({_first_line(e)})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_resume(spec: str, checkpoints_root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint `--resume SPEC` continues from, and what to tell the user about the choice.

    `latest`: the newest checkpoint that passes check_checkpoint, each damaged one
    skipped is named; None when there is no usable one (a new run starts). An explicit folder must pass, else a
    CheckpointError names the damaged file and the newest older checkpoint that resumes."""
    notes: list[str] = []
    if spec == "latest":
        # Newest first, by step: a checkpoint is renamed into place only once complete, so a newer one than
        # `latest` names (a kill between the rename and the pointer update) is whole.
        ckpts = list_checkpoints(checkpoints_root)
        for c in reversed(ckpts):
            reason = check_checkpoint(c)
            if reason is None:
                if notes:
                    notes.append(f"resume: {c.name} is the newest checkpoint that resumes")
                return c, notes
            notes.append(f"resume: skipping {c}: {reason}")
        if ckpts:
            notes.append(f"resume: no checkpoint in {checkpoints_root} resumes; starting from step 0")
        else:
            notes.append("resume: no checkpoint yet, starting from step 0")
        return None, notes
    path = Path(spec).expanduser()
    if not path.is_dir() or not any((path / name).exists() for name in RESUME_FILES):
        raise CheckpointError(
            f"--resume: {spec} is not a checkpoint folder (no state.json); use latest or checkpoints/step-N"
        )
    reason = check_checkpoint(path)
    if reason is not None:
        older = [c for c in list_checkpoints(path.parent) if _step_of(c) < _step_of(path) and not check_checkpoint(c)]
        hint = f"; {older[-1]} resumes (--resume {older[-1]})" if older else "; no older checkpoint beside it resumes"
        raise CheckpointError(f"--resume: {path} cannot be resumed: {reason}{hint}")
    return path, notes


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json (step, data position, recipe), without loading any tensor."""
    try:
        return dict(_json_file(path / "state.json"))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"--resume: {path}/state.json cannot be read ({_first_line(e)})") from None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore trainable tensors and optimizer state in place; return (state, rng)."""
    reason = check_checkpoint(path, values=False)  # the values are checked once loaded, below
    if reason is not None:
        raise CheckpointError(f"--resume: {path} cannot be resumed: {reason}")
    saved = _load(path, "trainable.safetensors")
    bad = next((n for n, t in saved.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(
            f"--resume: {path} cannot be resumed: trainable.safetensors is damaged ({bad} has non-finite values)"
        )
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
    meta = _json_file(path / "optimizer.json")
    try:
        load_optimizer(optimizer, _optimizer_from_files(_load(path, "optimizer.safetensors"), meta), model)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(
            f"--resume: {path}/optimizer.json does not fit this recipe's optimizer ({_first_line(e)}); "
            "resume with the recipe that wrote it"
        ) from None
    state = _json_file(path / "state.json")
    rng = _load(path, "rng.safetensors")
    return state, rng


def _load(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / name))
    except Exception as e:
        raise CheckpointError(f"--resume: {path}/{name} cannot be read ({_first_line(e)})") from None
