"""Which model a LoRA fits (module shapes), starting training from a LoRA (train --init-lora), and `lora inspect`."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import METADATA_PREFIX
from ..safety import LoraFileError
from .layouts import ADAPTER_METADATA_KEY, TYPE_NAMES, LoraFile, LoraModule, describe_targets, load_lora, most_common

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
    from ..memory import KNOWN_MODELS

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
    for name, shape in sorted(lora.shapes().items()):
        if name not in shapes:
            problems.append(f"the model has no {name}")
        elif shapes[name] != shape:
            problems.append(
                f"{name} is {shapes[name][0]}x{shapes[name][1]} in the model, {shape[0]}x{shape[1]} in the LoRA"
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
    from ..model import add_lora

    field = "lora.init_from"
    lora = load_lora(spec, field)
    if lora.kind != "lora":
        raise LoraFileError(f"{field}: {lora.name} is a {lora.type_name} adapter; only a plain LoRA can seed training")
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
        from ..config import ModelArgs
        from ..model import resolve_model

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
        "type": lora.kind,
        "modules": len(lora.shapes()),
        "rank": sorted(ranks) if len(ranks) > 1 else most_common(ranks),
        "alpha": sorted(alphas) if len(alphas) > 1 else most_common(alphas),
        "targets": describe_targets(set(lora.shapes())),
        "parameters": lora.num_params,
        "dtype": str(lora.dtype).removeprefix("torch."),
        "fits": fits,
        "does_not_fit": why_not,
        "metadata": {k: v for k, v in lora.metadata.items() if k != ADAPTER_METADATA_KEY},
    }


def format_inspect(info: dict[str, Any]) -> str:
    fmt = info["format"] + (" (fused qkv)" if info["fused_qkv"] else "")
    kind = info.get("type", "dora" if info["dora"] else "lora")
    lines = [
        f"file        {info['file']}",
        f"type        {TYPE_NAMES[kind]}",
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
