"""Training-step throughput and peak memory of flux2-lora, optionally against diffusers' own FLUX.2 trainer.

    python scripts/bench_step.py [--steps 10 40] [--repeats 3] [--compare-upstream PATH/train_dreambooth_lora_flux2.py]

Both trainers get the same small FLUX.2-dev-architecture model (hidden 256 = 2 heads x 128, 2 double + 4
single blocks, tiny text encoder and VAE, written here with `make_tiny_pipeline`), the same 16 images at
256 px (square crops, one instance prompt), batch 1, rank 16 on to_q/k/v/out.0, AdamW at 1e-4, fp32, no
gradient checkpointing, latents cached, no validation or checkpoints in between.

Method: each trainer runs as a whole process for N1 and N2 steps, alternating trainers and step counts;
steps/s = (N2 - N1) / (median time(N2) - median time(N1)), which cancels start-up, caching and saving.
Peak RSS is the child's own maximum resident set (os.wait4) at N2 steps, median over repeats. The upstream
script is not part of this repository: pass the path of your copy of diffusers'
examples/dreambooth/train_dreambooth_lora_flux2.py. It loads the tokenizer as PixtralProcessor, which needs
torchvision in the Python that runs it (`--upstream-python`, default: this one); run this script with that
Python too, so the tiny model is written with its PixtralProcessor and both trainers use the same torch.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "sks shape"


def run(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one whole process."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench_step: command failed ({log}):\n  {' '.join(cmd)}\n" + log.read_text()[-3000:])
    return wall, usage.ru_maxrss / 1024


def ours(model: Path, images: Path, out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    return [
        sys.executable, "-m", "flux2_lora", "train", "--model", str(model), "--dataset", str(images),
        "--data.instance_prompt", PROMPT, "--data.holdout", "0", "--data.resolution", "256", "--data.buckets", "false",
        "--data.num_workers", "0", "--steps", str(steps), "--rank", "16", "--lora.targets", "attention",
        "--training.batch_size", "1", "--lr", "1e-4", "--dtype", "fp32", "--model.max_sequence_length", "64",
        "--model.gradient_checkpointing", "false", "--validation.every_n_steps", "0", "--validation.prompts", "[]",
        "--output.checkpoint_every", "0", "--logging.tensorboard", "false", "--logging.log_every", str(steps),
        "--output", str(out), *extra,
    ]  # fmt: skip


def upstream(python: str, script: str, model: Path, images: Path, out: Path, steps: int) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    return [
        python, script, "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
        "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", "256", "--center_crop",
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--rank", "16",
        "--lora_layers", "to_k,to_q,to_v,to_out.0", "--learning_rate", "1e-4", "--max_sequence_length", "64",
        "--cache_latents", "--mixed_precision", "no", "--seed", "0", "--checkpointing_steps", "1000000",
        "--dataloader_num_workers", "0", "--report_to", "tensorboard",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs=2, default=[10, 40], metavar=("N1", "N2"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-upstream", type=str, default=None, help="path of train_dreambooth_lora_flux2.py")
    ap.add_argument("--upstream-python", type=str, default=sys.executable)
    ap.add_argument(
        "--variant",
        nargs=2,
        action="append",
        default=[],
        metavar=("LABEL", "ARGS"),
        help='another flux2-lora run with extra train arguments, e.g. --variant compile "--model.compile true"',
    )
    ap.add_argument("--workdir", type=str, default=None, help="keep models, data and logs here")
    args = ap.parse_args()

    from flux2_lora.data.sample import make_sample_dataset
    from flux2_lora.model import make_tiny_pipeline

    if args.compare_upstream:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            sys.exit(
                "bench_step: --compare-upstream needs torchvision in this Python: upstream loads the tokenizer as "
                "PixtralProcessor, which the tiny model only gets when torchvision is present (run both trainers "
                "with the same Python, e.g. the one given as --upstream-python)"
            )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_step-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "model_index.json").exists():
        make_tiny_pipeline(model, "dev", double_blocks=2, single_blocks=4, heads=2, head_dim=128)
    images = work / "images"
    if not images.exists():
        sample = make_sample_dataset(work / "sample", count=16, size=256)
        images.mkdir()
        for p in sample.glob("*.png"):  # images only: both trainers caption them with the instance prompt
            shutil.copy(p, images / p.name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FLUX2_LORA_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
    import torch

    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"

    trainers = {"flux2-lora": lambda n: ours(model, images, work / "out-ours", n)}
    for label, extra in args.variant:
        trainers[f"flux2-lora {label}"] = lambda n, label=label, extra=extra: ours(
            model, images, work / f"out-{label}", n, tuple(shlex.split(extra))
        )
    if args.compare_upstream:
        script = str(Path(args.compare_upstream).resolve())
        trainers["diffusers upstream"] = lambda n: upstream(
            args.upstream_python, script, model, images, work / "out-up", n
        )
    times: dict[tuple[str, int], list[float]] = {}
    rss: dict[str, list[float]] = {}
    n1, n2 = args.steps
    for rep in range(args.repeats):
        for n in (n1, n2):
            for name, cmd in trainers.items():
                wall, peak = run(cmd(n), env, work / f"log-{name.replace(' ', '_')}-{n}-{rep}.txt")
                times.setdefault((name, n), []).append(wall)
                if n == n2:
                    rss.setdefault(name, []).append(peak)
                print(f"  {name:20s} {n:4d} steps: {wall:7.2f} s, peak RSS {peak:7.0f} MiB", flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}; steps {n1} and {n2}, median of {args.repeats} alternating runs, workdir {work}")
    print(f"{'trainer':20s} {'steps/s':>8s} {'peak RSS MiB':>13s}")
    rate = {}
    for name in trainers:
        dt = statistics.median(times[(name, n2)]) - statistics.median(times[(name, n1)])
        rate[name] = (n2 - n1) / dt if dt > 0 else float("nan")
        print(f"{name:20s} {rate[name]:8.2f} {statistics.median(rss[name]):13.0f}")
    base = "diffusers upstream" if "diffusers upstream" in rate else "flux2-lora"
    for name in rate:
        if name != base:
            ratio = rate[name] / rate[base]
            mem = statistics.median(rss[name]) / statistics.median(rss[base])
            print(f"{name} / {base}: {ratio:.2f}x steps/s, {mem:.2f}x peak RSS")


if __name__ == "__main__":
    main()
