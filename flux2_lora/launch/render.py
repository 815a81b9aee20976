"""The files a launch writes under OUTPUT/launch/: the accelerate config for the plan's layout and strategy, the
DeepSpeed JSON (zero2/zero3), and the Slurm batch script rendered from a launch/slurm/ template.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError
from ..resources import launch_dir
from .plan import Plan, recipe_args

SLURM_DIR = launch_dir() / "slurm"  # the batch-script templates (inside the installed package, or the checkout's)
_SETTINGS_BEGIN = "# ---- settings"
_SETTINGS_END = "# ---- end settings"


def accelerate_config(p: Plan) -> dict[str, Any]:
    """The accelerate config (what `accelerate config` would write) for the plan's layout and strategy."""
    m = p.manifest
    cpu = m.resources.gpus_per_node == 0 and m.strategy in ("ddp", "fsdp")  # see make_plan(): not for DeepSpeed
    if m.strategy == "zero2" or m.strategy == "zero3":
        dist = "DEEPSPEED"
    elif m.strategy == "fsdp":
        dist = "FSDP"
    else:
        dist = "MULTI_GPU" if p.world_size > 1 else "NO"
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": dist,
        "num_machines": p.nodes,
        "num_processes": p.world_size,
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": p.mixed_precision,
        "use_cpu": cpu,
        "gpu_ids": "all",
        "downcast_bf16": "no",
        "rdzv_backend": "static",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if p.nodes > 1 or p.world_size > 1:
        cfg["main_process_port"] = m.main_port
    if p.nodes > 1:
        cfg["main_process_ip"] = "127.0.0.1"  # every launch passes the real one (--main_process_ip)
    if p.deepspeed_json is not None:
        cfg["deepspeed_config"] = {
            "deepspeed_config_file": str(p.deepspeed_json),
            # One launcher per node started by us (srun, or a loop on localhost), not DeepSpeed's pdsh runner.
            "deepspeed_multinode_launcher": "standard",
            # The trainer loads the frozen transformer itself (straight to its device) and ZeRO-3 partitions it
            # in prepare(); zero.Init at load time would also partition the cache stage's text encoder.
            "zero3_init_flag": False,
        }
    if m.strategy == "fsdp":
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": "Flux2TransformerBlock,Flux2SingleTransformerBlock",
            "fsdp_reshard_after_forward": m.shard_base,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_activation_checkpointing": False,
        }
    return cfg


def deepspeed_config(p: Plan) -> dict[str, Any]:
    """DeepSpeed JSON for zero2/zero3: concrete values from the recipe; `train_batch_size` is left to accelerate."""
    m = p.manifest
    stage = 3 if m.strategy == "zero3" else 2
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    if m.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": m.resources.gpus_per_node > 0}
    if stage == 3:
        if m.offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": m.resources.gpus_per_node > 0}
        # Full 16-bit weights on save: the LoRA is exported whole from rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": "auto",  # accelerate: micro batch x accumulation x processes
        "train_micro_batch_size_per_gpu": p.batch_size,
        "gradient_accumulation_steps": p.accumulation,
        "gradient_clipping": p.max_grad_norm,
        "bf16": {"enabled": p.mixed_precision == "bf16"},
        "fp16": {"enabled": p.mixed_precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000_000,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def _settings_block(p: Plan, script: str) -> list[str]:
    """The template's settings block filled in: the script's own variables, then the environment and setup lines."""
    m = p.manifest
    q = shlex.quote

    def array(name: str, args: list[str]) -> str:
        return f"{name}=(" + " ".join(q(a) for a in args) + ")"

    if script == "ray-sweep":
        own = [f"RAY_PORT={m.main_port}", f"MAX_RESTARTS={m.slurm.max_restarts}",
               array("RECIPE_ARGS", recipe_args(m)), array("TUNE_ARGS", m.tune_args)]  # fmt: skip
    else:
        own = [f"ACCELERATE_CONFIG={q(str(p.accelerate_config))}", f"MAIN_PORT={m.main_port}",
               f"MAX_RESTARTS={m.slurm.max_restarts}", array("LAUNCH_ARGS", p.launch_args()),
               array("TRAIN_ARGS", p.train_args)]  # fmt: skip
    return [
        f"{_SETTINGS_BEGIN}: written by `flux2-lora launch`; edit them to use this script by hand ----",
        f"PYTHON={q(p.python)}",
        f"OUTPUT_DIR={q(str(p.out))}",
        *own,
        *(f"export {k}={q(v)}" for k, v in p.env.items()),
        *m.slurm.setup,
        f"{_SETTINGS_END} ----",
    ]


def _sbatch_lines(p: Plan, script: str) -> list[str]:
    m, r = p.manifest, p.manifest.resources
    log = m.slurm.log or str(p.launch_dir / "slurm-%j.out")
    lines = [
        f"--job-name={m.slurm.job_name}",
        f"--nodes={p.nodes}",
    ]
    if script in ("multi-node", "ray-sweep"):
        lines.append("--ntasks-per-node=1")  # one accelerate launcher per node starts the node's processes
    else:
        lines.append("--ntasks=1")
    optional = {"gpus-per-node": r.gpus_per_node, "cpus-per-task": r.cpus_per_task, "mem": r.mem, "time": r.time,
                "partition": r.partition, "account": r.account}  # fmt: skip
    lines += [f"--{flag}={value}" for flag, value in optional.items() if value]
    lines += [f"--output={log}", "--open-mode=append", "--requeue"]
    if m.slurm.signal_seconds:
        lines.append(f"--signal=B:USR1@{m.slurm.signal_seconds}")
    lines += list(m.slurm.sbatch_args)
    return ["#SBATCH " + ln for ln in lines]


def slurm_script_name(p: Plan) -> str:
    if p.manifest.command == "tune":
        return "ray-sweep"
    s = p.manifest.slurm.script
    return ("single-node" if p.nodes == 1 else "multi-node") if s == "auto" else s


def render_sbatch(p: Plan, template_dir: Path = SLURM_DIR) -> str:
    """The launch/slurm/ template with its #SBATCH header and settings block replaced."""
    name = slurm_script_name(p)
    template = (template_dir / f"{name}.sbatch").read_text().splitlines()
    out: list[str] = []
    in_settings = header_done = False
    for line in template:
        if line.startswith("#SBATCH"):
            if not header_done:
                out += _sbatch_lines(p, name)
                header_done = True
            continue
        if line.startswith(_SETTINGS_BEGIN):
            in_settings = True
            out += _settings_block(p, name)
            continue
        if in_settings:
            in_settings = not line.startswith(_SETTINGS_END)
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def write_files(p: Plan) -> dict[str, Path]:
    """Write the plan's files (which ones: by command and backend); a folder that cannot be written is a one-line
    UsageError naming `output`."""
    try:
        return _write_files(p)
    except OSError as e:
        raise UsageError(f"output: cannot write {p.launch_dir} ({e.strerror or e})") from None


def _write_files(p: Plan) -> dict[str, Path]:
    p.launch_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if p.manifest.command == "train":  # a sweep's trials are single processes: no accelerate config
        files["accelerate_config"] = p.accelerate_config
        p.accelerate_config.write_text(yaml.safe_dump(accelerate_config(p), sort_keys=False))
    if p.deepspeed_json is not None:
        p.deepspeed_json.write_text(json.dumps(deepspeed_config(p), indent=2) + "\n")
        files["deepspeed"] = p.deepspeed_json
    if p.manifest.backend == "slurm":
        path = p.launch_dir / "job.sbatch"
        path.write_text(render_sbatch(p))
        path.chmod(0o755)
        files["sbatch"] = path
    return files
