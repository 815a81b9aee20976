"""LoRA training steps at FLUX.2-dev width on one GPU: step time, tokens/s, TFLOP/s, MFU, peak memory,
the extrapolation to the full 8 + 48-block model, and the memory estimator checked against measured peaks.

    python scripts/bench_gpu.py                      # one H100/H200, bf16, ~3 minutes, no network
    python scripts/bench_gpu.py --toy --steps 2      # the same code at toy width on the CPU (a test runs this)

What it runs. The FLUX.2-dev transformer (`Flux2Transformer2DModel`, hidden 6144 = 48 heads x 128, joint
attention dim 15360, MLP ratio 3) with random bf16 weights built directly on the GPU, at reduced depth: one
model per `--depths` entry (double,single blocks; default 1,2  2,2  1,4). Each gets the trainer's LoRA
(PEFT, `--rank`, `--targets`, fp32 LoRA weights) and runs the trainer's step - `flux2_lora.flow.flow_loss`
under bf16 autocast as accelerate runs it, backward, gradient clipping, fused AdamW - at each resolution, with
and without gradient checkpointing: `--warmup` steps, then `--steps` timed steps (CUDA-synchronised), median.
Text: `--text-tokens` prompt-embedding tokens (512, as FLUX.2-dev's cache stores them).

FLOPs, counted analytically per optimizer step (batch B, image tokens Si = (res/16)^2, text tokens St,
S = Si + St, hidden D, MLP width F = 3D, a matmul of (m x k)(k x n) = 2mkn):
  double block, per stream (tokens T = Si or St): q,k,v 3 x 2TD^2, out 2TD^2, MLP in 2TD(2F), MLP out 2TFD;
  joint attention 4 S^2 D (QK^T and AV).
  single block: fused q,k,v+MLP-in 2SD(3D+2F), attention 4 S^2 D, fused out 2S(D+F)D.
  embedders: 2 Si 128 D + 2 St 15360 D + 2 Si D 128 (proj_out). LoRA: 2Tr(in+out) per adapted linear.
  Modulation and norms (per sample, not per token) are left out (<0.1%).
  A training step of a frozen base: forward + backward to the inputs of every linear (= the forward
  linear FLOPs again) + attention backward (2x its forward) + LoRA weight gradients (= LoRA forward).
  "model TFLOP/s" and MFU use these FLOPs; with gradient checkpointing the GPU also recomputes the forward,
  reported as HFU (hardware FLOPs utilisation). Peak: bf16 dense tensor-core TFLOP/s of the card (H100 SXM
  and H200: 989.4; H100 PCIe: 756.5; A100: 312), or `--peak-tflops`.

Extrapolation: step time and peak memory are fitted as t0 + d*t_double + s*t_single over the depths run
(least squares), and evaluated at 8 + 48 blocks for FLUX.2-dev on one GPU.

Fitting FLUX.2-dev (`--fit`, on by default on a GPU): one model of `--fit-depth` blocks at full width is written
as safetensors and loaded the way training loads it (`flux2_lora.model.load_transformer`: int8/fp8 quantized block
by block on the device, nf4 through bitsandbytes while loading), for each `--quantize` base and each `--swap` block
count, with checkpointing, at the first resolution: peak memory, step time, the estimator's figure, and the LoRA
numerics check: `--fit-steps` training steps from the same LoRA init on the same inputs, the loss and the LoRA
compared with the unquantized, unswapped run (a swapped run must match its unswapped one exactly). nf4 and fp8 need
a GPU (fp8: compute capability >= 8.9); where one cannot run, its row says why. The `fp8_compute` row is
`model.fp8_compute`: bf16 weights, the block linears as torchao Float8Linear (fp8 matmuls, `quant.fp8_compute_blocks`,
as training converts them) under the LoRA; its step time is also given as a ratio to the `none` row with the same
swap count (the figure the README quotes; compute capability >= 8.9). On the CPU it is skipped, unless
FLUX2_LORA_FP8_EMULATE=1 runs torchao's emulation (numerics only: emulated matmuls are slower, not faster).

Memory estimator: for every configuration run, `flux2_lora.memory.estimate` (the planner behind
`flux2-lora system optimize`) is printed beside the measured peak (`torch.cuda.max_memory_allocated`; on
the CPU, the live tensor bytes that `memory.TensorMemory` counts during the real step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

PEAK_TFLOPS = {"H100 PCIe": 756.5, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0}
GiB = 2**30


def dev_config(toy: bool, double: int, single: int) -> dict[str, Any]:
    from flux2_lora.memory import KNOWN_MODELS

    cfg = dict(KNOWN_MODELS["black-forest-labs/FLUX.2-dev"]["transformer"])
    if toy:  # the same architecture at toy width, for the CPU
        cfg.update(num_attention_heads=2, attention_head_dim=32, joint_attention_dim=96, in_channels=16,
                   axes_dims_rope=(8, 8, 8, 8), timestep_guidance_channels=32)  # fmt: skip
    cfg.update(num_layers=double, num_single_layers=single)
    return cfg


def step_flops(cfg: dict[str, Any], batch: int, res: int, text: int, rank: int, lora_modules: list[str]) -> dict:
    """Analytic FLOPs of one training step (see the module docstring)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = int(d * cfg["mlp_ratio"])
    si, st = (res // 16) ** 2, text
    s = si + st
    nd, ns = cfg["num_layers"], cfg["num_single_layers"]
    c_in, joint = cfg["in_channels"], cfg["joint_attention_dim"]
    # (tokens, in, out, count) of every linear that runs per token; `first` are the ones whose input carries no
    # gradient (the first double block's q/k/v projections read the embedder outputs of a frozen model).
    linears = {
        "to_q": (si, d, d, nd), "to_k": (si, d, d, nd), "to_v": (si, d, d, nd), "to_out.0": (si, d, d, nd),
        "add_q_proj": (st, d, d, nd), "add_k_proj": (st, d, d, nd), "add_v_proj": (st, d, d, nd),
        "to_add_out": (st, d, d, nd), "ff.linear_in": (si, d, 2 * f, nd), "ff.linear_out": (si, f, d, nd),
        "ff_context.linear_in": (st, d, 2 * f, nd), "ff_context.linear_out": (st, f, d, nd),
        "to_qkv_mlp_proj": (s, d, 3 * d + 2 * f, ns), "attn.to_out": (s, d + f, d, ns),
        "x_embedder": (si, c_in, d, 1), "context_embedder": (st, joint, d, 1), "proj_out": (si, d, c_in, 1),
    }  # fmt: skip
    first = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
    no_input_grad = {"x_embedder", "context_embedder"}
    fwd = bwd = 0.0
    for name, (t, i, o, n) in linears.items():
        fwd += n * 2 * t * i * o
        grad_count = 0 if name in no_input_grad else n - 1 if name in first else n
        bwd += grad_count * 2 * t * i * o
    # Per-sample linears: timestep/guidance embedding MLPs, the shared modulations, the final norm's projection.
    # Their inputs carry no gradient, so they cost nothing in backward.
    embeds = 2 if cfg.get("guidance_embeds", True) else 1
    fwd += 2 * (embeds * (cfg["timestep_guidance_channels"] * d + d * d) + d * 6 * d * 2 + d * 3 * d + d * 2 * d)
    attn = (nd + ns) * 4 * s * s * d
    fwd, bwd = fwd + attn, bwd + 2 * attn
    # LoRA: A (in -> r) and B (r -> out); backward: both weight gradients, B's input gradient, and A's input
    # gradient where the layer's input carries one.
    single_out = any(m.startswith("single_transformer_blocks.") and m.endswith("attn.to_out") for m in lora_modules)
    chosen = [m for m in lora_modules if m in linears] + (["attn.to_out"] if single_out else [])
    for name in chosen:
        t, i, o, n = linears[name]
        fwd += n * 2 * t * r_io(rank, i, o)
        a_grads = n - 1 if name in first else n
        bwd += n * (2 * t * rank * o * 2 + 2 * t * i * rank) + a_grads * 2 * t * i * rank
    return {"forward": batch * fwd, "model": batch * (fwd + bwd), "with_recompute": batch * (2 * fwd + bwd)}


def r_io(rank: int, i: int, o: int) -> int:
    return rank * (i + o)


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def build(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, rank: int, targets: str, ckpt: bool) -> Any:
    from diffusers import Flux2Transformer2DModel

    from flux2_lora.model import add_lora, enable_checkpointing

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the training dtype, on the device
    try:
        with device:
            model = Flux2Transformer2DModel.from_config(cfg)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    add_lora(model, rank, rank, 0.0, targets, "gaussian", False)
    if ckpt:
        enable_checkpointing(model, 1)
    model.train()
    return model


def run_config(cfg: dict[str, Any], args: argparse.Namespace, device: torch.device, res: int, ckpt: bool) -> dict:
    from flux2_lora.flow import flow_loss, latent_ids, text_ids
    from flux2_lora.memory import TensorMemory

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(cfg, device, dtype, args.rank, args.targets, ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    b, side = args.batch, res // 16
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(b, cfg["in_channels"], side, side, generator=g).to(device)
    embeds = (torch.randn(b, args.text_tokens, cfg["joint_attention_dim"], generator=g) * 0.1).to(device, dtype)
    img_ids, txt_ids = latent_ids(b, side, side, device), text_ids(b, args.text_tokens, device)
    guidance = torch.full((b,), 4.0, device=device)

    def step() -> None:
        sig = torch.rand(b, generator=g).to(device)
        noise = torch.randn(latents.shape, generator=g).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = flow_loss(model, latents, embeds, sig, noise, img_ids, txt_ids, guidance)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    mem = TensorMemory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:  # count what lives through the timed steps: weights, inputs, LoRA and optimizer state
        mem.track(list(model.parameters()), list(model.buffers()), opt.state_dict()["state"])
        mem.track(latents, embeds, img_ids, txt_ids, guidance)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        if cuda:
            step()
            torch.cuda.synchronize()
        else:
            with mem:
                step()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else mem.peak
    return {"step_s": statistics.median(times), "peak_bytes": peak}


def estimated(cfg: dict[str, Any], args: argparse.Namespace, res: int, ckpt: bool, cuda: bool) -> float:
    from flux2_lora.memory import ModelShape, Setup, estimate

    shape = ModelShape("bench", "dev", cfg, 0.0, 0.0, "not used")
    setup = Setup(resolution=res, batch_size=args.batch, text_tokens=args.text_tokens, rank=args.rank,
                  targets=args.targets, dtype="bf16" if cuda else "fp32", autocast=cuda, gradient_checkpointing=ckpt)  # fmt: skip
    return estimate(shape, setup).total


def fit_section(args: argparse.Namespace, device: torch.device, cuda: bool) -> list[dict[str, Any]]:
    """Quantized bases and block swapping at FLUX.2-dev width: peak, step time, estimate, LoRA numerics."""
    import tempfile

    from flux2_lora.flow import flow_loss, latent_ids, text_ids
    from flux2_lora.memory import ModelShape, Setup, TensorMemory, estimate
    from flux2_lora.model import ModelSource, add_lora, enable_checkpointing, load_transformer
    from flux2_lora.quant import QuantizationError, fp8_compute_blocks
    from flux2_lora.swap import attach_block_swap

    double, single = (int(x) for x in args.fit_depth.split(","))
    cfg = dev_config(args.toy, double, single)
    dtype = torch.bfloat16 if cuda else torch.float32
    res, b = args.resolutions[0], args.batch
    side = res // 16
    tmp = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            base = Flux2Transformer2DModel.from_config(cfg)
    finally:
        torch.set_default_dtype(default)
    base.save_pretrained(tmp / "transformer", safe_serialization=True)
    del base
    if cuda:
        torch.cuda.empty_cache()
    src = ModelSource(path=tmp, family="dev", text_layers=(10, 20, 30), pipeline_class="Flux2Pipeline")
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(b, cfg["in_channels"], side, side, generator=g).to(device)
    embeds = (torch.randn(b, args.text_tokens, cfg["joint_attention_dim"], generator=g) * 0.1).to(device, dtype)
    noises = [torch.randn(latents.shape, generator=g).to(device) for _ in range(args.fit_steps)]
    sigmas = [torch.rand(b, generator=g).to(device) for _ in range(args.fit_steps)]
    img_ids, txt_ids = latent_ids(b, side, side, device), text_ids(b, args.text_tokens, device)
    guidance = torch.full((b,), 4.0, device=device)
    print(f"\nfitting FLUX.2-dev: {double}+{single} blocks at full {'toy ' if args.toy else ''}width, {res}px, "
          "checkpointing on; LoRA vs the unquantized unswapped run after "
          f"{args.fit_steps} steps", flush=True)  # fmt: skip
    print(f"{'base':>11s} {'swap':>4s} {'step ms':>9s} {'peak MiB':>9s} {'est MiB':>8s} {'max dloss':>10s} "
          f"{'LoRA rel diff':>13s}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    plain_step: dict[int, float] = {}  # the `none` base's step time per swap count (fp8_compute's ratio)
    ref: dict[str, Any] = {}
    unswapped: dict[str, dict[str, torch.Tensor]] = {}
    for kind in args.quantize:
        for swap in args.swap:
            label = f"{kind:>11s} {swap:4d}"
            fp8c = kind == "fp8_compute"  # model.fp8_compute: bf16 weights, fp8 matmuls
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                model = load_transformer(src, dtype, device, quantize="none" if fp8c else kind, keep_on_host=swap)
                if fp8c:  # as training converts them: the block linears, before the LoRA
                    fp8_compute_blocks(model, device)
                torch.manual_seed(1)
                add_lora(model, args.rank, args.rank, 0.0, args.targets, "gaussian", False)
                enable_checkpointing(model, 1)
                swapper = attach_block_swap(model, swap, device) if swap else model.to(device)
            except (QuantizationError, ValueError) as e:
                print(f"{label}  skipped: {str(e).splitlines()[0]}", flush=True)
                continue
            del swapper
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            mem = TensorMemory()
            if not cuda:
                mem.track(list(model.parameters()), list(model.buffers()), latents, embeds, img_ids, txt_ids)
            losses, times = [], []
            for i in range(args.fit_steps):
                t = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda), mem if not cuda else _null():
                    loss = flow_loss(model, latents, embeds, sigmas[i], noises[i], img_ids, txt_ids, guidance)
                    loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            lora = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
            peak = torch.cuda.max_memory_allocated() if cuda else mem.peak
            setup = Setup(resolution=res, batch_size=b, text_tokens=args.text_tokens, rank=args.rank,
                          targets=args.targets, dtype="bf16" if cuda else "fp32", autocast=cuda,
                          quantize="none" if fp8c else kind, blocks_to_swap=swap, fp8_compute=fp8c)  # fmt: skip
            est = estimate(ModelShape("bench", "dev", cfg, 0.0, 0.0, "not used"), setup).total
            if not ref:
                ref = {"losses": losses, "lora": lora}
            dloss = max(abs(x - y) for x, y in zip(losses, ref["losses"], strict=True))
            num = sum(float((lora[k] - ref["lora"][k]).norm() ** 2) for k in lora) ** 0.5
            den = sum(float(v.norm() ** 2) for v in ref["lora"].values()) ** 0.5
            row = {"quantize": kind, "blocks_to_swap": swap, "step_s": statistics.median(times[1:] or times),
                   "peak_bytes": peak, "estimated_bytes": est, "max_loss_diff": dloss, "lora_rel_diff": num / den,
                   "losses": losses}  # fmt: skip
            if kind == "none":
                plain_step[swap] = row["step_s"]
            elif fp8c and swap in plain_step:
                row["step_ratio_to_none"] = row["step_s"] / plain_step[swap]
            if swap == 0:
                unswapped[kind] = lora
            elif kind in unswapped:  # swapping must not change the numbers at all
                row["equal_to_unswapped"] = all(torch.equal(lora[k], unswapped[kind][k]) for k in lora)
            rows.append(row)
            print(f"{label} {1000 * row['step_s']:9.1f} {peak / 2**20:9.0f} {est / 2**20:8.0f} {dloss:10.2e} "
                  f"{row['lora_rel_diff']:13.2e}"
                  + {True: "  = unswapped", False: "  DIFFERS from unswapped", None: ""}[row.get("equal_to_unswapped")]
                  + (f"  {row['step_ratio_to_none']:.2f}x the none step" if "step_ratio_to_none" in row else ""),
                  flush=True)  # fmt: skip
            del model, opt, params, lora
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return rows


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def fit(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least-squares t = t0 + d*td + s*ts."""
    a = torch.tensor([[1.0, d, s] for d, s, _ in points], dtype=torch.float64)
    y = torch.tensor([[v] for _, _, v in points], dtype=torch.float64)
    sol = torch.linalg.lstsq(a, y).solution.flatten().tolist()
    return sol[0], sol[1], sol[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", nargs="+", default=["1,2", "2,2", "1,4"], help="double,single block counts")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attention", choices=["attention", "attention+single", "all-linear"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--toy", action="store_true", help="toy width (hidden 64) on the CPU: checks the script itself")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's bf16 dense peak, if not detected")
    ap.add_argument("--json", type=str, default=None, help="write every figure here")
    ap.add_argument(
        "--fit",
        choices=["auto", "on", "off"],
        default="auto",
        help="quantized base and block swap section (auto: on with a GPU, off with --toy)",
    )
    ap.add_argument("--fit-depth", default="2,4", help="double,single blocks of the fitting section's model")
    ap.add_argument("--quantize", nargs="+", default=["none", "int8", "fp8", "nf4", "fp8_compute"],
                    help="bases of the fitting section (none first); fp8_compute: bf16 weights, fp8 matmuls")  # fmt: skip
    ap.add_argument("--swap", type=int, nargs="+", default=[0, 3], help="blocks_to_swap values (0 first)")
    ap.add_argument("--fit-steps", type=int, default=3, help="training steps of the LoRA numerics check")
    args = ap.parse_args()

    from flux2_lora.model import lora_target_modules

    cuda = torch.cuda.is_available() and not args.toy
    if not cuda and not args.toy:
        sys.exit("bench_gpu: no CUDA GPU here; run with --toy to check the script on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    peak = peak_tflops(name, args.peak_tflops) if cuda else args.peak_tflops
    depths = [tuple(int(x) for x in d.split(",")) for d in args.depths]
    print(f"{name}; FLUX.2-dev {'toy width' if args.toy else 'width'}, LoRA rank {args.rank} on {args.targets}, "
          f"batch {args.batch}, {args.text_tokens} text tokens, {'bf16 autocast' if cuda else 'fp32'}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; peak {peak or 'unknown'} TFLOP/s", flush=True)  # fmt: skip
    header = (f"{'blocks':>7s} {'res':>5s} {'ckpt':>4s} {'step ms':>9s} {'img tok/s':>10s} {'TFLOP/s':>8s} "
              f"{'MFU':>6s} {'HFU':>6s} {'peak MiB':>9s} {'est MiB':>8s} {'est/meas':>8s}")  # fmt: skip
    print(header)
    rows: list[dict[str, Any]] = []
    if args.fit == "on" or (args.fit == "auto" and cuda):
        fitting = fit_section(args, device, cuda)
        if args.json:  # written now too, so a later out-of-memory in the sweep keeps these figures
            Path(args.json).write_text(json.dumps({"device": name, "fit": fitting}, indent=1))
    else:
        fitting = []
    for double, single in depths:
        cfg = dev_config(args.toy, double, single)
        modules = lora_target_modules(args.targets, single)
        for res in args.resolutions:
            for ck in args.checkpointing:
                ckpt = ck == "on"
                try:
                    r = run_config(cfg, args, device, res, ckpt)
                except torch.OutOfMemoryError:
                    print(f"{double:>3d}+{single:<3d} {res:5d} {ck:>4s}  out of memory", flush=True)
                    continue
                finally:
                    if cuda:
                        torch.cuda.empty_cache()
                fl = step_flops(cfg, args.batch, res, args.text_tokens, args.rank, modules)
                tflops = fl["model"] / r["step_s"] / 1e12
                hw = (fl["with_recompute"] if ckpt else fl["model"]) / r["step_s"] / 1e12
                est = estimated(cfg, args, res, ckpt, cuda)
                row = {"double": double, "single": single, "resolution": res, "checkpointing": ckpt, **r,
                       "image_tokens_per_s": args.batch * (res // 16) ** 2 / r["step_s"], "model_tflops": tflops,
                       "mfu": tflops / peak if peak else None, "hfu": hw / peak if peak else None,
                       "estimated_bytes": est, "flops": fl}  # fmt: skip
                rows.append(row)
                mfu = f"{100 * row['mfu']:5.1f}%" if peak else "   n/a"
                hfu = f"{100 * row['hfu']:5.1f}%" if peak else "   n/a"
                print(f"{double:>3d}+{single:<3d} {res:5d} {ck:>4s} {1000 * r['step_s']:9.1f} "
                      f"{row['image_tokens_per_s']:10.0f} {tflops:8.2f} {mfu} {hfu} {r['peak_bytes'] / 2**20:9.0f} "
                      f"{est / 2**20:8.0f} {est / max(r['peak_bytes'], 1):8.2f}", flush=True)  # fmt: skip

    full = dev_config(args.toy, 8, 48)
    print("\nextrapolated to the full 8 + 48-block model on one device (fit t0 + d*t_double + s*t_single):")
    predictions = []
    for res in args.resolutions:
        for ck in args.checkpointing:
            pts = [r for r in rows if r["resolution"] == res and r["checkpointing"] == (ck == "on")]
            if len({(r["double"], r["single"]) for r in pts}) < 3:
                print(f"  {res}px ckpt {ck}: needs three depths that ran")
                continue
            t = fit([(r["double"], r["single"], r["step_s"]) for r in pts])
            m = fit([(r["double"], r["single"], r["peak_bytes"]) for r in pts])
            step_s, mem = t[0] + 8 * t[1] + 48 * t[2], m[0] + 8 * m[1] + 48 * m[2]
            est = estimated(full, args, res, ck == "on", cuda)
            fl = step_flops(full, args.batch, res, args.text_tokens, args.rank, lora_target_modules(args.targets, 48))
            pred = {"resolution": res, "checkpointing": ck == "on", "step_s": step_s, "peak_bytes": mem,
                    "estimated_bytes": est, "model_tflops": fl["model"] / step_s / 1e12}  # fmt: skip
            predictions.append(pred)
            print(f"  {res:5d}px ckpt {ck:>3s}: {step_s:8.3f} s/step, {pred['model_tflops']:7.2f} TFLOP/s, "
                  f"peak {mem / GiB:7.2f} GiB (extrapolated), estimator {est / GiB:7.2f} GiB", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "rows": rows,
                                               "full_model": predictions, "fit": fitting}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
