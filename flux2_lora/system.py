"""`flux2-lora system`: what this machine has and what a recipe needs.

    flux2-lora system info [--json]            versions, optional libraries, CUDA, GPUs, CPU and RAM
    flux2-lora system gpu [--watch S] [--json] live memory (and utilisation) per GPU
    flux2-lora system presets [--json]         the presets with their key values
    flux2-lora system optimize --preset character --model black-forest-labs/FLUX.2-dev [--gpu-memory 24]

The optimize numbers come from `memory.estimate` (the real model config on the meta device, one simulated step).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .memory import Estimate, GiB, ModelShape, Setup, estimate, human_bytes, human_count, model_shape
from .resources import recipes_dir

ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}  # lora.type as the plan names it

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
    if s.ema:
        s = dataclasses.replace(s, ema=False)
        steps.append(("training.ema_decay: 0 (no fp32 EMA copy of the LoRA)", s))
    if s.rank > 32:
        s = dataclasses.replace(s, rank=32)
        steps.append(("lora.rank: 32 (the LoRA, its gradients and AdamW state shrink with the rank)", s))
    if s.batch_size > 1:
        s = dataclasses.replace(s, batch_size=1)
        steps.append((f"training.batch_size: 1 with training.gradient_accumulation: {setup.batch_size}", s))
    if s.fp8_compute:  # torchao keeps each fp8 linear's input (memory.py); and a quantized base excludes it
        s = dataclasses.replace(s, fp8_compute=False)
        steps.append(("model.fp8_compute: false (bf16 matmuls: slower on Ada/Hopper, fewer saved activations)", s))
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


def sharding(shape: ModelShape, setup: Setup, gpu_gib: float) -> tuple[int, Estimate] | None:
    """The fewest GPUs of `gpu_gib` that fit the recipe with parameters, gradients and optimizer state fully
    sharded (fsdp or zero3), at the recipe's precision with checkpointing and batch 1, no quantization or swapping."""
    s = dataclasses.replace(
        setup, gradient_checkpointing=True, checkpoint_every=1, batch_size=1, quantize="none", blocks_to_swap=0
    )
    for n in (2, 4, 8, 16):
        est = estimate(shape, dataclasses.replace(s, shards=n))
        if needed(est) <= gpu_gib:
            return n, est
    return None


def dataset_references(recipe: Any) -> tuple[int, str]:
    """(tokens, how) of the largest sample's references in the recipe's dataset (a folder or a cache), after
    data.max_references and data.max_reference_pixels; (0, "") without references or a dataset to look at.

    Image sizes are read from the file headers; raw shards are not scanned (their references are not counted)."""
    from PIL import Image

    from .data.cache import read_index_json
    from .data.folder import scan_folder
    from .data.sample import resolve_dataset
    from .data.shards import is_shard_spec
    from .errors import DataError
    from .flow import reference_size
    from .sources import resolve_sources

    d = recipe.data
    sizes: list[list[Any]] = []
    for source in resolve_sources(d):  # every source of data.datasets (or data.dataset)
        spec = source.path
        try:
            if not spec or is_shard_spec(spec):
                continue
            root = Path(spec).expanduser() if not spec.startswith("builtin:") else resolve_dataset(spec)
            if (root / "index.json").exists():
                index = read_index_json(root)
                sizes += [list(r) for info in index.train + index.val for r in (info.references or [])]
                continue
            for item in scan_folder(root, source.instance_prompt, source.mask_dir):
                with_sizes = []
                for p in item.references:
                    with Image.open(p) as im:
                        with_sizes.append(reference_size(im.width, im.height, d.max_reference_pixels))
                sizes.append(with_sizes)
        except (DataError, OSError):
            continue  # `data validate` and `train` report the dataset's problems; the plan counts what it can
    tokens = [sorted(((w // 16) * (h // 16) for w, h in refs), reverse=True)[: d.max_references] for refs in sizes]
    largest = max(tokens, key=sum, default=[])
    if not largest:
        return 0, ""
    return sum(largest), f"{len(largest)} reference(s) of the dataset's largest editing sample"


def report(recipe: Any, gpu_gib: float | None) -> str:
    """The plan as text: the breakdown, the verdict for this GPU (or common GPUs), and what to change."""
    shape = model_shape(recipe.model.name_or_path)
    setup = Setup.from_recipe(recipe, on_gpu=True)
    refs = dataset_references(recipe)
    setup = dataclasses.replace(setup, reference_tokens=refs[0])
    est = estimate(shape, setup)
    other = estimate(shape, dataclasses.replace(setup, gradient_checkpointing=not setup.gradient_checkpointing,
                                                checkpoint_every=1))  # fmt: skip
    act = {e is est: v for e in (est, other) for k, v in e.parts.items() if k.startswith("activations")}
    on, off = (act[True], act[False]) if setup.gradient_checkpointing else (act[False], act[True])
    table = est.table().splitlines()
    row = next(i for i, ln in enumerate(table) if ln.startswith("  activations"))
    table.insert(row + 1, f"    (checkpointing every block: {human_bytes(on)}; no checkpointing: {human_bytes(off)})")
    lines = [
        f"model {shape.name} (FLUX.2 {shape.family}): {human_count(est.params['frozen'])} transformer parameters, "
        f"{ADAPTER_NAMES.get(setup.adapter, 'LoRA')} rank {setup.rank} on {setup.targets}: "
        f"{human_count(est.params['lora'])} trainable",
        f"one training process, {setup.resolution}px, batch {setup.batch_size}, {setup.text_tokens} text tokens, "
        + (f"{refs[0]} reference tokens ({refs[1]}), " if refs[0] else "")
        + f"{setup.dtype} weights (text encoder and VAE sizes: {shape.counted}):",
        *table,
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
        shard = sharding(shape, setup, worst)
        if shard is not None:
            lines.append(
                f"  or, on several such GPUs: distributed.strategy: fsdp (or zero3) with {shard[0]} GPUs: "
                f"{needed(shard[1]):.1f} GiB each ({setup.dtype} base, checkpointing, batch 1 per GPU; no quantization "
                "or swapping)"
            )
        if not recs or needed(recs[-1][1]) > worst:
            frozen = est.parts[next(k for k in est.parts if k.startswith("frozen"))] / GiB
            lines.append(
                f"  the frozen transformer alone is {frozen:.1f} GiB at {setup.dtype}: this version cannot fit it "
                f"on {worst:.1f} GiB even so. model.quantize: nf4 (about {est.params['frozen'] * 0.52 / GiB:.1f} "
                "GiB, without block swapping) or sharding over several GPUs may; else use a larger GPU"
            )
    if enc > worst:
        te, q = shape.text_encoder_params / GiB, setup.text_encoder_quantize
        smaller = {"none": f"int8 (about {te:.0f} GiB) or nf4 (about {0.52 * te:.0f} GiB, GPU only)",
                   "int8": f"nf4 (about {0.52 * te:.0f} GiB, GPU only)"}.get(q)  # fmt: skip
        ram = est.cache_stage[next(iter(est.cache_stage))] / GiB if q != "nf4" else te
        lines.append(
            f"cache stage: the text encoder does not fit {worst:.1f} GiB"
            + (f"; model.text_encoder_quantize: {smaller} may keep it on the GPU" if smaller else "")
            + f"; else model.text_encoder_device: auto (the default) runs it on the CPU (slow; about {ram:.0f} GiB of "
            + ("RAM" if q != "nf4" else "RAM with model.text_encoder_quantize: int8")
            + "), or run `flux2-lora data cache` once on a larger GPU and train from the cache folder"
        )
    lines.append("the text encoder and VAE never share the GPU with training: embeddings and latents are cached first")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# system info, system gpu, system presets
# ---------------------------------------------------------------------------------------------

CORE_LIBRARIES = ["diffusers", "transformers", "accelerate", "peft", "safetensors", "jsonargparse"]
# (name shown, distribution whose metadata holds the version, pip extra, what it enables). Versions are read from
# the installed metadata: nothing here is imported (deepspeed or ray would take seconds and print warnings).
OPTIONAL_LIBRARIES = [
    ("bitsandbytes", "bitsandbytes", "bitsandbytes", "training.optimizer: adamw8bit; model.quantize: nf4 (GPU)"),
    ("prodigyopt", "prodigyopt", "prodigy", "training.optimizer: prodigy"),
    ("torchao", "torchao", "quant", "model.quantize: int8 (CPU or GPU) and fp8 (GPU, compute capability >= 8.9)"),
    ("deepspeed", "deepspeed", "deepspeed", "distributed.strategy: zero2 | zero3"),
    ("webdataset", "webdataset", "", "shards and the latent cache: data shard, data cache, training"),
    ("ray", "ray", "tune", "flux2-lora tune (trials in parallel) and launch backend: ray"),
    ("optuna", "optuna", "tune", "flux2-lora tune (the search algorithm)"),
    ("open_clip", "open_clip_torch", "eval", "eval assess-quality/test-prompts, validation.clip_score/overfit_check"),
    ("gradio", "gradio", "ui", "flux2-lora ui"),
    ("wandb", "wandb", "wandb", "logging.wandb: true"),
]


def package_version(dist: str) -> str | None:
    """The installed version of a distribution from its metadata (nothing imported), None when absent."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cudnn_version() -> str | None:
    import torch

    try:
        v = torch.backends.cudnn.version()
    except Exception:  # a CUDA build whose cuDNN library cannot be loaded here
        return None
    if not v:
        return None
    # cuDNN >= 9 encodes major*10000 + minor*100 + patch; cuDNN 8 major*1000 + minor*100 + patch.
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 10000 else f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def gpu_properties() -> list[dict[str, Any]]:
    """Each visible CUDA GPU: name, total memory, compute capability, and whether bf16 and fp8 run natively
    (bf16: compute capability >= 8.0, Ampere on; fp8: >= 8.9, Ada and Hopper on, as model.quantize: fp8 needs)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cap = (int(p.major), int(p.minor))
        out.append({
            "index": i, "name": p.name, "total_memory_bytes": int(p.total_memory),
            "total_memory_gib": round(p.total_memory / GiB, 2), "compute_capability": f"{cap[0]}.{cap[1]}",
            "bf16": cap >= (8, 0), "fp8": cap >= (8, 9),
        })  # fmt: skip
    return out


def memory_info() -> dict[str, Any]:
    """Total and available RAM in bytes: psutil when installed, else /proc/meminfo (Linux), else unknown."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"total_bytes": int(vm.total), "available_bytes": int(vm.available), "source": "psutil"}
    except ImportError:
        pass
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * 1024  # kB
        return {"total_bytes": fields.get("MemTotal"), "available_bytes": fields.get("MemAvailable"),
                "source": "/proc/meminfo"}  # fmt: skip
    except OSError:
        return {"total_bytes": None, "available_bytes": None, "source": "unknown"}


def system_info() -> dict[str, Any]:
    """Everything `system info` prints, as one JSON-ready dict (a library that is not installed has version None)."""
    import os
    import platform
    import sys

    import torch

    from . import __version__

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "flux2_lora": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "executable": sys.executable,
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": _cudnn_version()},
        "libraries": {name: package_version(name) for name in CORE_LIBRARIES},
        "optional": {
            name: {"version": package_version(dist), "extra": extra, "enables": enables}
            for name, dist, extra, enables in OPTIONAL_LIBRARIES
        },
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpu_properties(),
        "cpu": {"cores": os.cpu_count(), "usable_cores": usable},
        "ram": memory_info(),
    }


def _gib(n: float | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.1f} GiB"


def format_info(info: dict[str, Any]) -> str:
    t = info["torch"]
    build = f"CUDA {t['cuda']}, cuDNN {t['cudnn'] or 'none'}" if t["cuda"] else "CPU build, no CUDA"
    lines = [
        f"flux2-lora    {info['flux2_lora']}",
        f"python        {info['python']} ({info['platform']})",
        f"torch         {t['version']} (built with {build})",
    ]
    lines += [f"{k:13s} {v or 'not installed'}" for k, v in info["libraries"].items()]
    lines += ["", "optional libraries:"]
    for name, o in info["optional"].items():
        hint = "" if o["version"] or not o["extra"] else f"  (pip install 'flux2-lora[{o['extra']}]')"
        lines.append(f"  {name:13s} {o['version'] or 'not installed':14s} {o['enables']}{hint}")
    lines.append("")
    if not info["cuda_available"]:
        why = "" if t["cuda"] else " (this torch is a CPU build)"
        lines.append(f"CUDA          not available: no CUDA GPU is visible{why}")
    else:
        lines.append(f"CUDA          available, {len(info['gpus'])} GPU(s)")
    for g in info["gpus"]:
        lines.append(
            f"  GPU {g['index']}: {g['name']}, {g['total_memory_gib']:.1f} GiB, compute capability "
            f"{g['compute_capability']}, bf16 {'yes' if g['bf16'] else 'no'}, fp8 {'yes' if g['fp8'] else 'no'}"
        )
    cpu, ram = info["cpu"], info["ram"]
    lines.append(f"CPU           {cpu['cores']} cores ({cpu['usable_cores']} usable by this process)")
    lines.append(f"RAM           {_gib(ram['total_bytes'])} total, {_gib(ram['available_bytes'])} available")
    return "\n".join(lines)


def _nvidia_smi() -> dict[str, dict[str, float | None]]:
    """nvidia-smi's utilisation, temperature and power per GPU UUID; empty when nvidia-smi is absent or fails."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    query = "uuid,utilization.gpu,utilization.memory,temperature.gpu,power.draw"
    try:
        res = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    if res.returncode != 0:
        return {}

    def num(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:  # "[N/A]", "[Not Supported]"
            return None

    out: dict[str, dict[str, float | None]] = {}
    for line in res.stdout.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 5:
            out[_uuid(cells[0])] = {"utilization_percent": num(cells[1]), "memory_utilization_percent": num(cells[2]),
                                    "temperature_c": num(cells[3]), "power_w": num(cells[4])}  # fmt: skip
    return out


def _uuid(u: object) -> str:
    s = str(u).lower()
    return s[4:] if s.startswith("gpu-") else s


def gpu_snapshot() -> list[dict[str, Any]]:
    """Live memory per visible GPU (torch.cuda.mem_get_info: used by every process on it, free, total), with
    nvidia-smi's utilisation where available (matched by GPU UUID, so CUDA_VISIBLE_DEVICES order does not matter).
    mem_get_info creates this process's CUDA context on each GPU (a few hundred MiB, counted in `used`)."""
    import torch

    if not torch.cuda.is_available():
        return []
    smi = _nvidia_smi()
    rows = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        props = torch.cuda.get_device_properties(i)
        row: dict[str, Any] = {"index": i, "name": props.name, "used_bytes": int(total - free),
                               "free_bytes": int(free), "total_bytes": int(total)}  # fmt: skip
        extra = smi.get(_uuid(getattr(props, "uuid", "")), {})
        row.update({k: extra.get(k) for k in ("utilization_percent", "memory_utilization_percent",
                                              "temperature_c", "power_w")})  # fmt: skip
        rows.append(row)
    return rows


def format_gpus(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        used, total = r["used_bytes"], r["total_bytes"]
        text = (f"GPU {r['index']} {r['name']}: {used / GiB:6.1f} GiB used, {r['free_bytes'] / GiB:6.1f} GiB free "
                f"of {total / GiB:.1f} GiB ({100 * used / total:3.0f}%)")  # fmt: skip
        if r.get("utilization_percent") is not None:
            text += f", utilisation {r['utilization_percent']:.0f}%"
        if r.get("temperature_c") is not None:
            text += f", {r['temperature_c']:.0f} C"
        if r.get("power_w") is not None:
            text += f", {r['power_w']:.0f} W"
        lines.append(text)
    return "\n".join(lines)


def no_gpu_line() -> str:
    import os

    import torch

    why = "this torch is a CPU build" if torch.version.cuda is None else "torch.cuda.is_available() is False"
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        why += f", CUDA_VISIBLE_DEVICES={vis!r}"
    return f"no CUDA GPU is visible ({why}); `flux2-lora system info` shows the CPU and RAM"


def preset_rows() -> list[dict[str, Any]]:
    """The presets `--preset NAME` resolves to (every recipes/*.yaml, or $FLUX2_LORA_RECIPES/*.yaml), each read as
    training reads it (base defaults, then the file), with its key values; a file that does not parse has `error`."""
    from .errors import RecipeError, UsageError
    from .recipe import parse_recipe, presets

    rows: list[dict[str, Any]] = []
    for name in presets():
        path = recipes_dir() / f"{name}.yaml"
        try:
            r, _ = parse_recipe(["--preset", name], need_data=False)
        except (UsageError, RecipeError) as e:
            rows.append({"preset": name, "file": str(path), "error": str(e)})
            continue
        m, t = r.model, r.training
        rows.append({
            "preset": name, "file": str(path), "model": m.name_or_path, "dtype": m.dtype,
            "resolution": r.data.resolution, "rank": r.lora.rank, "alpha": r.lora.alpha or r.lora.rank,
            "targets": r.lora.targets, "lr": t.lr, "batch_size": t.batch_size,
            "gradient_accumulation": t.gradient_accumulation, "max_steps": t.max_steps, "optimizer": t.optimizer,
            "mixed_precision": t.mixed_precision, "gradient_checkpointing": m.gradient_checkpointing,
            "gradient_checkpointing_every": m.gradient_checkpointing_every, "quantize": m.quantize,
        })  # fmt: skip
    return rows


def format_presets(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"no presets in {recipes_dir()} (set FLUX2_LORA_RECIPES to a folder of recipe .yaml files)"
    head = ["preset", "model", "dtype", "res", "rank/alpha", "targets", "lr", "batch x accum", "steps", "optimizer",
            "mixed prec.", "checkpointing", "quantize"]  # fmt: skip
    table, errors = [head], []
    for r in rows:
        if "error" in r:
            errors.append(f"{r['preset']}: {r['error']}")
            continue
        every = r["gradient_checkpointing_every"]
        ckpt = ("every block" if every == 1 else f"every {every}") if r["gradient_checkpointing"] else "off"
        table.append([
            r["preset"], r["model"], r["dtype"], str(r["resolution"]), f"{r['rank']}/{r['alpha']:g}", r["targets"],
            f"{r['lr']:g}", f"{r['batch_size']} x {r['gradient_accumulation']}", str(r["max_steps"]), r["optimizer"],
            r["mixed_precision"], ckpt, r["quantize"],
        ])  # fmt: skip
    widths = [max(len(row[c]) for row in table) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.append("")
    lines.append(f"from {recipes_dir()}; use one with `flux2-lora train --preset NAME` (later flags override it).")
    lines.append("mixed precision `auto`: model.dtype on a GPU, none on the CPU.")
    from .resources import launch_dir

    examples = sorted(p.stem for p in (launch_dir() / "manifests").glob("*.yaml"))
    if examples:
        lines.append(
            f"example launch manifests ({launch_dir() / 'manifests'}): {', '.join(examples)}; "
            "`flux2-lora launch NAME --dry-run` shows what one would run."
        )
    lines += [f"unreadable preset {e}" for e in errors]
    return "\n".join(lines)
