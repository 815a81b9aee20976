"""LoKr and LoHa files (`lora.type: lokr | loha`): reading their factors into the in-memory form, and the update
each module applies as diffusers, PEFT and ComfyUI compute it.

Training writes PEFT's own names under diffusers' prefix (checkpoint.save_lora): `transformer.<module>.lokr_w1`,
`.lokr_w2` (or `.lokr_w2_a` @ `.lokr_w2_b` when the rank is small against the factor), and for LoHa `.hada_w1_a`,
`.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, with alpha / r multiplied into the first factor (lokr_w1, hada_w1_a) and
the header's LoKrConfig/LoHaConfig saying alpha = r, and no `.alpha` tensors. So every reader applies the same
update:
  - diffusers 0.42 `Flux2Pipeline.load_lora_weights` reads LoKr (`transformer.` keys, the header's LoKrConfig) but
    refuses LoHa ("We currently support LoRA and LoKr");
  - ComfyUI's loader (comfy/lora.py `load_lora`, comfy/weight_adapter/lokr.py and loha.py, read, not run here)
    takes `<key>.lokr_*` / `<key>.hada_*` for every key it maps, `transformer.<diffusers name>` among them for FLUX
    models, and with no `.alpha` applies scale 1: update = kron(w1, w2), or (w1_a @ w1_b) * (w2_a @ w2_b);
  - PEFT (LoKrConfig/LoHaConfig with alpha = r) applies the same.

Files of other trainers are read too: LyCORIS names (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`, SimpleTuner),
`diffusion_model.` with diffusers or BFL names (ai-toolkit), bare names; their `.alpha` tensors scale as LyCORIS
does (LoKr: alpha / rank only where a factor is rank-decomposed; LoHa: alpha / rank). A LoKr of BFL's fused qkv
cannot be split into diffusers' q, k, v (a Kronecker product over the fused weight is not three), and is refused.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..safety import LoraFileError

KINDS = {"lokr": "LoKr", "loha": "LoHa"}
_SUFFIXES = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
}
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.")
_LYCORIS = re.compile(r"^lycoris_((?:single_)?transformer_blocks)_(\d+)_(.+)$")


def lycoris_kind(keys: list[str]) -> str | None:
    """`lokr` or `loha` when the file's keys are LoKr or LoHa factors, else None."""
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(".hada_" in k for k in keys):
        return "loha"
    return None


@dataclass
class LycorisModule:
    """One adapted linear layer of a LoKr or LoHa: its factors by suffix (`lokr_w1`, `hada_w1_a`, ...), the rank
    (PEFT's r; for a LoKr whose factors are all full matrices, the config's r or the larger side of w2) and the scale
    the readers apply (update = scale * kron(w1, w2), or scale * (w1_a @ w1_b) * (w2_a @ w2_b))."""

    kind: str
    factors: dict[str, torch.Tensor]
    rank: int
    scale: float

    @property
    def alpha(self) -> float:
        return self.scale * self.rank

    def _pair(self, name: str) -> torch.Tensor:
        f = self.factors
        if name in f:
            return f[name].double()
        return f[f"{name}_a"].double() @ f[f"{name}_b"].double()

    def delta(self) -> torch.Tensor:
        """The update of the layer's weight, (out, in), in float64."""
        if self.kind == "lokr":
            return self.scale * torch.kron(self._pair("lokr_w1"), self._pair("lokr_w2"))
        return self.scale * self._pair("hada_w1") * self._pair("hada_w2")

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer it adapts."""
        f = self.factors
        if self.kind == "loha":
            return int(f["hada_w1_a"].shape[0]), int(f["hada_w1_b"].shape[1])
        sides = []
        for w in ("lokr_w1", "lokr_w2"):
            a, b = (f[w], f[w]) if w in f else (f[f"{w}_a"], f[f"{w}_b"])
            sides.append((int(a.shape[0]), int(b.shape[1])))
        return sides[0][0] * sides[1][0], sides[0][1] * sides[1][1]


def _module_name(stem: str, field: str, name: str) -> str:
    """The diffusers module name of a key stem in any of the layouts read (see the module docstring)."""
    from .layouts import _DOUBLE, _GLOBAL, _SINGLE, from_bfl

    m = _LYCORIS.match(stem)
    if m is not None:
        kind, idx, rest = m.groups()
        table = _DOUBLE if kind == "transformer_blocks" else _SINGLE
        sub = {k.replace(".", "_"): k for k in table}.get(rest)
        if sub is None:
            raise LoraFileError(f"{field}: {name}: no FLUX.2 transformer module is known for {stem}")
        return f"{kind}.{idx}.{sub}"
    if stem.startswith("lycoris_"):
        flat = {k.replace(".", "_"): k for k in _GLOBAL}.get(stem.removeprefix("lycoris_"))
        if flat is None:
            raise LoraFileError(f"{field}: {name}: no FLUX.2 transformer module is known for {stem}")
        return flat
    for p in _PREFIXES:
        stem = stem.removeprefix(p)
    targets = from_bfl(stem)
    if targets is None:
        raise LoraFileError(f"{field}: {name}: no FLUX.2 transformer module is known for {stem}")
    if len(targets) > 1:
        raise LoraFileError(
            f"{field}: {name}: {stem} factors BFL's fused qkv, which cannot be split into diffusers' q, k and v "
            "(load this file with diffusers' load_lora_weights, which fuses the model's qkv for it)"
        )
    return targets[0]


def _config_scale(config: dict[str, Any], module: str, name: str, field: str) -> tuple[int, float] | None:
    """(r, alpha / r) for `module` from a PEFT LoKrConfig/LoHaConfig in the header, or None without one."""
    from .layouts import ADAPTER_METADATA_KEY, _alpha_number, _pattern_value

    if str(config.get("peft_type", "")).upper() not in ("LOKR", "LOHA") or not config.get("r"):
        return None
    r = int(_pattern_value(config.get("rank_pattern"), module) or config["r"])
    a = _pattern_value(config.get("alpha_pattern"), module)
    alpha = _alpha_number(a if a is not None else config.get("alpha", r), f"{ADAPTER_METADATA_KEY} alpha", name, field)
    return r, alpha / r


def _fits_together(f: dict[str, torch.Tensor]) -> bool:
    """The factors multiply: each a @ b pair shares its inner size, and LoHa's two products have one shape."""
    for w in ("lokr_w1", "lokr_w2", "hada_w1", "hada_w2"):
        if f"{w}_a" in f and f[f"{w}_a"].shape[1] != f[f"{w}_b"].shape[0]:
            return False
    if "hada_w1_a" in f:
        return (f["hada_w1_a"].shape[0], f["hada_w1_b"].shape[1]) == (f["hada_w2_a"].shape[0], f["hada_w2_b"].shape[1])
    return True


def parse_lycoris(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path | None, field: str
) -> dict[str, LycorisModule]:
    """The LoKr or LoHa modules of a file (its tensors already checked finite), by diffusers module name."""
    from .layouts import _adapter_config, _alpha_number

    name = str(path) if path else "the LoRA"
    kind = lycoris_kind(list(tensors))
    assert kind is not None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        stem, _, suffix = k.rpartition(".")
        if suffix == "alpha":
            alphas[stem] = t
        elif suffix in _SUFFIXES[kind]:
            parts.setdefault(stem, {})[suffix] = t
        else:
            raise LoraFileError(
                f"{field}: {name} holds {KINDS[kind]} factors and {k}, which is not one (one adapter type per file)"
            )
    config = _adapter_config(metadata)
    modules: dict[str, LycorisModule] = {}
    for stem, f in sorted(parts.items()):
        if {"lokr_t2", "hada_t1", "hada_t2"} & set(f):
            raise LoraFileError(
                f"{field}: {name}: {stem} has Tucker factors (a convolution {KINDS[kind]}); FLUX.2's transformer "
                "adapts linear layers only"
            )
        need = ["lokr_w1", "lokr_w2"] if kind == "lokr" else ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        for w in need:
            if w not in f and not (f"{w}_a" in f and f"{w}_b" in f):
                raise LoraFileError(f"{field}: {name}: {stem} has no {w} factor")
        if any(t.ndim != 2 for t in f.values()) or not _fits_together(f):
            raise LoraFileError(
                f"{field}: {name}: {stem} has factors of shapes "
                + ", ".join(f"{k} {tuple(t.shape)}" for k, t in sorted(f.items()))
                + f", which are not a linear {KINDS[kind]}"
            )
        module = _module_name(stem, field, name)
        # LyCORIS' rank: the decomposed factor's (LoKr: w2's, else w1's; none when both are full); LoHa: w1_b's.
        dim = next((int(f[k].shape[0]) for k in ("lokr_w2_b", "lokr_w1_b", "hada_w1_b") if k in f), None)
        peft = _config_scale(config, module, name, field)
        if stem in alphas:  # LyCORIS: alpha / rank, and for a LoKr of full factors no scaling at all
            alpha = _alpha_number(alphas[stem].float().item(), f"tensor {stem}.alpha", name, field)
            rank, scale = dim or max(f["lokr_w2"].shape), (alpha / dim if dim else 1.0)
        elif peft is not None:  # PEFT's config (ours): alpha / r everywhere
            rank, scale = peft
        else:  # no alpha anywhere: scale 1 (ComfyUI; diffusers sets alpha = r)
            rank, scale = dim or max(f["lokr_w2"].shape), 1.0
        modules[module] = LycorisModule(kind, f, int(rank), scale)
    return modules


def peft_config(kind: str, modules: dict[str, LycorisModule]) -> Any:
    """A PEFT LoKrConfig/LoHaConfig under which PEFT builds these modules' factors with these shapes, at scale 1
    (the caller multiplies each module's scale into its first factor, see `baked`).

    LoHa's shapes follow from r alone. LoKr's also depend on PEFT's factorization of each side; the default
    (decompose_factor -1, w1 full) is what training uses; a file whose shapes it does not reproduce is refused."""
    from peft import LoHaConfig, LoKrConfig

    rank_count = Counter(m.rank for m in modules.values())
    r = rank_count.most_common(1)[0][0]
    pattern = {re.escape(n): m.rank for n, m in modules.items() if m.rank != r}
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    return cls(r=r, alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(modules))


def baked(modules: dict[str, LycorisModule]) -> dict[str, torch.Tensor]:
    """PEFT state-dict names (`<module>.lokr_w1`, ...) to factors, each module's scale multiplied into its first."""
    out: dict[str, torch.Tensor] = {}
    for n, m in sorted(modules.items()):
        first = next(k for k in ("lokr_w1", "lokr_w1_a", "hada_w1_a") if k in m.factors)
        for k, t in m.factors.items():
            out[f"{n}.{k}"] = (t.double() * m.scale).to(t.dtype) if (k == first and m.scale != 1.0) else t
    return out


@torch.no_grad()
def load_into(transformer: Any, modules: dict[str, LycorisModule], adapter_name: str, name: str) -> None:
    """Add these LoKr/LoHa modules to a diffusers FLUX.2 transformer as a PEFT adapter (diffusers' own
    load_lora_weights reads no LoHa), with exactly the file's updates. Then `fuse_lora`, `set_adapters`,
    `delete_adapters` work on it as on a LoRA loaded by diffusers."""
    from peft import set_peft_model_state_dict

    kind = next(iter(modules.values())).kind
    transformer.add_adapter(peft_config(kind, modules), adapter_name=adapter_name)
    params = dict(transformer.named_parameters())
    for n, m in sorted(modules.items()):
        for k, t in m.factors.items():
            mine = params.get(f"{n}.{k}.{adapter_name}")
            if mine is None or tuple(mine.shape) != tuple(t.shape):
                transformer.delete_adapters(adapter_name)
                raise LoraFileError(
                    f"--lora: {name}: {n}.{k} has shape {tuple(t.shape)}, PEFT builds "
                    f"{'no such factor' if mine is None else tuple(mine.shape)} for it: a {KINDS[kind]} factorized "
                    "another way (another decompose_factor) than PEFT's default, which this command loads"
                )
    set_peft_model_state_dict(transformer, baked(modules), adapter_name=adapter_name)
