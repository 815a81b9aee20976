"""LoRA files in the layouts other FLUX.2 tools use: read any, write ours in theirs, merge, start training from one.

Every LoRA is read into one form: a dict from diffusers module names (`transformer_blocks.0.attn.to_q`) to a
`LoraModule` (down = A of shape (r, in), up = B of shape (out, r), alpha; the update is alpha / r * B @ A).

Layouts (`FORMATS`):
  diffusers   `transformer.<module>.lora_A/B.weight` + `lora_adapter_metadata` (what training writes)
  peft        `base_model.model.<module>.lora_A/B.weight` (PEFT's save_pretrained) or bare PEFT names
  comfyui     `diffusion_model.<BFL name>.lora_A/B.weight`: FLUX.2's original block names, where the double
              blocks' q, k and v live in one fused `qkv` linear (what ComfyUI and BFL's code load)
  ai-toolkit  `diffusion_model.` keys as ai-toolkit writes them (BFL names, or diffusers names under that prefix)
  kohya       `lora_unet_<BFL name with _>.lora_down/lora_up.weight` + `.alpha` (sd-scripts, musubi-tuner)

Fused qkv: separate q, k, v factors (A_q, B_q), ... become one fused pair with A = [A_q; A_k; A_v] stacked
(rank 3r) and B block-diagonal (B_q, B_k, B_v on the diagonal, zeros elsewhere), so B @ A = [B_q A_q; B_k A_k;
B_v A_v]: exactly the three separate updates. The alpha goes with the larger rank (kohya: alpha x 3, so
alpha / rank is unchanged; comfyui files carry no alpha, the scale is multiplied into B). Reading a fused
file splits it back: block-diagonal B gives the three rank-r pairs again, any other B gives q, k, v that
share the fused A (also exact).

Only safetensors are read. A pickle-based file (.bin/.pt/.pth/.ckpt, or bytes that are not safetensors) is
refused before anything in it is loaded: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .checkpoint import LORA_FILE, METADATA_PREFIX, CheckpointError

FORMATS = ("diffusers", "peft", "comfyui", "ai-toolkit", "kohya")
EXPORT_FORMATS = ("diffusers", "comfyui", "kohya")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the LoraConfig


class LoraFileError(CheckpointError):
    """A LoRA file cannot be used as asked; the message names the file (or field) and the reason."""


# ---------------------------------------------------------------------------------------------
# Only safetensors
# ---------------------------------------------------------------------------------------------


def require_safetensors(path: Path, field: str) -> None:
    """Raise unless `path` is a safetensors file, judged by its extension and its first bytes, never by loading it."""
    if not path.exists():
        raise LoraFileError(f"{field}: {path} does not exist")
    if not path.is_file():
        raise LoraFileError(f"{field}: {path} is not a file")
    why = "only safetensors files are read: pickle-based files can run arbitrary code when they are loaded"
    hint = "convert it to .safetensors first, in an environment you trust"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{field}: {path} is a pickle-based {path.suffix} file, refused without opening it; {why}; {hint}"
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 9 or header_len < 2 or header_len > size - 8 or head[8:9] != b"{":
        if head[:1] == b"\x80":
            kind = "it holds a pickle"
        elif head[:4] == b"PK\x03\x04":
            kind = "it is a torch.save zip archive (pickle inside)"
        else:
            kind = "its first bytes are not a safetensors header"
        raise LoraFileError(f"{field}: {path} is not a safetensors file ({kind}), refused without unpickling; {why}")


def require_safetensors_folder(folder: Path, field: str) -> None:
    """A diffusers component folder must hold its weights as safetensors (diffusers falls back to pickle otherwise)."""
    weights = list(folder.glob("*.safetensors"))
    pickles = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES] if folder.is_dir() else []
    if not weights:
        found = f" (only {pickles[0].name})" if pickles else ""
        raise LoraFileError(
            f"{field}: {folder} has no .safetensors weights{found}; pickle-based weights are never loaded "
            "because unpickling can run arbitrary code; convert them to safetensors first"
        )
    for p in weights:
        require_safetensors(p, field)


def resolve_lora_path(spec: str | Path, field: str = "--lora") -> Path:
    """A LoRA file, or a run / checkpoint folder holding lora.safetensors."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / LORA_FILE).exists():
            return path / LORA_FILE
        raise LoraFileError(f"{field}: {path} is a folder without {LORA_FILE}; pass the LoRA file")
    require_safetensors(path, field)
    return path


# ---------------------------------------------------------------------------------------------
# The one in-memory form
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    """One adapted linear layer: update = alpha / rank * up @ down."""

    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer it adapts."""
        return int(self.up.shape[0]), int(self.down.shape[1])

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())


@dataclass
class LoraFile:
    format: str
    modules: dict[str, LoraModule]  # diffusers module names, without the `transformer.` prefix
    metadata: dict[str, str] = field(default_factory=dict)  # the file's safetensors header
    path: Path | None = None
    num_params: int = 0  # tensor values in the file as stored (alphas excluded)
    dtype: torch.dtype = torch.float32
    dora: bool = False
    fused_qkv: bool = False  # the file held fused qkv factors (comfyui, kohya)

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "the LoRA"

    def ours(self) -> dict[str, str]:
        """Our `flux2_lora.*` header fields, without the prefix."""
        return {k[len(METADATA_PREFIX) :]: v for k, v in self.metadata.items() if k.startswith(METADATA_PREFIX)}

    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in self.modules.values())

    def alphas(self) -> Counter[float]:
        return Counter(m.alpha for m in self.modules.values())


# ---------------------------------------------------------------------------------------------
# Names: diffusers <-> BFL (ComfyUI) <-> kohya
# ---------------------------------------------------------------------------------------------

# transformer_blocks.{i}.<diffusers> -> double_blocks.{i}.<BFL>, and the part of a fused qkv (None: not fused)
_DOUBLE: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
# single_transformer_blocks.{i}.<diffusers> -> single_blocks.{i}.<BFL> (linear1 is fused in both layouts)
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
# Plain linears outside the blocks whose weights are laid out the same in both models.
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
_QKV_PARTS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|double_blocks|single_blocks)\.(\d+)\.(.+)$")


def to_bfl(name: str) -> tuple[str, int | None] | None:
    """(BFL name, qkv part) of a diffusers module name; None when it has no BFL counterpart we map."""
    m = _BLOCK.match(name)
    if m is None:
        return (_GLOBAL[name], None) if name in _GLOBAL else None
    kind, idx, rest = m.groups()
    if kind == "transformer_blocks" and rest in _DOUBLE:
        bfl, part = _DOUBLE[rest]
        return f"double_blocks.{idx}.{bfl}", part
    if kind == "single_transformer_blocks" and rest in _SINGLE:
        return f"single_blocks.{idx}.{_SINGLE[rest]}", None
    return None


def from_bfl(name: str) -> list[str] | None:
    """Diffusers module names of a BFL name (three for a fused qkv, in q, k, v order); None when unknown."""
    m = _BLOCK.match(name)
    if m is None:
        back = {v: k for k, v in _GLOBAL.items()}
        return [back[name]] if name in back else None
    kind, idx, rest = m.groups()
    if kind == "double_blocks":
        if rest in _QKV_PARTS:
            return [f"transformer_blocks.{idx}.{p}" for p in _QKV_PARTS[rest]]
        for dname, (bfl, part) in _DOUBLE.items():
            if bfl == rest and part is None:
                return [f"transformer_blocks.{idx}.{dname}"]
        return None
    if kind == "single_blocks":
        for dname, bfl in _SINGLE.items():
            if bfl == rest:
                return [f"single_transformer_blocks.{idx}.{dname}"]
        return None
    return [name]  # already a diffusers block name (some ai-toolkit files)


def kohya_stem(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


def bfl_from_kohya(stem: str) -> str | None:
    """BFL name of a kohya module stem (`lora_unet_double_blocks_0_img_attn_qkv`)."""
    body = stem.removeprefix("lora_unet_")
    m = re.match(r"^(double_blocks|single_blocks)_(\d+)_(.+)$", body)
    if m:
        kind, idx, rest = m.groups()
        tails = (
            {b.replace(".", "_"): b for b, _ in _DOUBLE.values()}
            if kind == "double_blocks"
            else {b.replace(".", "_"): b for b in _SINGLE.values()}
        )
        return f"{kind}.{idx}.{tails[rest]}" if rest in tails else None
    flat = {b.replace(".", "_"): b for b in _GLOBAL.values()}
    return flat.get(body)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def detect_format(keys: list[str], metadata: dict[str, str]) -> str | None:
    """Which layout a LoRA file's keys are in (see FORMATS); None when none fits."""
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in keys):
        bfl = any(k.startswith(("diffusion_model.double_blocks.", "diffusion_model.single_blocks.")) for k in keys)
        said = "ai-toolkit" in json.dumps(metadata).lower()
        return "comfyui" if bfl and not said else "ai-toolkit"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers"
    if any(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) and ".lora_" in k for k in keys):
        return "peft"
    return None


_KINDS = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
)
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _KINDS:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            for p in _PREFIXES:
                if stem.startswith(p):
                    stem = stem[len(p) :]
                    break
            return stem, kind
    return None


def _adapter_config(metadata: dict[str, str]) -> dict[str, Any]:
    """diffusers' LoraConfig from the header (its keys carry a `transformer.` prefix), or {}."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return {k.removeprefix("transformer."): v for k, v in cfg.items()} if isinstance(cfg, dict) else {}


def _pattern_value(patterns: dict[str, Any], name: str) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def load_lora(spec: str | Path, field: str = "--lora") -> LoraFile:
    """Read a LoRA file in any of FORMATS (a run or checkpoint folder means its lora.safetensors)."""
    from safetensors import safe_open

    path = resolve_lora_path(spec, field)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as e:  # noqa: BLE001 - a corrupt file of any kind: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoraFileError(f"{field}: {path} cannot be read as safetensors ({first})") from None
    return parse_lora(tensors, metadata, path, field)


def parse_lora(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path | None = None, field: str = "--lora"
) -> LoraFile:
    name = str(path) if path else "the LoRA"
    keys = list(tensors)
    fmt = detect_format(keys, metadata)
    if fmt is None:
        first = keys[0] if keys else "(no tensors)"
        raise LoraFileError(
            f"{field}: {name} is not a FLUX.2 LoRA in a known layout (diffusers transformer.*, peft base_model.model.*, "
            f"comfyui/ai-toolkit diffusion_model.*, kohya lora_unet_*); first key: {first}"
        )
    dora = any("lora_magnitude_vector" in k or "dora_scale" in k for k in keys)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for k, t in tensors.items():
        split = _split_key(k)
        if split is None:
            if "lora_magnitude_vector" not in k and "dora_scale" not in k:
                unknown.append(k)
            continue
        stem, kind = split
        parts.setdefault(stem, {})[kind] = t
    for stem, p in parts.items():
        if "down" not in p or "up" not in p:
            missing = "down (lora_A)" if "down" not in p else "up (lora_B)"
            raise LoraFileError(f"{field}: {name}: {stem} has no {missing} tensor")
    if unknown:
        raise LoraFileError(f"{field}: {name} has {len(unknown)} tensors that are not LoRA factors (e.g. {unknown[0]})")
    config = _adapter_config(metadata)
    rslora = bool(config.get("use_rslora"))
    modules: dict[str, LoraModule] = {}
    fused = False
    for stem, p in sorted(parts.items()):
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"{field}: {name}: {stem} has factors of shapes {tuple(down.shape)} and {tuple(up.shape)}, "
                "not a linear LoRA (down: rank x in, up: out x rank)"
            )
        rank = int(down.shape[0])
        if "alpha" in p:
            alpha = float(p["alpha"].float().item())
        elif config:
            a = _pattern_value(config.get("alpha_pattern", {}), stem)
            alpha = float(a if a is not None else config.get("lora_alpha", rank))
            if rslora:  # PEFT scales by alpha / sqrt(r) there
                alpha = alpha * rank**0.5
        else:
            alpha = float(rank)  # no alpha anywhere: the diffusers/ComfyUI convention, scale 1
        if fmt == "kohya":
            bfl = bfl_from_kohya(stem)
            targets = from_bfl(bfl) if bfl else None
        elif fmt in ("comfyui", "ai-toolkit"):
            targets = from_bfl(stem)
        else:
            targets = [stem]
        if targets is None:
            raise LoraFileError(f"{field}: {name}: no FLUX.2 transformer module is known for {stem}")
        if len(targets) == 1:
            modules[targets[0]] = LoraModule(down, up, alpha)
        else:
            fused = True
            modules.update(split_fused(down, up, alpha, targets))
    num = sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))
    dtypes = Counter(t.dtype for k, t in tensors.items() if not k.endswith(".alpha"))
    return LoraFile(
        format=fmt,
        modules=modules,
        metadata=metadata,
        path=path,
        num_params=num,
        dtype=dtypes.most_common(1)[0][0] if dtypes else torch.float32,
        dora=dora,
        fused_qkv=fused,
    )


def split_fused(down: torch.Tensor, up: torch.Tensor, alpha: float, names: list[str]) -> dict[str, LoraModule]:
    """Split a fused qkv pair into q, k, v modules with exactly the same updates.

    Block-diagonal `up` (as `fuse` writes it): each part gets its own rows of `down` and its diagonal block of
    `up`, the original rank-r pairs. Otherwise every part shares `down` and takes its third of `up`'s rows.
    A part whose update is zero is left out."""
    n = len(names)
    out_rows = up.shape[0] // n
    rank = down.shape[0]
    scale = alpha / rank
    result: dict[str, LoraModule] = {}
    if rank % n == 0:
        r = rank // n
        blocks = [(slice(i * out_rows, (i + 1) * out_rows), slice(i * r, (i + 1) * r)) for i in range(n)]
        off_diagonal_zero = all(
            not up[rows, cols].any()
            for i, (rows, _) in enumerate(blocks)
            for j, (_, cols) in enumerate(blocks)
            if i != j
        )
        if off_diagonal_zero:
            for name, (rows, cols) in zip(names, blocks, strict=True):
                b = up[rows, cols].contiguous()
                if b.any():
                    result[name] = LoraModule(down[cols].contiguous(), b, scale * r)
            return result
    for i, name in enumerate(names):
        b = up[i * out_rows : (i + 1) * out_rows].contiguous()
        if b.any():
            result[name] = LoraModule(down.contiguous(), b, alpha)
    return result


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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


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
    if fmt == "diffusers":
        for name, m in sorted(lora.modules.items()):
            out[f"transformer.{name}.lora_A.weight"] = _cast(m.down, dtype)
            out[f"transformer.{name}.lora_B.weight"] = _cast(m.up, dtype)
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


def _most_common(counter: Counter[Any]) -> Any:
    return counter.most_common(1)[0][0] if counter else 0


def adapter_config(lora: LoraFile) -> dict[str, Any]:
    """A PEFT LoraConfig dict that reproduces the modules' ranks and alphas (for diffusers' loader)."""
    r = _most_common(lora.ranks())
    alpha = _most_common(lora.alphas())
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): m.rank for n, m in lora.modules.items() if m.rank != r},
        "alpha_pattern": {re.escape(n): m.alpha for n, m in lora.modules.items() if m.alpha != alpha},
        "target_modules": sorted(lora.modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "init_lora_weights": True,
    }


_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_SINGLE_KINDS = ("attn.to_qkv_mlp_proj", "attn.to_out")
_ALL_DOUBLE = _ATTN + (
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)
# What each lora.targets preset adapts (model.lora_target_modules), per double and per single block.
PRESET_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (_ATTN, ()),
    "attention+single": (_ATTN, _SINGLE_KINDS),
    "all-linear": (_ALL_DOUBLE, _SINGLE_KINDS),
}


def describe_targets(names: set[str]) -> str:
    """The lora.targets preset whose modules these are (in the blocks they span), else `custom: <kinds>`."""
    doubles = {int(m.group(1)) for n in names if (m := re.match(r"transformer_blocks\.(\d+)\.", n))}
    singles = {int(m.group(1)) for n in names if (m := re.match(r"single_transformer_blocks\.(\d+)\.", n))}
    for preset, (double_kinds, single_kinds) in PRESET_KINDS.items():
        want = {f"transformer_blocks.{i}.{k}" for i in doubles for k in double_kinds}
        want |= {f"single_transformer_blocks.{i}.{k}" for i in singles for k in single_kinds}
        if names and names == want:
            return preset
    kinds = {re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", n) for n in names}
    return "custom: " + ", ".join(sorted(kinds))


def export_metadata(lora: LoraFile, fmt: str) -> dict[str, str]:
    """The header of an exported file: our fields (base model, family, trigger, rank, alpha, targets, steps,
    format), filled from the source where it has them, plus what each layout's own tools read."""
    md = lora.metadata
    ours = lora.ours()
    rank = _most_common(lora.ranks())
    alpha = _most_common(lora.alphas())
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
        if lora.format == "diffusers" and ADAPTER_METADATA_KEY in md:
            header[ADAPTER_METADATA_KEY] = md[ADAPTER_METADATA_KEY]
        else:
            cfg = adapter_config(lora)
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


def write_lora(lora: LoraFile, path: Path, fmt: str, dtype: torch.dtype | None = None) -> Path:
    """Write `lora` as `fmt` to `path` (atomically)."""
    from safetensors.torch import save_file

    if fmt not in EXPORT_FORMATS:
        raise LoraFileError(f"--format: unknown format {fmt!r} (use {', '.join(EXPORT_FORMATS)})")
    if lora.dora and fmt != "diffusers":
        raise LoraFileError(f"{lora.name} is a DoRA adapter; it can be exported as diffusers or merged, not as {fmt}")
    tensors = convert_tensors(lora, fmt, dtype)
    header = export_metadata(lora, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Which model a LoRA fits
# ---------------------------------------------------------------------------------------------

# make_tiny_pipeline's transformer (tests, the embedded default); dev and klein differ only in guidance_embeds.
TINY_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,
    "timestep_guidance_channels": 32,
    "mlp_ratio": 2.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": True,
}


def known_models() -> dict[str, dict[str, Any]]:
    from .memory import KNOWN_MODELS

    models = {"builtin:tiny-dev / builtin:tiny-klein": dict(TINY_TRANSFORMER)}
    models.update({name: dict(m["transformer"]) for name, m in KNOWN_MODELS.items()})
    return models


@lru_cache(maxsize=16)
def _linear_shapes(config_json: str) -> dict[str, tuple[int, int]]:
    from diffusers import Flux2Transformer2DModel

    config = json.loads(config_json)
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of a Flux2Transformer2DModel with this config (built on the meta device)."""
    clean = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
    return _linear_shapes(json.dumps(clean, sort_keys=True))


def misfits(lora: LoraFile, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Why the LoRA does not fit a model with these linear shapes (empty: it fits)."""
    problems = []
    for name, m in sorted(lora.modules.items()):
        if name not in shapes:
            problems.append(f"the model has no {name}")
        elif shapes[name] != m.shape:
            problems.append(
                f"{name} is {shapes[name][0]}x{shapes[name][1]} in the model, {m.shape[0]}x{m.shape[1]} in the LoRA"
            )
    return problems


def model_config(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / "transformer" / "config.json").read_text()))


def check_family(lora: LoraFile, family: str, field: str) -> None:
    theirs = lora.ours().get("family")
    if theirs and theirs != family:
        raise LoraFileError(
            f"{field}: {lora.name} was trained on FLUX.2 {theirs} (its {METADATA_PREFIX}family), this model is "
            f"FLUX.2 {family}; a LoRA only works on the model family it was trained on"
        )


def check_fits(lora: LoraFile, config: dict[str, Any], model_name: str, field: str) -> None:
    problems = misfits(lora, linear_shapes(config))
    if problems:
        raise LoraFileError(
            f"{field}: {lora.name} does not fit {model_name}: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + "; it was made for another FLUX.2 model"
        )


# ---------------------------------------------------------------------------------------------
# Starting training from a LoRA (train --init-lora)
# ---------------------------------------------------------------------------------------------


def _peft_plan(
    transformer: Any, lora: LoraFile, rank: int, alpha: float | None, targets: str, field: str
) -> list[tuple[str, str, LoraModule]]:
    """(lora_A parameter, lora_B parameter, module) for each LoRA module, after checking targets and rank."""
    params = {n for n, _ in transformer.named_parameters()}
    suffix = ".lora_A.default.weight"
    adapted = {n[: -len(suffix)] for n in params if n.endswith(suffix)}
    outside = sorted(set(lora.modules) - adapted)
    if outside:
        raise LoraFileError(
            f"{field}: {lora.name} has weights for {len(outside)} modules that lora.targets={targets} does not train "
            f"(e.g. {outside[0]}); choose targets that cover them (its modules are: {describe_targets(set(lora.modules))})"
        )
    have = sorted(set(lora.ranks()))
    if len(have) > 1:
        raise LoraFileError(f"{field}: {lora.name} mixes ranks {have}; only a LoRA with one rank can seed training")
    if have and have[0] != rank:
        raise LoraFileError(
            f"{field}: {lora.name} has rank {have[0]}, the recipe's lora.rank is {rank}; "
            f"set --rank {have[0]} (lora.rank) to continue from it"
        )
    return [(f"{n}.lora_A.default.weight", f"{n}.lora_B.default.weight", m) for n, m in sorted(lora.modules.items())]


def check_init_lora(spec: str, src: Any, rank: int, alpha: float | None, targets: str) -> LoraFile:
    """Read `lora.init_from` and check it against the model and the recipe before anything expensive runs:
    family, module shapes (from the transformer's config, on the meta device) and the recipe's targets and rank."""
    from .model import add_lora

    field = "lora.init_from"
    lora = load_lora(spec, field)
    if lora.dora:
        raise LoraFileError(f"{field}: {lora.name} is a DoRA adapter; only a plain LoRA can seed training")
    check_family(lora, src.family, field)
    config = model_config(src.path)
    check_fits(lora, config, src.name, field)
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        meta = Flux2Transformer2DModel.from_config(config)
    add_lora(meta, rank, alpha, 0.0, targets, "default", False)
    _peft_plan(meta, lora, rank, alpha, targets, field)
    return lora


@torch.no_grad()
def apply_init_lora(transformer: Any, lora: LoraFile, rank: int, alpha: float | None, targets: str) -> str:
    """Copy the LoRA into the transformer's PEFT adapter so that its update is the file's, exactly.

    PEFT's update is (alpha_recipe / rank) * B @ A; B is rescaled by the ratio of the file's scale to the recipe's.
    Adapted modules the file does not have keep their fresh init (B = 0: no change). Returns a summary line."""
    field = "lora.init_from"
    plan = _peft_plan(transformer, lora, rank, alpha, targets, field)
    params = dict(transformer.named_parameters())
    ours = (alpha if alpha is not None else rank) / rank
    for a_name, b_name, m in plan:
        a, b = params[a_name], params[b_name]
        if tuple(a.shape) != tuple(m.down.shape) or tuple(b.shape) != tuple(m.up.shape):
            raise LoraFileError(
                f"{field}: {lora.name}: {a_name.removesuffix('.lora_A.default.weight')} has factors "
                f"{tuple(m.down.shape)}/{tuple(m.up.shape)}, the model needs {tuple(a.shape)}/{tuple(b.shape)}"
            )
        a.copy_(m.down.to(a.dtype))
        b.copy_((m.up.double() * (m.scale / ours)).to(b.dtype))
    total = sum(1 for n in params if n.endswith(".lora_A.default.weight"))
    return f"lora  started from {lora.name} ({lora.format}): {len(plan)} of {total} adapted modules loaded" + (
        f", {total - len(plan)} start at zero" if total > len(plan) else ""
    )


# ---------------------------------------------------------------------------------------------
# Merge (export --merge)
# ---------------------------------------------------------------------------------------------

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
    from .config import ModelArgs
    from .model import DTYPES, resolve_model

    lora = load_lora(lora_spec)
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


# ---------------------------------------------------------------------------------------------
# Inspect
# ---------------------------------------------------------------------------------------------


def inspect_lora(spec: str, model: str | None = None) -> dict[str, Any]:
    """What `lora inspect` reports, as a dict."""
    lora = load_lora(spec, "FILE")
    ranks, alphas = lora.ranks(), lora.alphas()
    fits: list[str] = []
    why_not: dict[str, str] = {}
    candidates = known_models()
    if model is not None:
        from .config import ModelArgs
        from .model import resolve_model

        src = resolve_model(ModelArgs(name_or_path=model))
        candidates = {src.name: model_config(src.path)}
    for name, config in candidates.items():
        problems = misfits(lora, linear_shapes(config))
        if problems:
            why_not[name] = problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        else:
            fits.append(name)
    return {
        "file": str(lora.path),
        "format": lora.format,
        "fused_qkv": lora.fused_qkv,
        "dora": lora.dora,
        "modules": len(lora.modules),
        "rank": sorted(ranks) if len(ranks) > 1 else _most_common(ranks),
        "alpha": sorted(alphas) if len(alphas) > 1 else _most_common(alphas),
        "targets": describe_targets(set(lora.modules)),
        "parameters": lora.num_params,
        "dtype": str(lora.dtype).removeprefix("torch."),
        "fits": fits,
        "does_not_fit": why_not,
        "metadata": {k: v for k, v in lora.metadata.items() if k != ADAPTER_METADATA_KEY},
    }


def format_inspect(info: dict[str, Any]) -> str:
    fmt = info["format"] + (" (fused qkv)" if info["fused_qkv"] else "") + (", DoRA" if info["dora"] else "")
    lines = [
        f"file        {info['file']}",
        f"format      {fmt}",
        f"rank        {info['rank']}",
        f"alpha       {info['alpha']}",
        f"targets     {info['targets']} ({info['modules']} modules)",
        f"parameters  {info['parameters']:,} ({info['dtype']})",
        "fits        " + (", ".join(info["fits"]) if info["fits"] else "none of the models checked"),
    ]
    for name, why in info["does_not_fit"].items():
        lines.append(f"  not {name}: {why}")
    meta = info["metadata"]
    if meta:
        lines.append("metadata")
        for k in sorted(meta):
            v = meta[k]
            lines.append(f"  {k}: {v if len(v) <= 200 else v[:200] + '...'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_export(argv: list[str]) -> int:
    """`export --lora L --format F --output OUT` or `export --merge --lora L --model M --output DIR [--scale S]`."""
    from .cli import CliError, _parse, command_parser

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
    from .cli import CliError, _parse, command_parser

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
