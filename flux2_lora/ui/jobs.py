"""Long work started from the browser: `flux2-lora ...` child processes, recorded on disk.

Each job is one process running the CLI (`python -m flux2_lora train|tune|eval ...`), in its own session so that a
stopped or restarted app does not take it down. The record (`STATE/jobs/<id>.json`) keeps the command, the output
folder, the log file and the process id with its start time, so a browser reload, or a new app on the same state
folder, finds the job again and tells a live process from a reused pid. Two jobs never write one output folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .paths import UiError

# How each kind of job is asked to stop: the trainer checkpoints and exits on SIGTERM; Ray Tune saves the sweep on
# SIGINT (`tune --resume` continues it); an evaluation just ends.
STOP_SIGNAL = {"train": signal.SIGTERM, "tune": signal.SIGINT, "eval": signal.SIGTERM}


def command(kind: str, args: list[str]) -> list[str]:
    """The child process for a job: this Python running the CLI."""
    return [sys.executable, "-m", "flux2_lora", kind, *args]


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None when no such process is alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie has finished
        return None
    return fields[19]


@dataclass
class Job:
    id: str
    kind: str  # train | tune | eval
    argv: list[str]
    output: str
    log: str
    pid: int
    started: float
    proc_start: str | None = None
    state: str = "running"  # running | finished | stopped | failed | ended
    returncode: int | None = None
    ended: float | None = None
    stop_requested: float | None = None
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == "running"

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 20000))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        # tqdm redraws with carriage returns: keep the last state of each line.
        return "\n".join(ln.split("\r")[-1] for ln in text.splitlines()[-lines:])

    def error_line(self) -> str:
        """The last meaningful line the job printed (a CLI error is one line)."""
        for ln in reversed(self.log_tail(40).splitlines()):
            if ln.strip():
                return ln.strip()
        return ""


class JobManager:
    """Starts, stops and finds jobs. One instance per app; the records outlive it."""

    def __init__(self, state_dir: Path, cwd: str | None = None):
        self.cwd = cwd  # where jobs run: relative paths in their flags mean the same as in the app
        self.dir = Path(state_dir) / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- records
    def _path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def _save(self, job: Job) -> None:
        tmp = self._path(job.id).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(job)))
        os.replace(tmp, self._path(job.id))

    def get(self, job_id: str | None) -> Job | None:
        if not job_id or not self._path(job_id).exists():
            return None
        job = Job(**json.loads(self._path(job_id).read_text()))
        return self._update(job)

    def all(self, kind: str | None = None) -> list[Job]:
        jobs = []
        for p in self.dir.glob("*.json"):
            try:
                job = self.get(p.stem)
            except (OSError, ValueError, TypeError):
                continue  # a record being replaced right now, or not ours
            if job is not None and (kind is None or job.kind == kind):
                jobs.append(job)
        return sorted(jobs, key=lambda j: j.started)

    def latest(self, kind: str) -> Job | None:
        jobs = self.all(kind)
        running = [j for j in jobs if j.running]
        pool = running or jobs
        return pool[-1] if pool else None

    def _update(self, job: Job) -> Job:
        """Notice a job that has ended since its record was written."""
        if not job.running:
            return job
        proc = self._procs.get(job.id)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return job
            job.returncode = rc
        elif _start_time(job.pid) == job.proc_start:
            return job
        job.ended = time.time()
        if job.returncode is None:
            job.state = "ended"  # started by an earlier app: its exit status is not known
        elif job.stop_requested is not None:
            job.state = "stopped"
        elif job.returncode == 0:
            job.state = "finished"
        else:
            job.state = "failed"
        self._save(job)
        return job

    # -- actions
    def start(self, kind: str, args: list[str], output: str, label: str = "", cwd: str | None = None,
              **extra: Any) -> Job:  # fmt: skip
        """Run `flux2-lora KIND ARGS` in `cwd`, writing to `output`; UiError when another job writes there."""
        out = Path(output).resolve()
        for other in self.all():
            if other.running and Path(other.output).resolve() == out:
                raise UiError(
                    f"output: {out} is being written by {other.kind} job {other.id} (stop it or choose another)"
                )
        if kind == "train" and _lock_held(out / ".lock"):
            raise UiError(f"output: {out} is in use by a training run outside this app; choose another output folder")
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        log = self.dir / f"{job_id}.log"
        argv = command(kind, args)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as fh:
            fh.write(("$ flux2-lora " + " ".join([kind, *args]) + "\n").encode())
            fh.flush()
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd or self.cwd,
                start_new_session=True,
            )
        self._procs[job_id] = proc
        job = Job(job_id, kind, argv, str(out), str(log), proc.pid, time.time(), _start_time(proc.pid), label=label,
                  extra=extra)  # fmt: skip
        self._save(job)
        return job

    def stop(self, job_id: str) -> Job | None:
        """Ask the job to stop (checkpoint first where the command can); asked again after 30 s, kill it."""
        job = self.get(job_id)
        if job is None or not job.running:
            return job
        now = time.time()
        try:
            if job.stop_requested is not None and now - job.stop_requested > 30:
                os.killpg(job.pid, signal.SIGKILL)
            else:
                os.kill(job.pid, STOP_SIGNAL.get(job.kind, signal.SIGTERM))
        except ProcessLookupError:
            pass
        if job.stop_requested is None:
            job.stop_requested = now
        self._save(job)
        return job

    def wait(self, job_id: str, timeout: float) -> Job | None:
        """For tests and shutdown: poll until the job ends or `timeout` passes."""
        end = time.time() + timeout
        job = self.get(job_id)
        while job is not None and job.running and time.time() < end:
            time.sleep(0.2)
            job = self.get(job_id)
        return job


def _lock_held(lock: Path) -> bool:
    """Whether a live process holds the trainer's lock on OUTPUT/.lock (the lock dies with its process)."""
    if not lock.exists():
        return False
    with open(lock, "a+") as fh:
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(fh.fileno(), fcntl.LOCK_UN)
    return False
