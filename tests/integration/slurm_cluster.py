"""A real single-node Slurm cluster for tests: Debian slurm-wlm + munge, started and stopped by us.

munged runs as user munge, slurmctld and slurmd as root, with proctrack/linuxproc, task/none, select/cons_tres,
no cgroups and no accounting (DESIGN.md). Configuration, state, spool and logs live in one temporary folder;
clients find the config through SLURM_CONF. Ports are picked free, so a Slurm already running elsewhere on the
machine is not touched. Teardown stops only the daemons started here, by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started here (the reason is the message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def install() -> None:
    """apt-get install slurm-wlm munge when the daemons are missing (as root)."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and this is not a root Debian machine (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    res = _run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], timeout=900, env=env)
    if res.returncode != 0:
        _run(["apt-get", "update", "-q"], timeout=600, env=env)
        res = _run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], timeout=900, env=env)
    if res.returncode != 0:
        raise SlurmUnavailable("apt-get install slurm-wlm munge failed: " + (res.stderr or res.stdout)[-500:])


@dataclass
class SlurmCluster:
    root: Path
    conf: Path = field(init=False)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    node: str = ""

    def __post_init__(self) -> None:
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The caller's environment now (jobs inherit it: FLUX2_LORA_HOME, HF_HUB_OFFLINE) plus SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------------------------------- start
    def start(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmctld/slurmd needs root")
        self._munge()
        node_line = _run(["slurmd", "-C"]).stdout.splitlines()[0]  # NodeName=HOST CPUs=... RealMemory=...
        self.node = node_line.split()[0].split("=", 1)[1]
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=flux2test",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # Requeued jobs wait cred_expire + 1 s before they may start again (default 120 s).
                    "AuthInfo=cred_expire=10",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=sched_interval=2",
                    "KillWait=30",
                    "MinJobAge=600",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    f"{node_line.split(' UpTime')[0]} NodeAddr=127.0.0.1 State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], "slurmd")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = _run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return
            for p in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise SlurmUnavailable(f"{p.args[0]} exited with {p.returncode}: {self._logs()}")
            time.sleep(1)
        self.stop()
        raise SlurmUnavailable(f"the Slurm node did not come up in 60 s (sinfo: {out!r}): {self._logs()}")

    def _munge(self) -> None:
        """Use a running munged if one answers, else start our own as user munge."""
        if _run(["bash", "-c", "munge -n | unmunge"]).returncode == 0:
            return
        run_dir = Path("/run/munge")
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _run(["runuser", "-u", "munge", "--", "mungekey", "--create"])
        self._spawn(["runuser", "-u", "munge", "--", "munged", "-F"], "munged")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if _run(["bash", "-c", "munge -n | unmunge"]).returncode == 0:
                return
            time.sleep(0.5)
        raise SlurmUnavailable("munged did not answer within 20 s")

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.stdout", "wb")  # noqa: SIM115 - closed when the daemon is stopped
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _logs(self) -> str:
        text = ""
        for f in sorted((self.root / "log").glob("*.log")) + sorted(self.root.glob("*.stdout")):
            text += f"\n--- {f.name}\n" + f.read_text(errors="replace")[-1500:]
        return text

    # ----------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        """Cancel our jobs, then stop the daemons we started (slurmd, slurmctld, munged), by pid."""
        if self.conf.exists() and any(p.poll() is None for p in self.procs):
            _run(["scancel", "--full", "--user", "root"], env=self.env, timeout=30)
            time.sleep(2)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    # ------------------------------------------------------------------------------------------ use
    def sbatch(self, script: Path) -> str:
        res = _run(["sbatch", "--parsable", str(script)], env=self.env)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip().split(";")[0]

    def state(self, job: str) -> dict[str, str]:
        out = _run(["scontrol", "show", "job", "-o", job], env=self.env).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job: str, until: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.state(job)
            if info.get("JobState") in until:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job} not in {until} after {timeout} s: {info}\n{self._logs()}")
