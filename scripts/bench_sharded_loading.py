"""What loading the frozen transformer costs each process under ddp, fsdp and zero3 (sharded loading), against one
process: the peak of materialised tensor bytes from the start of the load to after `prepare()`, what the process
holds of the frozen transformer afterwards, and the peak RSS.

    python scripts/bench_sharded_loading.py                 # tiny and wide models; 1 process, then 2 for each strategy
    python scripts/bench_sharded_loading.py --models tiny   # only the tiny model (about 2 minutes on 2 cores)

    # one strategy on 2 processes, as the driver above starts it (fsdp on CPU processes needs ACCELERATE_USE_CPU=1;
    # DeepSpeed must run without it):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/bench_sharded_loading.py \\
        --worker --strategy fsdp --model DIR --out OUT

Each worker runs the trainer's own code: `distributed.make_accelerator`, `distributed.load_frozen_transformer`,
`model.add_lora`, `distributed.place_for_prepare`, an AdamW on the LoRA, `accelerator.prepare`. From the start of
the load to after prepare() a dispatch mode counts every tensor storage created (a DTensor by its local shard; meta
tensors count nothing), and the model's parameters are counted too after the load and after prepare (safetensors
creates tensors outside the dispatcher): "peak tensors" is the largest sum alive at once. "holds" is what the
process keeps of the frozen transformer after prepare() (its shard or partition). RSS: `ru_maxrss` (peak since the
process started), and its growth over the RSS just before the load (the libraries imported before that).
ZeRO's communication buckets (`reduce_bucket_size`, `stage3_prefetch_bucket_size`: 5e8 values each by default, so
1.9 GiB of fp32 per process allocated in prepare() whatever the model's size) are set here to the largest
parameter's size, so that the figures are about the model; the trainer leaves DeepSpeed's defaults.

Models: `tiny` is the tests' tiny FLUX.2-dev (hidden 32, 2 + 2 blocks, fp32); `wide` is the FLUX.2-dev architecture
(joint attention 15360, head dim 128, MLP ratio 3) at hidden 1536 with 2 double and 4 single blocks, random bf16
weights written as safetensors in 200 MB shards (with an index, as FLUX.2-dev ships).

FSDP2 on CPU processes goes through the same shim as the tests (tests/support/fsdp_on_cpu.py): the gloo state is
marked MULTI_GPU before the Accelerator is built; on GPUs nothing of that is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flux2_lora.memory import TensorMemory  # noqa: E402

STRATEGIES = ("ddp", "fsdp", "zero3")


class LiveTensors(TensorMemory):
    """Bytes of the real (not meta) tensor storages alive while the mode is on: current and peak. A DTensor or a
    wrapper subclass counts by the plain tensors inside it (a DTensor's local shard)."""

    def track(self, *objs: Any) -> None:
        plain = [p for t in tree_leaves(objs) if isinstance(t, torch.Tensor) for p in _plain(t) if not p.is_meta]
        super().track(*plain)


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: a DTensor's local shard, a wrapper subclass's inner tensors."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        return _plain(t._local_tensor)
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return [x for n in names for x in _plain(getattr(t, n))]
    return [t]


def _import_all() -> None:
    import diffusers.models.transformers.transformer_flux2  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def worker(args: argparse.Namespace) -> None:
    """One process of a run: load, add the LoRA, prepare; write this process's figures as JSON."""
    import flux2_lora.distributed as dist
    from flux2_lora.config import Recipe
    from flux2_lora.model import DTYPES, ModelSource, add_lora

    if args.strategy == "fsdp" and not torch.cuda.is_available():  # the tests' shim (tests/support/fsdp_on_cpu.py)
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        PartialState(cpu=True, backend="gloo").distributed_type = DistributedType.MULTI_GPU
    recipe = Recipe()
    recipe.distributed.strategy = "ddp" if args.strategy == "single" else args.strategy
    recipe.model.dtype = args.dtype
    acc, strategy = dist.make_accelerator(recipe, "no", [], args.out)
    src = ModelSource(Path(args.model), "dev", (10, 20, 30), "Flux2Pipeline")
    dtype = DTYPES[args.dtype]
    _import_all()  # so that the RSS growth is the model's, not the libraries' first imports
    base = rss_bytes()
    live = LiveTensors()
    with live:
        model = dist.load_frozen_transformer(acc, strategy, src, dtype, device=None)
        live.track(list(model.parameters()))
        add_lora(model, args.rank, args.rank, 0.0, "attention+single", "default", False)
        dist.place_for_prepare(model, acc, strategy)
        live.track(list(model.parameters()))
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        if plugin is not None:  # ZeRO's communication buckets (5e8 values by default) would dwarf the model here
            bucket = max(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
            plugin.deepspeed_config["zero_optimization"].update(
                reduce_bucket_size=bucket, stage3_prefetch_bucket_size=bucket
            )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        prepared, optimizer = acc.prepare(model, optimizer)
        live.track(list(prepared.parameters()))
    held, whole = dist.frozen_bytes(acc.unwrap_model(prepared))
    row = {
        "strategy": strategy,
        "processes": acc.num_processes,
        "rank": acc.process_index,
        "peak_tensor_bytes": live.peak,
        "held_bytes": held,
        "whole_bytes": whole,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{strategy}-rank{acc.process_index}.json").write_text(json.dumps(row))
    acc.wait_for_everyone()


def write_wide(path: Path) -> Path:
    """A FLUX.2-dev-architecture transformer at hidden 1536 (12 heads x 128), 2 + 4 blocks, random bf16 weights."""
    from diffusers import Flux2Transformer2DModel

    from flux2_lora.memory import KNOWN_MODELS

    if (path / "transformer" / "config.json").exists():
        return path
    cfg = dict(KNOWN_MODELS["black-forest-labs/FLUX.2-dev"]["transformer"])
    cfg.update(num_attention_heads=12, num_layers=2, num_single_layers=4)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Flux2Transformer2DModel.from_config(cfg)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path / "transformer", safe_serialization=True, max_shard_size="200MB")
    return path


def write_tiny(path: Path) -> Path:
    from flux2_lora.model import make_tiny_pipeline

    return path if (path / "transformer" / "config.json").exists() else make_tiny_pipeline(path, family="dev")


def launch(strategy: str, model: Path, dtype: str, out: Path, processes: int, rank: int) -> None:
    script = [str(Path(__file__).resolve()), "--worker", "--strategy", strategy, "--model", str(model), "--dtype", dtype,
              "--out", str(out), "--rank", str(rank)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]  # fmt: skip
    if strategy in ("ddp", "fsdp") and processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"  # gloo DDP / FSDP2 through the shim; DeepSpeed runs without it
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{strategy} on {processes} process(es) failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | processes | strategy | rank | peak tensors MiB | holds of frozen MiB | peak RSS MiB (growth) "
        "| peak tensors vs 1 process |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['processes']} | {r['strategy']} | {r['rank']} | {mib(r['peak_tensor_bytes'])} | "
            f"{mib(r['held_bytes'])} of {mib(r['whole_bytes'])} | {mib(r['peak_rss'])} ({mib(r['rss_growth'])}) | "
            f"{r['ratio']:.2f} |"
        )
    return "\n".join(lines)


def driver(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-sharded-"))
    rows: list[dict[str, Any]] = []
    for name in args.models:
        model, dtype = (write_tiny(work / "tiny"), "fp32") if name == "tiny" else (write_wide(work / "wide"), "bf16")
        out = work / f"out-{name}"
        launch("single", model, dtype, out, 1, args.rank)
        for strategy in args.strategies:
            launch(strategy, model, dtype, out, 2, args.rank)
        found = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        one = next(r for r in found if r["processes"] == 1)
        order = {"single": 0, **{s: i + 1 for i, s in enumerate(STRATEGIES)}}
        for r in sorted(found, key=lambda r: (order.get(r["strategy"], 9), r["rank"])):
            rows.append({**r, "model": name, "ratio": r["peak_tensor_bytes"] / one["peak_tensor_bytes"]})
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "wide"], choices=["tiny", "wide"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--work", help="folder for the models and results (default: a new temporary folder)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    ap.add_argument("--worker", action="store_true", help="run as one process of a launch (see above)")
    ap.add_argument("--strategy", default="fsdp", choices=["single", *STRATEGIES])
    ap.add_argument("--model", help="worker: a folder holding transformer/")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (targets attention+single)")
    ap.add_argument("--out", help="worker: where each process writes its figures")
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
