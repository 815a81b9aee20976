"""Evaluation: compare checkpoints, score quality, run prompt suites, pick the best checkpoint.

clip.py      open_clip models from a local .safetensors file or the hub cache (never a pickle)
metrics.py   CLIP score, diversity, overfitting (nearest training image), the composite ranking score
generate.py  the base model once, each LoRA loaded through diffusers' `load_lora_weights`; fixed seeds
suite.py     the built-in prompt templates and user YAML suites
report.py    labelled grids, HTML pages, tables and markdown
runs.py      compare, assess-quality, test-prompts, select-best: each writes its folder and returns its result
             (`flux2-lora eval ...` is flux2_lora/commands/eval.py; docs/eval.md)
callback.py  the same metrics at every validation of a training run
"""

from __future__ import annotations

from ..errors import EvalError

__all__ = ["EvalError"]
