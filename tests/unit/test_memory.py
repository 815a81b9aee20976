"""The memory estimator (`system optimize`), the GPU benchmark's FLOP count, and the benchmark at toy width."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from flux2_lora.memory import KNOWN_MODELS, GiB, ModelShape, Setup, estimate, model_shape
from flux2_lora.model import lora_target_modules
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_gpu() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("targets", "depth"), [("attention", (1, 2)), ("all-linear", (2, 3))])
def test_analytic_flops_equal_torch_flop_counter(bench_gpu: ModuleType, targets: str, depth: tuple[int, int]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from flux2_lora.flow import flow_loss, latent_ids, text_ids

    cfg = bench_gpu.dev_config(True, *depth)
    b, res, text, rank = 2, 128, 16, 4
    model = bench_gpu.build(cfg, torch.device("cpu"), torch.float32, rank, targets, False)
    side = res // 16
    x = torch.randn(b, cfg["in_channels"], side, side)
    counter = FlopCounterMode(display=False)
    # The math attention kernel is made of matmuls the counter sees (the fused kernels count the same FLOPs).
    with counter, sdpa_kernel(SDPBackend.MATH):
        loss = flow_loss(
            model, x, torch.randn(b, text, cfg["joint_attention_dim"]), torch.rand(b), torch.randn_like(x),
            latent_ids(b, side, side, "cpu"), text_ids(b, text, "cpu"), torch.full((b,), 4.0),
        )  # fmt: skip
        forward = counter.get_total_flops()
        loss.backward()
    counted = bench_gpu.step_flops(cfg, b, res, text, rank, lora_target_modules(targets, depth[1]))
    assert counted["forward"] == forward
    assert counted["model"] == counter.get_total_flops()


def test_bench_gpu_runs_at_toy_width_and_the_estimator_matches_measured_peaks(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = __import__("subprocess").run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--toy", "--resolutions", "64", "--steps", "1",
         "--warmup", "1", "--text-tokens", "16", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "extrapolated to the full 8 + 48-block model" in res.stdout
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {(r["double"], r["single"], r["checkpointing"]) for r in rows} == {
        (d, s, c) for d, s in [(1, 2), (2, 2), (1, 4)] for c in (False, True)
    }
    for r in rows:
        assert r["step_s"] > 0 and r["model_tflops"] > 0 and r["flops"]["with_recompute"] > r["flops"]["model"]
        # The planner's estimate against the live tensor bytes of the real step (CPU, fp32).
        assert 0.95 <= r["estimated_bytes"] / r["peak_bytes"] <= 1.05, r
    # Checkpointing lowers the measured peak; the prediction for the full model covers both modes.
    for d, s in [(1, 2), (2, 2), (1, 4)]:
        on, off = (next(r for r in rows if (r["double"], r["single"], r["checkpointing"]) == (d, s, c)) for c in (1, 0))
        assert on["peak_bytes"] < off["peak_bytes"]
    assert {p["checkpointing"] for p in data["full_model"]} == {False, True}
    assert all(p["estimated_bytes"] > 0 for p in data["full_model"])


def test_flux2_dev_plan_without_download() -> None:
    shape = model_shape("black-forest-labs/FLUX.2-dev")
    est = estimate(shape, Setup(resolution=512, rank=16, targets="attention"))
    assert 32.0e9 < est.params["frozen"] < 32.5e9  # FLUX.2-dev's transformer: 32 B parameters
    frozen = est.parts["frozen transformer weights (bf16)"]
    assert frozen == est.params["frozen"] * 2
    # LoRA rank 16 on q/k/v/out of 8 double blocks: 8 x 4 x 16 x (6144 + 6144)
    assert est.params["lora"] == 8 * 4 * 16 * (6144 + 6144)
    assert est.parts["optimizer state (adamw)"] == est.params["lora"] * 8
    # A quantized base keeps the non-block layers at bf16 and shrinks the block linears.
    nf4 = estimate(shape, Setup(resolution=512, quantize="nf4"))
    assert 0.95 * est.params["frozen"] < nf4.params["quantized"] < est.params["frozen"]
    assert nf4.total < est.total / 3


def test_attention_is_counted_as_a_gpu_keeps_it(bench_gpu: ModuleType) -> None:
    # Flash attention keeps O(S) per head, not the S x S matrix: activations grow about linearly with tokens.
    cfg = bench_gpu.dev_config(True, 1, 2)
    shape = ModelShape("toy", "dev", cfg, 0.0, 0.0, "")
    small, large = (
        estimate(shape, Setup(resolution=r, text_tokens=16, dtype="fp32", autocast=False, gradient_checkpointing=False))
        for r in (512, 1024)
    )
    act = [next(v for k, v in e.parts.items() if k.startswith("activations")) for e in (small, large)]
    assert 3.5 < act[1] / act[0] < 4.5  # 4x the image tokens


def test_system_optimize_prints_the_breakdown_and_what_to_change(tiny_dev: Path) -> None:
    res = run_cli("system", "optimize", "--preset", "character", "--model", "black-forest-labs/FLUX.2-dev",
                  "--gpu-memory", "23.6")  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "32.22 B transformer parameters" in text
    for part in ("frozen transformer weights (bf16)", "LoRA gradients", "optimizer state (adamw)", "activations"):
        assert part in text
    with_ckpt, without = (
        float(x.split()[0]) for x in text.split("(checkpointing every block: ")[1].split("; no checkpointing: ")
    )  # both activation figures, GiB
    assert without > 10 * with_ckpt
    needed = float(text.split("training does not fit (")[1].split()[0])
    assert "this GPU (23.6 GiB): training does not fit" in text and 60 < needed < 139.8  # fits an H200
    assert "<- fits" in text.split("to fit 23.6 GiB, in this order:")[1]
    # On several GPUs: the fewest that fit with fsdp / zero3, and what each then needs.
    line = next(ln for ln in text.splitlines() if "distributed.strategy: fsdp" in ln)
    n, each = int(line.split(" with ")[1].split()[0]), float(line.split("GPUs: ")[-1].split()[0])
    assert n in (2, 4, 8, 16) and each <= 23.6
    # Too small a GPU: the changes in order, each with its new total, and an honest end when nothing fits.
    res = run_cli("system", "optimize", "--preset", "tiny", "--model.gradient_checkpointing", "false",
                  "--training.batch_size", "4", "--gpu-memory", "0.0001")  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = res.stdout
    order = ["gradient_checkpointing: true", "optimizer: adamw8bit", "batch_size: 1", "cannot fit it"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions), text


def test_system_optimize_errors_are_one_line() -> None:
    res = run_cli("system", "optimize", "--model", "nobody/not-a-model")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "nobody/not-a-model" in res.stderr and list(KNOWN_MODELS)[0] in res.stderr
    res = run_cli("system", "optimize", "--preset", "tiny", "--gpu-memory", "lots")
    assert res.returncode == 2 and "--gpu-memory: must be a number" in res.stderr


def test_sharded_plan_divides_the_state_and_gathers_two_blocks() -> None:
    import dataclasses

    shape = model_shape("black-forest-labs/FLUX.2-dev")
    one = estimate(shape, Setup(resolution=512, rank=16, targets="attention"))
    four = estimate(shape, dataclasses.replace(Setup(resolution=512, rank=16, targets="attention"), shards=4))
    frozen1 = next(v for k, v in one.parts.items() if k.startswith("frozen"))
    frozen4 = next(v for k, v in four.parts.items() if k.startswith("frozen"))
    # 1/4 of the weights plus the two largest blocks gathered whole (a double block of FLUX.2-dev is ~1.8 GiB).
    extra = frozen4 - frozen1 / 4
    assert 2 * GiB < extra < 5 * GiB, extra / GiB
    for part in ("LoRA parameters (fp32)", "LoRA gradients (fp32)", "optimizer state (adamw)"):
        assert four.parts[part] == one.parts[part] / 4
    act = [next(v for k, v in e.parts.items() if k.startswith("activations")) for e in (one, four)]
    assert act[0] == act[1]  # each GPU still runs its own batch


def test_reference_tokens_grow_the_activations_as_a_longer_sequence() -> None:
    """An editing sample's references join the sequence: one 512px reference beside a 512px target costs about
    what a target of twice the area costs (the same token count), and far more than none."""
    shape = model_shape("black-forest-labs/FLUX.2-dev")
    plain = estimate(shape, Setup(resolution=512))
    act = next(k for k in plain.parts if k.startswith("activations"))
    one_ref = estimate(shape, Setup(resolution=512, reference_tokens=32 * 32))
    assert one_ref.parts[act] > 1.5 * plain.parts[act]
    two_refs = estimate(shape, Setup(resolution=512, reference_tokens=2 * 32 * 32))
    assert two_refs.parts[act] > one_ref.parts[act]


def test_system_optimize_counts_the_datasets_references(tiny_dev: Path, tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "edit"
    data.mkdir()
    Image.new("RGB", (128, 128)).save(data / "a.png")
    (data / "a.txt").write_text("make it red")
    for n, (w, h) in enumerate([(128, 128), (320, 64), (2000, 2000)]):
        Image.new("RGB", (w, h)).save(data / f"a_ref{n}.png")
    args = ["system", "optimize", "--preset", "tiny", "--model", str(tiny_dev), "--dataset", str(data)]
    res = run_cli(*args, "--gpu-memory", "24")
    assert res.returncode == 0, res.stderr
    # 8x8 + 20x4 tokens, and the 2000x2000 one scaled to the pipeline's 1024x1024 limit: 64x64.
    assert f"{64 + 80 + 4096} reference tokens (3 reference(s)" in res.stdout
    res = run_cli(*args, "--gpu-memory", "24", "--data.max_references", "1", "--data.max_reference_pixels", "65536")
    assert "256 reference tokens (1 reference(s)" in res.stdout  # the largest one, at 256x256


def test_fp8_compute_is_counted_as_torchao_runs_it(bench_gpu: ModuleType) -> None:
    """model.fp8_compute: the weights stay at the model dtype; the simulated step runs the block linears as torchao
    Float8Linear (eager), which keeps each one's high-precision input for backward, so activations grow; a plan
    that does not fit drops it before it quantizes the base (the two do not combine)."""
    pytest.importorskip("torchao")
    import dataclasses

    from flux2_lora.config import Recipe
    from flux2_lora.system import recommendations

    shape = ModelShape("toy", "dev", bench_gpu.dev_config(True, 1, 2), 0.0, 0.0, "")
    base = Setup(resolution=256, text_tokens=16, gradient_checkpointing=False)
    plain, fp8 = estimate(shape, base), estimate(shape, dataclasses.replace(base, fp8_compute=True))
    assert plain.params == fp8.params
    assert plain.parts["frozen transformer weights (bf16)"] == fp8.parts["frozen transformer weights (bf16)"]
    act = [next(v for k, v in e.parts.items() if k.startswith("activations")) for e in (plain, fp8)]
    assert "activations (no checkpointing, 256px, batch 1, fp8 matmuls)" in fp8.parts
    assert act[1] > act[0]
    recipe = Recipe()
    recipe.model.fp8_compute = True
    assert Setup.from_recipe(recipe).fp8_compute
    steps = [text for text, _ in recommendations(shape, dataclasses.replace(base, fp8_compute=True), 1e-6)]
    fp8_step = next(i for i, t in enumerate(steps) if t.startswith("model.fp8_compute: false"))
    assert fp8_step < next(i for i, t in enumerate(steps) if t.startswith("model.quantize: int8"))
