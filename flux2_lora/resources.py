"""Files the package reads at run time: the recipes (presets, the tune search space) and the launch templates
(Slurm batch scripts, example manifests).

In the source tree they are the top-level `recipes/` and `launch/` folders. A wheel or `pip install .` carries
them inside the package as `flux2_lora/_files/recipes` and `flux2_lora/_files/launch` (pyproject.toml maps the
folders in at build time), so an installed package never depends on a checkout being around.

Also the names of what a run writes that readers elsewhere look for.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

LORA_FILE = "lora.safetensors"  # a run's (and a checkpoint's) LoRA, in diffusers format
LORA_EMA_FILE = "lora_ema.safetensors"  # beside it with training.ema_decay: the EMA of its weights, same format
METADATA_PREFIX = "flux2_lora."  # our keys in a LoRA file's safetensors header


def resource_dir(name: str) -> Path:
    """`recipes` or `launch`: the copy inside the installed package, else the checkout's top-level folder."""
    bundled = _PACKAGE / "_files" / name
    return bundled if bundled.is_dir() else _PACKAGE.parent / name


def recipes_dir() -> Path:
    """The presets' folder (`FLUX2_LORA_RECIPES` overrides it)."""
    return Path(os.environ.get("FLUX2_LORA_RECIPES") or resource_dir("recipes"))


def launch_dir() -> Path:
    """The launch templates: `slurm/*.sbatch` and the example `manifests/*.yaml`."""
    return resource_dir("launch")
