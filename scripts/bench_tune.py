"""Wall time of a `flux2-lora tune` sweep with trials run N at a time against one at a time.

    python scripts/bench_tune.py [--trials 4] [--max-steps 60] [--concurrency 1 2] [--repeats 3] [--json OUT]

Every sweep is the same work: the tiny FLUX.2 preset on the built-in sample data (cached once here, before any
timing, and read by every sweep as `--dataset CACHE`), the same search space (the learning rate only, so that
every trial costs the same) and the same sampler seed (so the same trials), and ASHA's grace period equal to the
max steps so that no trial is stopped early: every sweep trains trials x max-steps steps. The machine's CPUs are
shared out: one at a time a trial gets all of them, N at a time each gets 1/N (`--cpus-per-trial`).

Each sweep is one whole `flux2-lora tune` process (Ray start-up, trials, outputs, Ray shutdown), timed from the
outside. The concurrency levels alternate within each repeat; medians over repeats; the ratio is against the
first level.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = "training.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"


def tune_cmd(cache: Path, space: Path, out: Path, a: argparse.Namespace, concurrent: int) -> list[str]:
    cpus = max(1, (os.cpu_count() or 1) // concurrent)
    return [
        sys.executable, "-m", "flux2_lora", "tune", "--preset", "tiny", "--dataset", str(cache),
        "--output", str(out), "--space", str(space), "--trials", str(a.trials), "--concurrent", str(concurrent),
        "--cpus-per-trial", str(cpus), "--max-steps", str(a.max_steps), "--report-every", str(a.max_steps // 2),
        "--grace-steps", str(a.max_steps), "--search-seed", "0",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=str, default=None, help="Write the figures here.")
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    env.setdefault("FLUX2_LORA_HOME", str(work / "home"))
    space = work / "space.yaml"
    space.write_text(SPACE)
    cache = work / "cache"
    print("caching the sample data once ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "flux2_lora", "data", "cache", "--preset", "tiny", "--dataset", "builtin:sample",
         "--output", str(cache)],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    times: dict[int, list[float]] = {c: [] for c in a.concurrency}
    for rep in range(a.repeats):
        order = a.concurrency if rep % 2 == 0 else a.concurrency[::-1]
        for c in order:
            out = work / f"sweep-c{c}-r{rep}"
            log = work / f"sweep-c{c}-r{rep}.log"
            t = time.perf_counter()
            with open(log, "w") as fh:
                code = subprocess.call(tune_cmd(cache, space, out, a, c), stdout=fh, stderr=subprocess.STDOUT, env=env)
            wall = time.perf_counter() - t
            if code != 0:
                sys.exit(f"bench_tune: sweep failed, see {log}:\n" + log.read_text()[-3000:])
            results = json.loads((out / "optimization_results.json").read_text())
            steps = results["budget"]["steps_trained"]
            if steps != a.trials * a.max_steps:
                sys.exit(f"bench_tune: sweep trained {steps} steps, expected {a.trials * a.max_steps} ({log})")
            times[c].append(wall)
            print(f"repeat {rep + 1}/{a.repeats} concurrency {c}: {wall:.1f} s ({steps} steps)", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    base = statistics.median(times[a.concurrency[0]])
    rows = []
    print(f"\n{a.trials} trials x {a.max_steps} steps, {os.cpu_count()} CPUs, medians of {a.repeats}:")
    for c in a.concurrency:
        med = statistics.median(times[c])
        rows.append({"concurrency": c, "median_s": round(med, 1), "runs_s": [round(x, 1) for x in times[c]],
                     "speedup": round(base / med, 2)})  # fmt: skip
        print(f"  {c} at a time: {med:7.1f} s  (runs {', '.join(f'{x:.1f}' for x in times[c])})  {base / med:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"trials": a.trials, "max_steps": a.max_steps, "rows": rows}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
