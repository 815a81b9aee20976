"""`flux2-lora system info | gpu | presets | optimize`."""

from __future__ import annotations

import json
import sys
import time

from ..errors import UsageError
from .args import DraftRecipe, Switch

HELP_HINT = "`flux2-lora system --help`"

SYSTEM_USAGE = """usage: flux2-lora system SUBCOMMAND [ARGS]

  info [--json]                     versions (flux2-lora, Python, torch with its CUDA/cuDNN, libraries), optional
                                    libraries and what each enables, CUDA, GPUs (memory, compute capability,
                                    bf16/fp8), CPU cores and RAM
  gpu [--watch SECONDS] [--json]    live memory per GPU (used/free/total, nvidia-smi utilisation); --watch refreshes
                                    until Ctrl-C. Without a CUDA GPU: one line saying so, exit 0
  presets [--json]                  the presets (--preset NAME) with their key values
  optimize --preset P|--config C [--gpu-memory GiB] [recipe flags]
                                    GPU memory the recipe needs, part by part, and what to change so it fits"""


def info(*, json_: Switch = False) -> None:
    """Versions, optional libraries, CUDA, GPUs, CPU and RAM.

    Args:
        json_: Print one JSON object instead of text.
    """
    from ..system import format_info, system_info

    data = system_info()
    print(json.dumps(data, indent=2) if json_ else format_info(data))


def gpu(*, json_: Switch = False, watch: float | None = None) -> None:
    """Live memory (and utilisation) per GPU.

    No visible CUDA GPU is information, not an error: one line (or JSON with an empty list), exit code 0.

    Args:
        json_: Print one JSON object instead of text.
        watch: Refresh every SECONDS until Ctrl-C.
    """
    from ..system import format_gpus, gpu_snapshot, no_gpu_line

    if watch is not None and not watch > 0:
        raise UsageError(f"--watch: must be a number of seconds > 0 (got {watch})")
    try:
        while True:
            rows = gpu_snapshot()
            if json_:
                print(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cuda_available": bool(rows),
                                  "gpus": rows}), flush=True)  # fmt: skip
            elif not rows:
                print(no_gpu_line(), flush=True)
            else:
                if watch is not None and sys.stdout.isatty():
                    print("\033[H\033[J", end="")  # clear the screen between refreshes
                stamp = f"{time.strftime('%H:%M:%S')}  (every {watch:g} s, Ctrl-C to stop)\n" if watch else ""
                print(stamp + format_gpus(rows), flush=True)
            if watch is None or not rows:
                return
            time.sleep(watch)
    except KeyboardInterrupt:  # the way to end --watch: quiet, exit 0
        return


def presets(*, json_: Switch = False) -> None:
    """The presets with their key values.

    Args:
        json_: Print one JSON object instead of text.
    """
    from ..system import format_presets, preset_rows

    rows = preset_rows()
    print(json.dumps(rows, indent=2) if json_ else format_presets(rows))


def optimize(recipe: DraftRecipe, *, gpu_memory: float | None = None) -> None:
    """GPU memory a recipe needs, part by part, and what to change so it fits. Every other flag is a recipe flag,
    as for `train` (--preset, --config, dotted fields).

    Args:
        gpu_memory: GPU memory to plan for, in GiB (default: the first visible GPU's).
    """
    from ..system import gpu_memory_gib, report

    print(report(recipe, gpu_memory if gpu_memory is not None else gpu_memory_gib()))
