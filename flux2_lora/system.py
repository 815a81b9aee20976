"""`flux2-lora system optimize`: what a recipe needs in GPU memory, part by part, and what to change so it fits.

    flux2-lora system optimize --preset character --model black-forest-labs/FLUX.2-dev [--gpu-memory 24]

The numbers come from `memory.estimate` (the real model config on the meta device, one simulated step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .memory import Estimate, GiB, ModelShape, Setup, estimate, model_shape

# (name, GiB that torch reports as total memory)
COMMON_GPUS = [("24 GB (RTX 4090)", 23.6), ("32 GB (RTX 5090)", 31.4), ("48 GB (L40S, A6000)", 44.4),
               ("80 GB (A100, H100)", 79.1), ("141 GB (H200)", 139.8)]  # fmt: skip


def gpu_memory_gib() -> float | None:
    """Memory of the first visible GPU in GiB, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GiB


def needed(est: Estimate) -> float:
    return (est.total + est.reserve) / GiB


def recommendations(shape: ModelShape, setup: Setup, gpu_gib: float) -> list[tuple[str, Estimate]]:
    """Changes that lower the peak, in the order to try them, each applied on top of the ones before."""
    steps: list[tuple[str, Setup]] = []
    s = setup
    if not s.gradient_checkpointing or s.checkpoint_every > 1:
        s = dataclasses.replace(s, gradient_checkpointing=True, checkpoint_every=1)
        steps.append(("model.gradient_checkpointing: true, gradient_checkpointing_every: 1", s))
    if s.optimizer == "adamw":
        s = dataclasses.replace(s, optimizer="adamw8bit")
        steps.append(("training.optimizer: adamw8bit (bitsandbytes)", s))
    if s.rank > 32:
        s = dataclasses.replace(s, rank=32)
        steps.append(("lora.rank: 32 (the LoRA, its gradients and AdamW state shrink with the rank)", s))
    if s.batch_size > 1:
        s = dataclasses.replace(s, batch_size=1)
        steps.append((f"training.batch_size: 1 with training.gradient_accumulation: {setup.batch_size}", s))
    # Then the frozen base: int8 weights (torchao; fp8 on Ada/Hopper is the same size), then swapping blocks
    # to host memory (costs time, not accuracy), the fewest that fit; the resolution last.
    if s.quantize == "none":
        s = dataclasses.replace(s, quantize="int8")
        steps.append(("model.quantize: int8 (torchao; fp8 on compute capability >= 8.9 is the same size)", s))
    total = int(shape.transformer.get("num_layers", 0)) + int(shape.transformer.get("num_single_layers", 0))
    if s.quantize != "nf4" and s.blocks_to_swap < total - 2 and needed(estimate(shape, s)) > gpu_gib:
        for n in [*range(8, total - 2, 8), total - 2]:
            if n > s.blocks_to_swap:
                swapped = dataclasses.replace(s, blocks_to_swap=n)
                if needed(estimate(shape, swapped)) <= gpu_gib:
                    break
        s = swapped
        steps.append((f"model.blocks_to_swap: {s.blocks_to_swap} (of {total}; host memory holds them)", s))
    for res in (768, 512):
        if s.resolution > res:
            s = dataclasses.replace(s, resolution=res)
            steps.append((f"data.resolution: {res}", s))
    out: list[tuple[str, Estimate]] = []
    for text, st in steps:
        est = estimate(shape, st)
        out.append((text, est))
        if needed(est) <= gpu_gib:
            break
    return out


def report(recipe: Any, gpu_gib: float | None) -> str:
    """The plan as text: the breakdown, the verdict for this GPU (or common GPUs), and what to change."""
    shape = model_shape(recipe.model.name_or_path)
    setup = Setup.from_recipe(recipe, on_gpu=True)
    est = estimate(shape, setup)
    lines = [
        f"model {shape.name} (FLUX.2 {shape.family}): {est.params['frozen'] / 1e9:.2f} B transformer parameters, "
        f"LoRA rank {setup.rank} on {setup.targets}: {est.params['lora'] / 1e6:.2f} M trainable",
        f"one training process, {setup.resolution}px, batch {setup.batch_size}, {setup.text_tokens} text tokens, "
        f"{setup.dtype} weights (text encoder and VAE sizes: {shape.counted}):",
        est.table(),
    ]
    enc = sum(est.cache_stage.values()) / GiB + 0.5
    targets = [(f"this GPU ({gpu_gib:.1f} GiB)", gpu_gib)] if gpu_gib else COMMON_GPUS
    lines.append("")
    for name, gib in targets:
        verdict = "fits" if needed(est) <= gib else "does not fit"
        cache = "" if enc <= gib else f"; the cache stage ({enc:.1f} GiB) does not fit, see below"
        lines.append(f"{name}: training {verdict} ({needed(est):.1f} of {gib:.1f} GiB){cache}")
    worst = min(gib for _, gib in targets)
    if needed(est) > worst:
        lines.append("")
        lines.append(f"to fit {worst:.1f} GiB, in this order:")
        recs = recommendations(shape, setup, worst)
        for text, e in recs:
            lines.append(f"  - {text}: {needed(e):.1f} GiB" + ("  <- fits" if needed(e) <= worst else ""))
        if not recs or needed(recs[-1][1]) > worst:
            frozen = est.parts[next(k for k in est.parts if k.startswith("frozen"))] / GiB
            lines.append(
                f"  the frozen transformer alone is {frozen:.1f} GiB at {setup.dtype}: this version cannot fit it "
                f"on {worst:.1f} GiB even so. model.quantize: nf4 (about {est.params['frozen'] * 0.52 / GiB:.1f} "
                "GiB, without block swapping) or sharding over several GPUs may; else use a larger GPU"
            )
    if enc > worst:
        lines.append(
            f"cache stage: the text encoder does not fit {worst:.1f} GiB; run `flux2-lora data cache` once on a larger "
            "GPU, or on the CPU (CUDA_VISIBLE_DEVICES= ..., fp32: about "
            f"{2 * est.cache_stage[next(iter(est.cache_stage))] / GiB:.0f} GiB of RAM), then train from the cache folder"
        )
    lines.append("the text encoder and VAE never share the GPU with training: embeddings and latents are cached first")
    return "\n".join(lines)


def cmd_system(argv: list[str]) -> int:
    from .cli import CliError, parse_train

    sub, rest = (argv[0], argv[1:]) if argv else ("", [])
    if sub != "optimize":
        raise CliError("system: expected `system optimize --preset P|--config C [--gpu-memory GiB] [recipe flags]`")
    gpu, recipe_args, i = None, [], 0
    while i < len(rest):
        key, eq, val = rest[i].partition("=")
        if key == "--gpu-memory":
            if not eq:
                if i + 1 >= len(rest):
                    raise CliError("--gpu-memory: needs a size in GiB")
                val, i = rest[i + 1], i + 1
            try:
                gpu = float(val)
            except ValueError:
                raise CliError(f"--gpu-memory: must be a number of GiB (got {val})") from None
        else:
            recipe_args.append(rest[i])
        i += 1
    recipe, _ = parse_train(recipe_args, need_data=False)
    print(report(recipe, gpu if gpu is not None else gpu_memory_gib()))
    return 0
