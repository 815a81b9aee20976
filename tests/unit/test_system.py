"""`flux2-lora system info | gpu | presets` and the `system` command's errors. GPU paths run on fake devices
(torch.cuda functions monkeypatched) and a fake nvidia-smi on PATH; nothing here needs a GPU."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from flux2_lora import system
from flux2_lora.cli import main
from flux2_lora.commands import system as system_commands

GIB = 2**30


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two fake CUDA devices (an H100 and an A10) and an nvidia-smi that lists them in the other order."""
    props = [
        SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * GIB, major=9, minor=0, uuid="aaaa-1111"),
        SimpleNamespace(name="NVIDIA A10", total_memory=24 * GIB, major=8, minor=6, uuid="bbbb-2222"),
    ]
    free = [70 * GIB, 20 * GIB]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], props[i].total_memory))
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU-bbbb-2222, 5, 1, 40, 60.5'\necho 'GPU-aaaa-1111, 97, 55, 71, [N/A]'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}:{__import__('os').environ['PATH']}")


def test_info_json_lists_versions_libraries_and_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(capsys, "system", "info", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["flux2_lora"] == __import__("flux2_lora").__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["torch"]["version"] == torch.__version__ and info["torch"]["cuda"] == torch.version.cuda
    for lib in ("diffusers", "transformers", "accelerate", "peft"):
        assert info["libraries"][lib]
    names = set("bitsandbytes prodigyopt torchao deepspeed webdataset ray optuna open_clip gradio wandb".split())
    assert set(info["optional"]) == names
    assert all(o["enables"] for o in info["optional"].values())
    assert info["cuda_available"] is torch.cuda.is_available()
    assert info["cpu"]["cores"] >= 1 and info["ram"]["total_bytes"] > 0


def test_info_text_names_missing_libraries_and_the_extra_to_install(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = system.package_version
    monkeypatch.setattr(system, "package_version", lambda d: None if d in ("deepspeed", "gradio") else real(d))
    rc, out, _ = run_main(capsys, "system", "info")
    assert rc == 0
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("deepspeed"))
    assert "not installed" in line and "zero2 | zero3" in line and "pip install 'flux2-lora[deepspeed]'" in line
    assert "pip install 'flux2-lora[ui]'" in out
    assert f"torch         {torch.__version__}" in out
    if not torch.cuda.is_available():
        assert "CUDA          not available: no CUDA GPU is visible" in out


def test_info_imports_no_optional_library() -> None:
    code = (
        "import sys; from flux2_lora.system import system_info; system_info(); "
        "print([m for m in ('deepspeed', 'ray', 'optuna', 'open_clip', 'gradio', 'wandb', 'bitsandbytes', "
        "'webdataset') if m in sys.modules])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_info_describes_each_gpu(capsys: pytest.CaptureFixture[str], two_gpus: None) -> None:
    rc, out, _ = run_main(capsys, "system", "info", "--json")
    gpus = json.loads(out)["gpus"]
    assert [(g["name"], g["compute_capability"], g["bf16"], g["fp8"]) for g in gpus] == [
        ("NVIDIA H100 80GB HBM3", "9.0", True, True),
        ("NVIDIA A10", "8.6", True, False),
    ]
    assert gpus[1]["total_memory_bytes"] == 24 * GIB
    rc, out, _ = run_main(capsys, "system", "info")
    assert "CUDA          available, 2 GPU(s)" in out
    assert "GPU 1: NVIDIA A10, 24.0 GiB, compute capability 8.6, bf16 yes, fp8 no" in out


def test_cudnn_versions_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    for code, text in ((8902, "8.9.2"), (90100, "9.1.0"), (None, None)):
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda c=code: c)
        assert system._cudnn_version() == text


def test_ram_without_psutil_comes_from_proc_meminfo(monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    ram = system.memory_info()
    assert ram["source"] == "/proc/meminfo" and ram["total_bytes"] > ram["available_bytes"] > 0


def test_gpu_shows_live_memory_and_nvidia_smi_utilisation_by_uuid(
    capsys: pytest.CaptureFixture[str], two_gpus: None
) -> None:
    rc, out, _ = run_main(capsys, "system", "gpu")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("GPU 0 NVIDIA H100 80GB HBM3:   10.0 GiB used,   70.0 GiB free of 80.0 GiB ( 12%)")
    assert "utilisation 97%" in lines[0] and "71 C" in lines[0] and " W" not in lines[0]  # power [N/A]
    assert "utilisation 5%" in lines[1] and "60 W" in lines[1]
    rc, out, _ = run_main(capsys, "system", "gpu", "--json")
    snap = json.loads(out)
    assert snap["cuda_available"] is True
    assert [(g["used_bytes"], g["free_bytes"], g["utilization_percent"]) for g in snap["gpus"]] == [
        (10 * GIB, 70 * GIB, 97.0),
        (4 * GIB, 20 * GIB, 5.0),
    ]


def test_gpu_without_nvidia_smi_still_shows_memory(
    capsys: pytest.CaptureFixture[str], two_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    rc, out, _ = run_main(capsys, "system", "gpu")
    assert rc == 0 and "GiB used" in out and "utilisation" not in out


def test_gpu_watch_refreshes_until_ctrl_c_and_exits_0(
    capsys: pytest.CaptureFixture[str], two_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []

    def sleep(s: float) -> None:  # only the command's own waits (its module's time), not other code's time.sleep
        sleeps.append(s)
        if len(sleeps) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second wait

    monkeypatch.setattr(system_commands, "time", SimpleNamespace(sleep=sleep, strftime=time.strftime))
    rc, out, err = run_main(capsys, "system", "gpu", "--watch", "0.5")
    assert rc == 0 and err == ""
    assert sleeps == [0.5, 0.5]
    assert out.count("GPU 0 NVIDIA H100") == 2 and "every 0.5 s, Ctrl-C to stop" in out


def test_gpu_without_a_gpu_says_so_in_one_line_and_exits_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = time.sleep

    def sleep(s: float) -> None:
        if threading.current_thread() is threading.main_thread():
            pytest.fail("--watch without a GPU must not loop")
        real(s)

    monkeypatch.setattr(time, "sleep", sleep)
    for argv in (["system", "gpu"], ["system", "gpu", "--watch", "1"]):
        rc, out, err = run_main(capsys, *argv)
        assert rc == 0 and err == ""
        assert len(out.splitlines()) == 1 and out.startswith("no CUDA GPU is visible")
    rc, out, _ = run_main(capsys, "system", "gpu", "--json")
    snap = json.loads(out)
    assert snap["cuda_available"] is False and snap["gpus"] == []


def test_presets_table_and_json_show_the_resolved_recipes(capsys: pytest.CaptureFixture[str]) -> None:
    from flux2_lora.cli import presets

    rc, out, _ = run_main(capsys, "system", "presets", "--json")
    assert rc == 0
    rows = {r["preset"]: r for r in json.loads(out)}
    assert set(rows) == set(presets()) >= {"base", "character", "style", "concept", "tiny"}
    tiny: dict[str, Any] = rows["tiny"]
    expect = {"model": "builtin:tiny-dev", "dtype": "fp32", "resolution": 64, "rank": 8, "alpha": 8,
              "targets": "attention+single", "lr": 5e-3, "batch_size": 1, "gradient_accumulation": 1,
              "max_steps": 200, "optimizer": "adamw", "mixed_precision": "auto", "gradient_checkpointing": False,
              "quantize": "none"}  # fmt: skip
    assert {k: tiny[k] for k in expect} == expect
    assert rows["character"]["rank"] == 128 and rows["base"]["model"] == "black-forest-labs/FLUX.2-dev"
    rc, out, _ = run_main(capsys, "system", "presets")
    header, *lines = out.splitlines()
    for col in ("preset", "model", "res", "rank/alpha", "targets", "lr", "batch x accum", "steps", "optimizer",
                "mixed prec.", "checkpointing", "quantize"):  # fmt: skip
        assert col in header
    row = next(ln for ln in lines if ln.startswith("tiny "))
    assert row.split() == ["tiny", "builtin:tiny-dev", "fp32", "64", "8/8", "attention+single", "0.005", "1", "x",
                           "1", "200", "adamw", "auto", "off", "none"]  # fmt: skip
    assert "every block" in next(ln for ln in lines if ln.startswith("character "))


def test_presets_come_from_flux2_lora_recipes_and_a_broken_one_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "mine.yaml").write_text("lora:\n  rank: 4\ntraining:\n  gradient_accumulation: 4\n")
    (tmp_path / "broken.yaml").write_text("training:\n  optimizer: sgd\n")
    monkeypatch.setenv("FLUX2_LORA_RECIPES", str(tmp_path))
    rc, out, _ = run_main(capsys, "system", "presets")
    assert rc == 0
    assert "1 x 4" in next(ln for ln in out.splitlines() if ln.startswith("mine "))
    assert f"from {tmp_path}" in out
    assert "unreadable preset broken: training.optimizer" in out
    monkeypatch.setenv("FLUX2_LORA_RECIPES", str(tmp_path / "empty"))
    rc, out, _ = run_main(capsys, "system", "presets")
    assert rc == 0 and "no presets in" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["system"], "system: missing subcommand"),
        (["system", "bogus"], "system: unknown subcommand 'bogus'; expected one of info, gpu, presets, optimize"),
        (["system", "info", "--bogus"], "--bogus"),
        (["system", "presets", "--nope", "1"], "--nope"),
        (["system", "gpu", "--watch", "soon"], "watch"),
        (["system", "gpu", "--watch", "-1"], "--watch: must be a number of seconds > 0"),
    ],
)
def test_system_errors_are_one_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    rc, out, err = run_main(capsys, *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("flux2-lora: error: ") and message in err, err


def test_system_help_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(capsys, "system", "--help")
    assert rc == 0
    for sub in ("info [--json]", "gpu [--watch SECONDS] [--json]", "presets [--json]", "optimize --preset"):
        assert sub in out
    rc, out, _ = run_main(capsys, "--help")
    for sub in ("system info", "system gpu", "system presets", "system optimize"):
        assert sub in out
