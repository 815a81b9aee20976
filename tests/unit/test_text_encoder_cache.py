"""The cache stage's text encoder: where it runs (model.text_encoder_device), quantized while loading
(model.text_encoder_quantize), what that does to the embeddings and the cache key, and the one-line errors.

No GPU here: placement on a GPU is decided from a reported free memory (monkeypatched) before anything loads, so the
decision is tested with a CUDA device object that is never touched; int8 runs for real on the CPU.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from flux2_lora.config import ModelArgs, Recipe, RecipeError, validate
from flux2_lora.data import cache as cache_mod
from flux2_lora.data.cache import (
    CacheIndex,
    build_cache,
    check_settings,
    open_text_encoder,
    place_text_encoder,
    settings_for,
)
from flux2_lora.data.folder import DataError
from flux2_lora.memory import GiB, text_encoder_bytes
from flux2_lora.model import ModelError, resolve_model
from flux2_lora.quant import QuantizationError
from tests.conftest import first_images

# Relative L2 error ||e_int8 - e_fp32|| / ||e_fp32|| of each prompt's embedding. Observed 0.005-0.008 on the tiny
# dev and klein encoders (bf16 weights instead of fp32 differ by ~0.011, for comparison).
INT8_EMBED_TOL = 0.03
PROMPTS = ["a photo of a cat", "", "sks dog on the beach, watercolor"]
CUDA = torch.device("cuda", 0)  # a device object only: nothing here allocates on it


@pytest.fixture(scope="module")
def dev_src(tiny_dev: Path) -> Any:
    return resolve_model(ModelArgs(name_or_path=str(tiny_dev)))


def _embed(src: Any, quantize: str) -> torch.Tensor:
    from flux2_lora.flow import encode_prompts

    te, tok = open_text_encoder(src, torch.float32, torch.device("cpu"), quantize)
    return encode_prompts(src.family, te, tok, PROMPTS, src.text_layers, 64)


# --------------------------------------------------------------------------------------------- placement


def test_placement_follows_the_recipe_and_the_reported_free_memory(
    dev_src: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    weights, act = text_encoder_bytes(dev_src.path / "text_encoder", 2, "none", cache_mod.TEXT_BATCH, 512)
    need = 1.05 * weights + act + GiB
    free = {"bytes": 80 * GiB}
    asked: list[torch.device] = []

    def fake_free(device: torch.device) -> int:
        asked.append(device)
        return int(free["bytes"])

    monkeypatch.setattr(cache_mod, "gpu_free_bytes", fake_free)

    def place(choice: str, quantize: str = "none") -> torch.device:
        return place_text_encoder(choice, dev_src, CUDA, torch.bfloat16, quantize, 512)

    # Forced: the CPU, without asking the GPU anything; `gpu` keeps it on the GPU whatever is free.
    assert place("cpu") == torch.device("cpu") and place("cpu", "int8") == torch.device("cpu")
    assert asked == []
    free["bytes"] = 1
    assert place("gpu") == CUDA and asked == []
    # auto: the GPU when it fits, the CPU with one warning line naming the sizes when it does not.
    free["bytes"] = int(need) + 1
    with caplog.at_level(logging.WARNING):
        assert place("auto") == CUDA
    assert not caplog.records and asked == [CUDA]
    free["bytes"] = int(need) - 1
    with caplog.at_level(logging.WARNING):
        assert place("auto") == torch.device("cpu")
    (rec,) = caplog.records
    msg = rec.getMessage()
    assert msg.startswith("model.text_encoder_device: auto: the text encoder needs ~") and "\n" not in msg
    assert "GiB free, so it runs on the CPU" in msg and "model.text_encoder_quantize: int8 or nf4" in msg
    caplog.clear()
    # int8 counts its linears at ~1 byte: what does not fit at bf16 fits quantized.
    w8, _ = text_encoder_bytes(dev_src.path / "text_encoder", 2, "int8", cache_mod.TEXT_BATCH, 512)
    free["bytes"] = int(1.05 * w8 + act + GiB) + 1
    assert place("auto", "int8") == CUDA
    # nf4 only runs on a GPU: auto keeps it there (with a warning when it may not fit).
    free["bytes"] = 1
    with caplog.at_level(logging.WARNING):
        assert place("auto", "nf4") == CUDA
    assert "nf4 runs on the GPU although" in caplog.records[0].getMessage()
    # Without a GPU the CPU is the only place; asking for the GPU there is a one-line error.
    cpu = torch.device("cpu")
    assert place_text_encoder("auto", dev_src, cpu, torch.float32, "none", 512) == cpu
    with pytest.raises(ModelError, match=r"^model\.text_encoder_device: gpu, but there is no CUDA GPU here"):
        place_text_encoder("gpu", dev_src, cpu, torch.float32, "none", 512)


def test_text_encoder_size_is_read_from_the_file_headers(dev_src: Any) -> None:
    te, _ = open_text_encoder(dev_src, torch.float32, torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in te.parameters())  # forced onto the CPU: every weight is there
    exact = sum(p.numel() for p in te.parameters())
    folder = dev_src.path / "text_encoder"
    fp32, act = text_encoder_bytes(folder, 4, "none", 8, 64)
    assert fp32 == 4 * exact and act > 0
    assert text_encoder_bytes(folder, 2, "none", 8, 64)[0] == 2 * exact
    linears = sum(
        m.weight.numel() for n, m in te.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )
    int8, _ = text_encoder_bytes(folder, 4, "int8", 8, 64)
    assert int8 == pytest.approx(4 * (exact - linears) + linears * (1 + 4 / 4096))


# --------------------------------------------------------------------------------------------- int8 / nf4


def test_int8_text_encoder_embeddings_are_close_to_full_precision(dev_src: Any, tiny_klein: Path) -> None:
    pytest.importorskip("torchao")
    te, _ = open_text_encoder(dev_src, torch.float32, torch.device("cpu"), "int8")
    kinds = {n: type(m.weight).__name__ for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("lm_head") == "Parameter"  # the output head (unused by the embeddings) stays as it is
    assert set(kinds.values()) == {"Int8Tensor"}
    assert type(te.model.language_model.embed_tokens.weight).__name__ == "Parameter"
    klein = resolve_model(ModelArgs(name_or_path=str(tiny_klein)))
    for src in (dev_src, klein):
        full, int8 = _embed(src, "none"), _embed(src, "int8")
        assert full.shape == int8.shape and int8.dtype == full.dtype
        rel = [float((a - b).norm() / a.norm()) for a, b in zip(full, int8, strict=True)]
        assert all(0 < r < INT8_EMBED_TOL for r in rel), (src.family, rel)


def test_nf4_on_the_cpu_fails_in_one_line_before_anything_loads(
    dev_src: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("loaded or read before the nf4 check")

    monkeypatch.setattr(cache_mod, "load_text_encoder", never)
    monkeypatch.setattr(cache_mod, "load_vae", never)
    recipe = Recipe()
    recipe.model.text_encoder_quantize = "nf4"
    settings = settings_for(dev_src, recipe)
    with pytest.raises(QuantizationError) as e:
        build_cache(tmp_path / "cache", settings, never, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert msg.startswith("model.text_encoder_quantize: nf4 (bitsandbytes 4-bit) needs a CUDA GPU") and "\n" not in msg
    assert "model.text_encoder_quantize: int8" in msg
    assert not (tmp_path / "cache").exists()
    # The recipe refuses nf4 with the text encoder forced onto the CPU before any command runs.
    recipe.model.text_encoder_device = "cpu"
    with pytest.raises(RecipeError, match=r"^model\.text_encoder_quantize: nf4 \(bitsandbytes\) needs the text enc"):
        validate(recipe, need_data=False)


def test_data_cache_cli_refuses_nf4_on_the_cpu_in_one_line(
    tiny_dev: Path, sample_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flux2_lora.cli import main

    rc = main(["data", "cache", "--preset", "tiny", "--dataset", str(sample_data), "--output", str(tmp_path / "c"),
               "--model.text_encoder_quantize", "nf4"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flux2-lora: error: model.text_encoder_quantize: nf4") and "\n" not in err
    rc = main(["data", "cache", "--preset", "tiny", "--dataset", str(sample_data), "--output", str(tmp_path / "c"),
               "--model.text_encoder_device", "tpu"])  # fmt: skip
    assert rc != 0 and "text_encoder_device" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the cache key


def test_quantization_is_part_of_the_cache_settings_and_placement_is_not(dev_src: Any, tmp_path: Path) -> None:
    plain, int8 = Recipe(), Recipe()
    int8.model.text_encoder_quantize = "int8"
    on_cpu = Recipe()
    on_cpu.model.text_encoder_device = "cpu"
    s_plain, s_int8, s_cpu = (settings_for(dev_src, r) for r in (plain, int8, on_cpu))
    assert s_cpu == s_plain and s_cpu.digest("x") == s_plain.digest("x")
    assert s_int8.digest("x") != s_plain.digest("x")
    # The default is left out of index.json: caches made before the field existed keep their digest and match.
    assert "text_encoder_quantize" not in s_plain.to_json() and s_int8.to_json()["text_encoder_quantize"] == "int8"
    old = CacheIndex(tmp_path, s_plain.to_json(), [], [])
    check_settings(old, s_plain)
    with pytest.raises(
        DataError, match=r"stale cache \(text_encoder_quantize: cache has 'none', recipe wants 'int8'\)"
    ):
        check_settings(old, s_int8)
    with pytest.raises(DataError, match=r"text_encoder_quantize: cache has 'int8', recipe wants 'none'"):
        check_settings(CacheIndex(tmp_path, s_int8.to_json(), [], []), s_plain)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_cache_made_with_an_int8_text_encoder_on_the_cpu_trains(
    tiny_dev: Path, sample_data: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torchao")
    from flux2_lora.cli import main, parse_train
    from flux2_lora.train import Trainer

    data = first_images(sample_data, tmp_path / "mini", 4)
    flags = ["--preset", "tiny", "--model.text_encoder_quantize", "int8", "--model.text_encoder_device", "cpu"]
    cache = tmp_path / "cache"
    assert main(["data", "cache", *flags, "--dataset", str(data), "--output", str(cache)]) == 0
    index = json.loads((cache / "index.json").read_text())
    assert index["settings"]["text_encoder_quantize"] == "int8"
    recipe, _ = parse_train(
        [*flags, "--output", str(tmp_path / "run"), "--dataset", str(cache), "--steps", "2",
         "--validation.prompts", "[]", "--validation.every_n_steps", "0", "--logging.log_every", "1",
         "--output.checkpoint_every", "0"]
    )  # fmt: skip
    trainer = Trainer(recipe)
    trainer.setup()
    trainer.fit()
    losses = [
        json.loads(ln)["loss"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln
    ]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert (tmp_path / "run" / "lora.safetensors").exists()
    # The same cache with a recipe that encodes in full precision is refused, naming the setting.
    plain, _ = parse_train(["--preset", "tiny", "--output", str(tmp_path / "run2"), "--dataset", str(cache)])
    with pytest.raises(DataError, match=r"text_encoder_quantize: cache has 'int8', recipe wants 'none'"):
        check_settings(cache_mod.read_index(cache), settings_for(resolve_model(plain.model), plain))
