"""LoRA files for the interop tests: random, non-zero factors (so a wrong conversion changes the image)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


def make_random_lora(
    model_dir: Path,
    out: Path,
    rank: int = 4,
    alpha: float = 6.0,
    targets: str = "all-linear",
    seed: int = 0,
    family: str = "dev",
    std_a: float = 0.2,
    std_b: float = 0.1,
) -> Path:
    """A diffusers-format LoRA on the tiny model with random A and B, written as training writes it (save_lora)."""
    from flux2_lora.checkpoint import save_lora
    from flux2_lora.config import ModelArgs
    from flux2_lora.model import add_lora, load_transformer, pipeline_class, resolve_model

    src = resolve_model(ModelArgs(name_or_path=str(model_dir)))
    transformer = load_transformer(src, torch.float32)
    config = add_lora(transformer, rank, alpha, 0.0, targets, "gaussian", False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std_a)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std_b)
    metadata = {
        "base_model": str(model_dir),
        "family": family,
        "trigger": "sks",
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "steps": 7,
        "resolution": 64,
    }
    return save_lora(out, transformer, pipeline_class(src), config, metadata)


class _Touch:
    """Unpickling this creates a marker file: proof of whether anything was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def malicious_pickle(marker: Path) -> bytes:
    """Pickle bytes whose loading runs code (touches `marker`)."""
    return pickle.dumps({"lora_unet_x.lora_down.weight": _Touch(marker)})
