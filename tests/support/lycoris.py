"""LoKr and LoHa adapters for the tests: PEFT's, on the tiny transformer, with random non-zero factors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def random_adapter(
    model_dir: Path, kind: str, rank: int = 4, alpha: float = 6.0, targets: str = "attention+single", seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """The tiny transformer with a `kind` adapter (lokr, loha) whose factors are all random (so every module's update
    is non-zero), and its PEFT config as add_lora returns it."""
    from flux2_lora.config import ModelArgs
    from flux2_lora.model import add_lora, load_transformer, resolve_model

    transformer = load_transformer(resolve_model(ModelArgs(name_or_path=str(model_dir))), torch.float32)
    config = add_lora(transformer, rank, alpha, 0.0, targets, "gaussian", kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in transformer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return transformer, config


def save_adapter(transformer: Any, config: dict[str, Any], model_dir: Path, out: Path) -> Path:
    """The adapter written as training writes it (checkpoint.save_lora)."""
    from flux2_lora.checkpoint import save_lora
    from flux2_lora.config import ModelArgs
    from flux2_lora.model import pipeline_class, resolve_model

    src = resolve_model(ModelArgs(name_or_path=str(model_dir)))
    kind = "lokr" if config["peft_type"] == "LOKR" else "loha"
    metadata = {"base_model": str(model_dir), "family": "dev", "type": kind, "rank": config["r"], "steps": 3}
    return save_lora(out, transformer, pipeline_class(src), config, metadata)


def peft_deltas(transformer: Any) -> dict[str, torch.Tensor]:
    """Each adapted module's weight update as PEFT computes it (get_delta_weight), by module name."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: m.get_delta_weight("default").detach().double()
        for name, m in transformer.named_modules()
        if isinstance(m, BaseTunerLayer)
    }
