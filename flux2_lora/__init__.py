"""flux2-lora: a LoRA trainer for the FLUX.2 image models (FLUX.2-dev and FLUX.2 klein)."""

__version__ = "0.1.0"
