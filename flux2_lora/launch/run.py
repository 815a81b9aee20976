"""Running a plan: `accelerate launch` here (one launcher per machine rank, their output streamed, stop signals
passed on), an sbatch job, or a Ray job. `prepare` says what a backend will run, for the command to show (and in a
dry run, to stop there); its `start` runs it.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .manifest import need
from .plan import Plan, flag_value

EXIT_REQUEUE = 75  # the trainer's exit code after a SIGUSR1/SIGTERM stop with a checkpoint written


@dataclass
class Launch:
    """What a backend runs for a plan: the lines that show it, and the call that starts it."""

    shown: list[str]
    """`run: ...` (and what each Slurm node runs), printed in a dry run too."""
    start: Callable[[], int]
    """Run it; the exit code."""
    notice: str | None = None
    """A line said just before starting (not in a dry run)."""


def prepare(p: Plan, files: dict[str, Path]) -> Launch:
    """The launch for the plan's backend and command (`files`: what write_files wrote)."""
    m = p.manifest
    if m.backend == "local" and m.command == "tune":
        need(p.nodes == 1, "resources.nodes", "a local sweep runs on this machine; use slurm or ray for more nodes")
        cmd = p.tune_command()
        return Launch(["run: " + _show(cmd, p.env)], lambda: subprocess.call(cmd, env={**os.environ, **p.env}))
    if m.backend == "local":
        shown = ["run: " + _show(cmd, p.env) for cmd in local_commands(p)]
        notice = None
        if p.nodes > 1:
            notice = f"local: {p.nodes} machine ranks on this host (a rendezvous test, not a multi-node speed-up)"
        return Launch(shown, lambda: run_local(p), notice)
    if m.backend == "slurm":
        if m.command == "tune":
            runs = shlex.join(p.tune_command("$HEAD_IP:$RAY_PORT"))
            what = f"the job starts Ray on {p.nodes} node(s) and runs: {runs}"
        elif p.nodes > 1:
            what = f"each node runs: {shlex.join(p.accelerate_command(0, '$MAIN_ADDR'))}".replace(
                "--machine_rank 0", "--machine_rank $SLURM_NODEID"
            )
        else:
            what = f"the job runs: {shlex.join(p.accelerate_command())}"
        cmd = slurm_command(files)
        return Launch([what, "run: " + _show(cmd)], lambda: submit_slurm(cmd))
    cmd = ray_command(p)
    return Launch(["run: " + _show(cmd)], lambda: subprocess.call(cmd))


def _show(cmd: list[str], env: dict[str, str] | None = None) -> str:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + shlex.join(cmd)


def local_commands(p: Plan) -> list[list[str]]:
    """One accelerate launch per machine rank, all on this host (nodes > 1 tests the multi-node rendezvous)."""
    return [p.accelerate_command(rank, "127.0.0.1") for rank in range(p.nodes)]


def _ignore_usr1() -> None:
    # The launchers (accelerate, torchrun) have no SIGUSR1 handler and would die of it; the trainer installs its
    # own handler over the inherited "ignore".
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _signal_tree(pid: int, sig: int) -> None:
    """Signal a process and all its descendants (torchrun starts each worker in a session of its own, so a
    process-group signal would not reach the trainers)."""
    import psutil  # an accelerate dependency

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def run_local(p: Plan) -> int:
    """Run the launchers, stream their output (prefixed by machine rank when there are several), return the code.

    SIGUSR1/SIGTERM sent to `flux2-lora launch` reach every training process as SIGUSR1 (checkpoint and stop);
    the launch then exits 75 like the trainer, so a wrapper can relaunch it and resume.
    """
    env = {**os.environ, **p.env}
    procs: list[subprocess.Popen[str]] = []
    stopping: list[str] = []

    def forward(signum: int, frame: Any) -> None:
        stopping.append(signal.Signals(signum).name)
        print(f"flux2-lora launch: received {signal.Signals(signum).name}; asking the trainers to checkpoint and stop")
        for proc in procs:
            _signal_tree(proc.pid, signal.SIGUSR1)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    threads = []
    try:
        for rank, cmd in enumerate(local_commands(p)):
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                start_new_session=True, preexec_fn=_ignore_usr1,
            )  # fmt: skip
            procs.append(proc)
            prefix = f"[node {rank}] " if p.nodes > 1 else ""
            t = threading.Thread(target=_pump, args=(proc, prefix), daemon=True)
            t.start()
            threads.append(t)
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait()
        raise
    finally:
        for t in threads:
            t.join(timeout=5)
        for s, h in previous.items():
            signal.signal(s, h)
    bad = [c for c in codes if c != 0]
    if not bad:
        return 0
    # accelerate launch reports a failed worker as exit 1; after a stop we asked for, that is the requeue case.
    if EXIT_REQUEUE in bad or stopping:
        return EXIT_REQUEUE
    return bad[0]


def _pump(proc: subprocess.Popen[str], prefix: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def slurm_command(files: dict[str, Path]) -> list[str]:
    return ["sbatch", "--parsable", str(files["sbatch"])]


def submit_slurm(cmd: list[str]) -> int:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise UsageError(f"sbatch: {(res.stderr or res.stdout).strip() or f'exit {res.returncode}'}")
    job = res.stdout.strip().split(";")[0]
    print(f"submitted Slurm job {job}")
    return 0


def ray_command(p: Plan) -> list[str]:
    m = p.manifest
    runtime: dict[str, Any] = {"env_vars": p.env}
    if m.ray.working_dir:
        runtime["working_dir"] = m.ray.working_dir
    cmd = ["ray", "job", "submit", "--address", m.ray.address, "--runtime-env-json", json.dumps(runtime)]
    gpus = m.ray.entrypoint_num_gpus if m.ray.entrypoint_num_gpus is not None else m.resources.gpus_per_node
    cpus = m.ray.entrypoint_num_cpus if m.ray.entrypoint_num_cpus is not None else m.resources.cpus_per_task
    if gpus:
        cmd += ["--entrypoint-num-gpus", flag_value(gpus)]
    if cpus:
        cmd += ["--entrypoint-num-cpus", flag_value(cpus)]
    if m.ray.no_wait:
        cmd.append("--no-wait")
    # On the cluster the interpreter is the job's own `python`, not this machine's path.
    launch = p.tune_command("auto") if m.command == "tune" else p.accelerate_command()
    launch[0] = m.python or "python"
    return [*cmd, "--", *launch]
