"""The layouts: one in-memory form (`LoraFile`), the names of each layout, reading any of them, writing ours.

Every LoRA is read into a dict from diffusers module names (`transformer_blocks.0.attn.to_q`) to a `LoraModule`
(down = A of shape (r, in), up = B of shape (out, r), alpha; the update is alpha / r * B @ A).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import METADATA_PREFIX
from ..safety import LoraFileError, resolve_lora_path
from .lycoris import KINDS, LycorisModule, lycoris_kind, parse_lycoris

FORMATS = ("diffusers", "peft", "comfyui", "ai-toolkit", "kohya", "lycoris")
TYPE_NAMES = {"lora": "LoRA", "dora": "DoRA", **KINDS}  # LoraFile.kind -> its name
EXPORT_FORMATS = ("diffusers", "comfyui", "kohya")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the LoraConfig


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
    kind: str = "lora"  # the adapter: lora, dora, lokr or loha (lycoris.py)
    lycoris: dict[str, LycorisModule] = field(default_factory=dict)  # a LoKr's or LoHa's modules (then `modules` is {})

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "the LoRA"

    def ours(self) -> dict[str, str]:
        """Our `flux2_lora.*` header fields, without the prefix."""
        return {k[len(METADATA_PREFIX) :]: v for k, v in self.metadata.items() if k.startswith(METADATA_PREFIX)}

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.kind]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each adapted module, by diffusers module name (any adapter type)."""
        return {n: m.shape for n, m in (self.lycoris or self.modules).items()}

    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in (self.lycoris or self.modules).values())

    def alphas(self) -> Counter[float]:
        return Counter(m.alpha for m in (self.lycoris or self.modules).values())


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
    if any(k.startswith("lycoris_") for k in keys):
        return "lycoris"
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
    if lycoris_kind(keys) and any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in keys):
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


def _pattern_value(patterns: Any, name: str) -> Any:
    if not isinstance(patterns, dict):
        return None
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            raise LoraFileError(f"{ADAPTER_METADATA_KEY}: alpha_pattern key {key!r} is not a valid pattern") from None
    return None


def _non_finite(t: torch.Tensor) -> int:
    """How many values of a floating tensor are NaN or inf (0 for integer tensors)."""
    if not t.is_floating_point():
        return 0
    try:
        ok = torch.isfinite(t)
    except (RuntimeError, TypeError):  # dtypes without a CPU isfinite kernel (float8): check in fp32
        ok = torch.isfinite(t.float())
    return 0 if bool(ok.all()) else int((~ok).sum())


def check_finite(tensors: Mapping[str, torch.Tensor], name: str, field: str = "--lora") -> None:
    """Refuse a LoRA holding NaN or inf: it would break every image it touches (and every run started from it)."""
    for k, t in tensors.items():
        n = _non_finite(t)
        if n:
            raise LoraFileError(
                f"{field}: {name}: tensor {k} has {n} non-finite values (NaN/inf); "
                "this LoRA is broken, use an earlier checkpoint"
            )


def _alpha_number(value: Any, where: str, name: str, field: str) -> float:
    if isinstance(value, bool):
        value = str(value)
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise LoraFileError(f"{field}: {name}: {where} is not a number (got {value!r})") from None
    if not math.isfinite(alpha):
        raise LoraFileError(f"{field}: {name}: {where} is {value}, not a finite number; this LoRA is broken")
    return alpha


def check_alpha_metadata(metadata: Mapping[str, str], name: str, field: str = "--lora") -> None:
    """Refuse a header whose alpha (the LoraConfig's lora_alpha and alpha_pattern, ours, kohya's) is NaN or inf,
    or, in the LoraConfig that loaders compute the scale from, not a number at all."""
    for key in (f"{METADATA_PREFIX}alpha", "ss_network_alpha"):
        value = metadata.get(key)
        if value is None:
            continue
        try:
            number = float(value)
        except ValueError:
            continue  # a descriptive field ("null" when the recipe left alpha to the rank): not used for the scale
        if not math.isfinite(number):
            raise LoraFileError(f"{field}: {name}: metadata {key} is {value}, not a finite number; this LoRA is broken")
    config = _adapter_config(dict(metadata))
    if "lora_alpha" in config and config["lora_alpha"] is not None:
        _alpha_number(config["lora_alpha"], f"{ADAPTER_METADATA_KEY} lora_alpha", name, field)
    patterns = config.get("alpha_pattern") or {}
    if isinstance(patterns, dict):
        for k, v in patterns.items():
            _alpha_number(v, f"{ADAPTER_METADATA_KEY} alpha_pattern[{k}]", name, field)


def scan_lora_file(
    path: Path, field: str = "--lora", keep: bool = True
) -> tuple[dict[str, str], dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """The one reader of LoRA files: header, tensors and shapes of a safetensors file (checked beforehand to be
    one, never unpickled), each tensor refused as it is read if it holds NaN or inf, and the header's alphas
    checked. keep=False drops each tensor once checked (the caller wants the header and shapes only)."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():  # noqa: SIM118 - safe_open has no items()
                t = f.get_tensor(k)
                check_finite({k: t}, str(path), field)
                shapes[k] = tuple(t.shape)
                if keep:
                    tensors[k] = t
    except LoraFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file of any kind: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoraFileError(f"{field}: {path} cannot be read as safetensors ({first})") from None
    check_alpha_metadata(metadata, str(path), field)
    return metadata, tensors, shapes


def load_lora(spec: str | Path, field: str = "--lora") -> LoraFile:
    """Read a LoRA file in any of FORMATS (a run or checkpoint folder means its lora.safetensors)."""
    path = resolve_lora_path(spec, field)
    metadata, tensors, _ = scan_lora_file(path, field)
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
            f"comfyui/ai-toolkit diffusion_model.*, kohya lora_unet_*, lycoris_*); first key: {first}"
        )
    kind = lycoris_kind(keys)
    if kind is not None:  # LoKr / LoHa factors (lycoris.py)
        check_finite(tensors, name, field)
        check_alpha_metadata(metadata, name, field)
        stored = [t for k, t in tensors.items() if not k.endswith(".alpha")]
        return LoraFile(
            format=fmt,
            modules={},
            metadata=metadata,
            path=path,
            num_params=sum(t.numel() for t in stored),
            dtype=Counter(t.dtype for t in stored).most_common(1)[0][0] if stored else torch.float32,
            kind=kind,
            lycoris=parse_lycoris(tensors, metadata, path, field),
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
    check_finite(tensors, name, field)
    check_alpha_metadata(metadata, name, field)
    config = _adapter_config(metadata)
    rslora = bool(config.get("use_rslora"))
    modules: dict[str, LoraModule] = {}
    fused = False
    for stem, p in sorted(parts.items()):
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0] or down.shape[0] == 0:
            raise LoraFileError(
                f"{field}: {name}: {stem} has factors of shapes {tuple(down.shape)} and {tuple(up.shape)}, "
                "not a linear LoRA (down: rank x in, up: out x rank, rank at least 1)"
            )
        rank = int(down.shape[0])
        if "alpha" in p:
            if p["alpha"].numel() != 1:
                raise LoraFileError(f"{field}: {name}: {stem}.alpha has {p['alpha'].numel()} values, not one")
            alpha = _alpha_number(p["alpha"].float().item(), f"tensor {stem}.alpha", name, field)
        elif config:
            a = _pattern_value(config.get("alpha_pattern", {}), stem)
            if a is None:
                a = config.get("lora_alpha")
            alpha = _alpha_number(a if a is not None else rank, f"{ADAPTER_METADATA_KEY} alpha", name, field)
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
        kind="dora" if dora else "lora",
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


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def most_common(counter: Counter[Any]) -> Any:
    return counter.most_common(1)[0][0] if counter else 0


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
