"""`flux2-lora launch`: rendered configs (accelerate's and DeepSpeed's own loaders), manifest errors, a 2-"node"
local launch, and the Slurm batch scripts on a real single-node Slurm cluster (installed and started here)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from flux2_lora.cli import main
from tests.conftest import run_cli
from tests.integration.slurm_cluster import SlurmCluster, SlurmUnavailable, install

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "launch" / "manifests"
EXAMPLES = ["one-gpu", "node-8xh100-zero2", "slurm-4nodes-fsdp", "cpu-2proc", "ray-1node"]
TINY_FAST = {"validation.prompts": [], "validation.every_n_steps": 0, "logging.tensorboard": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _manifest(path: Path, **fields: object) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def _dry_run(manifest: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["launch", str(manifest), "--dry-run", "--output", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    return text.out


# ------------------------------------------------------------------------------------------- dry run
def _check_deepspeed(path: Path, stage: int, world: int) -> dict:
    cfg = json.loads(path.read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    hf = HfDeepSpeedConfig(dict(cfg))  # accelerate's reader ("auto" allowed)
    assert hf.get_value("zero_optimization.stage") == stage and hf.is_zero3() == (stage == 3)
    deepspeed = pytest.importorskip("deepspeed.runtime.config")
    filled = dict(cfg)
    # accelerate fills train_batch_size = micro batch x accumulation x processes; DeepSpeed checks the product
    # against its own world size, which is 1 outside a process group.
    filled["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
    ds = deepspeed.DeepSpeedConfig(filled)
    assert ds.zero_optimization_stage == stage
    assert ds.gradient_clipping == cfg["gradient_clipping"]
    assert ds.bfloat16_config.enabled == cfg["bf16"]["enabled"]
    assert world >= 1
    return cfg


@pytest.mark.parametrize("name", EXAMPLES)
def test_dry_run_of_each_example_manifest(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    manifest = yaml.safe_load((MANIFESTS / f"{name}.yaml").read_text())
    out = tmp_path / "out"
    stdout = _dry_run(MANIFESTS / f"{name}.yaml", out, capsys)
    res = manifest.get("resources", {})
    nodes, gpus = res.get("nodes", 1), res.get("gpus_per_node", 0)
    world = nodes * (res.get("processes_per_node") or gpus or 1)

    cfg = load_config_from_file(str(out / "launch" / "accelerate_config.yaml"))  # accelerate's own loader
    assert (cfg.num_machines, cfg.num_processes) == (nodes, world)
    strategy = manifest.get("strategy", "ddp")
    assert cfg.use_cpu == (gpus == 0 and strategy in ("ddp", "fsdp"))  # ZeRO on CPUs runs without use_cpu
    expected = {"zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}.get(
        strategy, "MULTI_GPU" if world > 1 else "NO"
    )
    assert str(cfg.distributed_type).split(".")[-1] == expected
    assert f"--distributed.strategy {strategy}" in stdout
    for key in manifest.get("overrides", {}):
        assert f"--{key} " in stdout
    if strategy.startswith("zero"):
        assert cfg.deepspeed_config["deepspeed_config_file"] == str(out / "launch" / "deepspeed.json")
        ds = _check_deepspeed(out / "launch" / "deepspeed.json", int(strategy[-1]), world)
        assert ds["bf16"]["enabled"] == (manifest.get("mixed_precision") == "bf16")
    else:
        assert not (out / "launch" / "deepspeed.json").exists()
    if strategy == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2
    backend = manifest.get("backend", "local")
    if backend == "local":
        runs = [ln for ln in stdout.splitlines() if ln.startswith("run: ")]
        assert len(runs) == nodes and all("accelerate.commands.launch --config_file" in r for r in runs)
        assert "--resume latest" in runs[0] and f"--output.dir {out}" in runs[0]
        assert f"--mixed_precision {cfg.mixed_precision} " in runs[0]  # on the command line too (DeepSpeed)
    if backend == "slurm":
        script = out / "launch" / "job.sbatch"
        assert f"run: sbatch --parsable {script}" in stdout
        text = script.read_text()
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        for line in (f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus}", "--requeue",
                     "--open-mode=append", "--signal=B:USR1@300", f"--time={res['time']}"):  # fmt: skip
            assert f"#SBATCH {line}\n" in text
        assert '--machine_rank "$SLURM_NODEID"' in text and "scontrol show hostnames" in text
        assert f"OUTPUT_DIR={out}\n" in text and "--resume latest" in text
    if backend == "ray":
        run = next(ln for ln in stdout.splitlines() if ln.startswith("run: ray job submit"))
        env = json.loads(run.split("--runtime-env-json ")[1].split("' ")[0].strip("'"))
        assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
        assert " -- python -m accelerate.commands.launch --config_file " in run


@pytest.mark.parametrize("offload", ["none", "optimizer", "all"])
def test_zero3_deepspeed_json(offload: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = yaml.safe_load((MANIFESTS / "node-8xh100-zero2.yaml").read_text())
    manifest.update(strategy="zero3", offload=offload)
    _dry_run(_manifest(tmp_path / "m.yaml", **manifest), tmp_path / "out", capsys)
    launch = tmp_path / "out" / "launch"
    ds = _check_deepspeed(launch / "deepspeed.json", 3, 8)
    zero = ds["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_optimizer" in zero) == (offload != "none")
    assert ("offload_param" in zero) == (offload == "all")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_clipping"]) == (2, 1.0)  # from the recipe
    # No zero.Init at load time: the trainer loads the transformer itself and ZeRO-3 partitions it in prepare().
    assert (
        yaml.safe_load((launch / "accelerate_config.yaml").read_text())["deepspeed_config"]["zero3_init_flag"] is False
    )


BAD = [
    ({"resources": {"nodes": "two"}}, "resources.nodes: "),
    ({"strategy": "zero4"}, "strategy: must be one of ddp, fsdp, zero2, zero3"),
    ({"backend": "k8s"}, "backend: must be one of local, slurm, ray"),
    ({"resources": {"nodes": 0}}, "resources.nodes: must be at least 1"),
    ({"resources": {"time": "tomorrow"}}, "resources.time: must be a Slurm time"),
    ({"offload": "optimizer"}, "offload: only zero2 and zero3 offload"),
    ({"overrides": {"training.max_stepz": 3}}, "overrides.training.max_stepz: not a recipe field"),
    ({"overrides": {"training.max_steps": "many"}}, "overrides.training.max_steps: must be an int (got many)"),
    ({"overrides": {"distributed.strategy": "ddp"}}, "overrides.distributed.strategy: set by the manifest"),
    ({"env": {"A": [1, 2]}}, "env.A: must be a string, number or boolean"),
    ({"resources": {"gpus": 1}}, "resources.gpus: not a manifest field"),
    ({"recipe": "no-such-preset"}, "recipe: no-such-preset is neither a recipe file nor a preset"),
    ({"resourcez": {"nodes": 1}}, "resourcez: not a manifest field"),
    ({"resources": {"nodes": 2}, "slurm": {"script": "single-node"}}, "slurm.script: single-node cannot run"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_manifest_field_is_one_line_error(
    change: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = {"recipe": "tiny", "output": str(tmp_path / "out"), **change}
    code = main(["launch", str(_manifest(tmp_path / "m.yaml", **manifest)), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("flux2-lora: error: "), err
    assert message in err, err
    assert not (tmp_path / "out" / "launch").exists()


def test_bad_manifest_from_the_command_line_has_no_traceback(tmp_path: Path) -> None:
    m = _manifest(tmp_path / "m.yaml", recipe="tiny", output=str(tmp_path / "o"), resources={"gpus_per_node": -1})
    res = run_cli("launch", str(m), "--dry-run")
    assert res.returncode == 2
    assert res.stderr.strip() == "flux2-lora: error: resources.gpus_per_node: must be 0 or more (got -1)"


# ----------------------------------------------------------------------------------- local 2 "nodes"
@pytest.mark.slow
@pytest.mark.cluster
def test_two_node_local_launch_trains_one_lora(tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    """2 machine ranks x 1 CPU process on localhost, rendezvous over TCP. SIGUSR1 to `flux2-lora launch` makes
    both ranks checkpoint and stop (exit 75); launching again resumes and exports one LoRA."""
    out = tmp_path / "run"
    m = _manifest(
        tmp_path / "m.yaml",
        recipe="tiny",
        output=str(out),
        overrides={"training.max_steps": 60, "output.checkpoint_every": 60, **TINY_FAST},
        resources={"nodes": 2, "processes_per_node": 1},
        main_port=_free_port(),
        env={"OMP_NUM_THREADS": 1},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flux2_lora", "launch", str(m)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert first.stdout is not None
    lines: list[str] = []
    for line in first.stdout:
        lines.append(line)
        if "train:" in line:  # the loop runs on both ranks: ask them to stop
            first.send_signal(signal.SIGUSR1)
            break
    lines += first.stdout.readlines()
    text = "".join(lines)
    assert first.wait(timeout=120) == 75, text[-4000:]
    runs = [ln for ln in lines if ln.startswith("run: ")]
    assert len(runs) == 2 and "--machine_rank 0" in runs[0] and "--machine_rank 1" in runs[1]
    assert "[node 0] " in text and "[node 1] " in text
    assert "stopped at step" in text and (out / "checkpoints" / "latest").exists()
    assert not (out / "lora.safetensors").exists()

    res = run_cli("launch", str(m))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from " in res.stdout
    state = json.loads((out / "checkpoints" / "step-60" / "state.json").read_text())
    assert state["world_size"] == 2
    assert res.stdout.count("saved " + str(out / "lora.safetensors")) == 1  # one LoRA, from rank 0
    assert len(load_file(str(out / "lora.safetensors"))) > 0


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.parametrize(
    "strategy",
    ["zero2", "fsdp", "zero3"],
)
def test_rendered_strategy_configs_train(strategy: str, tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    """The rendered accelerate config (and DeepSpeed JSON) as accelerate launch reads them: 2 CPU processes train."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    m = _manifest(
        tmp_path / "m.yaml",
        recipe="tiny",
        output=str(out),
        overrides={"training.max_steps": 4, "output.checkpoint_every": 0, **TINY_FAST},
        resources={"processes_per_node": 2},
        strategy=strategy,
        main_port=_free_port(),
        env={"OMP_NUM_THREADS": 1},
    )
    res = run_cli("launch", str(m))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"dist  {strategy} over 2 processes" in res.stdout
    assert len(load_file(str(out / "lora.safetensors"))) > 0


# --------------------------------------------------------------------------------------------- Slurm
@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        install()
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        cluster.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm here: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()


def _slurm_manifest(tmp_path: Path, script: str, steps: int, every: int) -> tuple[Path, Path]:
    out = tmp_path / "run"
    m = _manifest(
        tmp_path / "m.yaml",
        recipe="tiny",
        output=str(out),
        overrides={"training.max_steps": steps, "output.checkpoint_every": every, **TINY_FAST},
        resources={"nodes": 1, "processes_per_node": 2, "cpus_per_task": 2},
        backend="slurm",
        main_port=_free_port(),
        env={"OMP_NUM_THREADS": 1},
        slurm={"script": script, "job_name": f"t-{script}", "signal_seconds": 0},
    )
    return m, out


def _render(m: Path, out: Path) -> Path:
    res = run_cli("launch", str(m), "--dry-run")
    assert res.returncode == 0, res.stderr
    return out / "launch" / "job.sbatch"


def _log(out: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((out / "launch").glob("slurm-*.out")))


def _wait_log(out: Path, after: str, text: str, timeout: float = 240) -> None:
    """Wait until `text` shows in the Slurm log after the last `after` (e.g. the loop started in attempt 2)."""
    deadline = time.monotonic() + timeout
    while text not in _log(out).rpartition(after)[2] or after not in _log(out):
        assert time.monotonic() < deadline, f"no {text!r} after {after!r} in {timeout} s:\n{_log(out)[-3000:]}"
        time.sleep(0.2)


def _usr1_and_requeue(slurm: SlurmCluster, job: str, out: Path) -> None:
    """SIGUSR1 to the batch shell only, as `--signal=B:USR1@T` sends it before the time limit, once the loop runs
    (its signal handler is in place); then wait for the requeued attempt to start training."""
    _wait_log(out, "attempt 1 ", "train:")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env, check=True)
    _wait_log(out, "attempt 2 ", "train:")
    log = _log(out)
    assert "stopped at step" in log and "received SIGUSR1" in log and "requeueing job" in log, log[-3000:]
    assert int(slurm.state(job)["Restarts"]) == 1


@pytest.mark.slow
@pytest.mark.cluster
def test_slurm_usr1_checkpoints_requeues_and_resumes(
    slurm: SlurmCluster, tmp_path: Path, tiny_dev: Path, sample_data: Path
) -> None:
    """single-node.sbatch, 2 CPU processes: SIGUSR1 makes both trainers checkpoint and stop, the script requeues
    the job, and the next attempt resumes from the checkpoint and writes the LoRA."""
    m, out = _slurm_manifest(tmp_path, "single-node", steps=100, every=50)
    job = slurm.sbatch(_render(m, out))
    _usr1_and_requeue(slurm, job, out)
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), 240)
    log = _log(out)
    assert info["JobState"] == "COMPLETED", log[-3000:] + slurm._logs()
    assert "resumed from " in log.rpartition("attempt 2 ")[2] and "launcher exit code 0" in log
    state = json.loads((out / "checkpoints" / "step-100" / "state.json").read_text())
    assert state["world_size"] == 2
    assert len(load_file(str(out / "lora.safetensors"))) > 0


@pytest.mark.slow
@pytest.mark.cluster
def test_slurm_multi_node_script_requeues_then_cancelled_job_resumes_when_resubmitted(
    slurm: SlurmCluster, tmp_path: Path, tiny_dev: Path, sample_data: Path
) -> None:
    """multi-node.sbatch (srun, one launcher per node; here 1 node x 2 processes): SIGUSR1 reaches the trainers
    through `scancel --signal=USR1` on the job's steps and the job requeues itself; then a plain `scancel`
    (SIGTERM) of the second attempt checkpoints without requeueing, and the job submitted again resumes."""
    m, out = _slurm_manifest(tmp_path, "multi-node", steps=200, every=50)
    script = _render(m, out)
    assert "srun --ntasks-per-node=1" in script.read_text()
    job = slurm.sbatch(script)
    _usr1_and_requeue(slurm, job, out)
    subprocess.run(["scancel", job], env=slurm.env, check=True)
    info = slurm.wait(job, ("CANCELLED", "COMPLETED", "FAILED"), 120)
    assert info["JobState"] == "CANCELLED", _log(out)[-3000:]
    assert _log(out).count("requeueing job") == 1  # a user's scancel is not a preemption
    assert not (out / "lora.safetensors").exists()
    again = slurm.sbatch(script)
    info = slurm.wait(again, ("COMPLETED", "FAILED", "CANCELLED"), 240)
    log = _log(out)
    assert info["JobState"] == "COMPLETED", log[-3000:] + slurm._logs()
    assert log.count("resumed from ") == 2 and "srun exit code 0" in log
    state = json.loads((out / "checkpoints" / "step-200" / "state.json").read_text())
    assert state["world_size"] == 2
    assert len(load_file(str(out / "lora.safetensors"))) > 0


def test_slurm_templates_are_valid_bash_with_a_settings_block() -> None:
    for script in sorted((REPO / "launch" / "slurm").glob("*.sbatch")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
        text = script.read_text()
        assert "# ---- settings" in text and "# ---- end settings" in text
        resume = "--resume" if script.stem == "ray-sweep" else "--resume latest"  # a sweep resumes as a whole
        assert resume in text and "scontrol requeue" in text and "#SBATCH --requeue" in text


# ------------------------------------------------------------------------------------------- sweeps
def test_dry_run_of_a_sweep_on_each_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """command: tune renders launch/slurm/ray-sweep.sbatch (slurm), a Ray job that joins the cluster (ray), or the
    tune command itself (local); no accelerate config, since each trial is one process."""
    out = tmp_path / "out"
    stdout = _dry_run(MANIFESTS / "slurm-tune-2nodes.yaml", out, capsys)
    script = out / "launch" / "job.sbatch"
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not (out / "launch" / "accelerate_config.yaml").exists()
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@300"):
        assert f"#SBATCH {line}\n" in text
    assert "TUNE_ARGS=(--trials 64 --max-steps 500 --gpus-per-trial 1 --concurrent 16)" in text
    assert "RECIPE_ARGS=(--preset character --data.dataset /shared/data/me-cache" in text
    assert "RAY_AUTH_MODE=token" in text and "ray.scripts.scripts start" in text
    assert "-m flux2_lora tune" in stdout and "--ray-address" in stdout

    ray = _manifest(
        tmp_path / "ray.yaml", recipe="tiny", output=str(tmp_path / "r"), command="tune", backend="ray",
        tune_args=["--trials", "8"], ray={"address": "http://head:8265"},
    )  # fmt: skip
    stdout = _dry_run(ray, tmp_path / "r", capsys)
    run = next(ln for ln in stdout.splitlines() if ln.startswith("run: ray job submit"))
    assert " -- python -m flux2_lora tune --preset tiny --output " in run and run.endswith("--ray-address auto")

    local = _manifest(tmp_path / "local.yaml", recipe="tiny", output=str(tmp_path / "l"), command="tune")
    stdout = _dry_run(local, tmp_path / "l", capsys)
    assert f"-m flux2_lora tune --preset tiny --output {tmp_path / 'l'}" in stdout
    (tmp_path / "l" / "sweep.json").write_text("{}")  # a sweep already there is resumed
    assert f"--output {tmp_path / 'l'} --resume" in _dry_run(local, tmp_path / "l", capsys)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"command": "tune", "tune_args": ["--output", "x"]}, "tune_args: --output is set by the launcher"),
        ({"command": "tune", "strategy": "fsdp"}, "strategy: a sweep runs each trial as one process"),
        ({"tune_args": ["--trials", "4"]}, "tune_args: only with command: tune"),
    ],
)
def test_sweep_manifest_errors(fields: dict[str, object], message: str, tmp_path: Path) -> None:
    m = _manifest(tmp_path / "m.yaml", recipe="tiny", output=str(tmp_path / "o"), **fields)
    res = run_cli("launch", str(m), "--dry-run")
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.cluster
def test_slurm_ray_sweep(slurm: SlurmCluster, tmp_path: Path, tiny_dev: Path, sample_data: Path) -> None:
    """ray-sweep.sbatch on the local Slurm cluster: the job starts a Ray head with token auth, runs a 2-trial sweep
    against it, stops Ray and completes; the sweep's outputs are in OUTPUT."""
    out = tmp_path / "sweep"
    m = _manifest(
        tmp_path / "m.yaml", recipe="tiny", output=str(out), command="tune", backend="slurm",
        overrides={"model.name_or_path": str(tiny_dev), "data.dataset": str(sample_data)},
        tune_args=["--trials", "2", "--concurrent", "2", "--max-steps", "4", "--report-every", "2"],
        resources={"nodes": 1, "cpus_per_task": 2}, main_port=_free_port(),
        slurm={"job_name": "t-ray-sweep", "signal_seconds": 0},
    )  # fmt: skip
    job = slurm.sbatch(_render(m, out))
    info = slurm.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), 600)
    log = _log(out)
    assert info["JobState"] == "COMPLETED", log[-4000:] + slurm._logs()
    assert "Ray head" in log and "driver exit code 0" in log
    trials = json.loads((out / "trials_data.json").read_text())
    assert len(trials) == 2 and all(t["state"] in ("completed", "pruned") for t in trials)
    assert (out / "best_config.yaml").exists()
    assert (out / "ray-auth-token").stat().st_mode & 0o077 == 0  # the token is readable by its owner only
