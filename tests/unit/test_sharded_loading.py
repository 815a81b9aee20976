"""Sharded loading of the frozen transformer, the parts that need no second process: which strategies load sharded,
which quantized bases each strategy refuses (one line), the meta-device structure of the non-main processes under
fsdp, the LoRA they get before prepare(), the DDP broadcast leaving torchao tensors out, and the weight-file map."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from flux2_lora.config import Recipe
from flux2_lora.distributed import (
    QUANTIZE_REFUSED,
    _meta_transformer,
    _weight_files,
    check_quantize_strategy,
    frozen_bytes,
    place_for_prepare,
    shards_at_load,
)
from flux2_lora.model import ModelError, ModelSource, add_lora, count_parameters


def test_only_fsdp_and_zero3_with_shard_base_on_several_processes_load_sharded() -> None:
    assert shards_at_load("fsdp", True, 2) and shards_at_load("zero3", True, 8)
    assert not shards_at_load("fsdp", False, 2) and not shards_at_load("zero3", True, 1)
    assert not any(shards_at_load(s, True, 2) for s in ("ddp", "zero2", "single"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
@pytest.mark.parametrize("quantize", ["int8", "fp8", "nf4"])
def test_a_quantized_base_is_refused_in_one_line_where_the_strategy_cannot_train_it(
    strategy: str, quantize: str
) -> None:
    recipe = Recipe()
    recipe.model.quantize = quantize  # type: ignore[assignment]
    if quantize not in QUANTIZE_REFUSED.get(strategy, ()):
        check_quantize_strategy(recipe, strategy)
        return
    with pytest.raises(ModelError) as e:
        check_quantize_strategy(recipe, strategy)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"model.quantize: {quantize} cannot be trained with")
    assert f"distributed.strategy: {strategy}" in msg and "use strategy ddp" in msg
    recipe.model.quantize = "none"
    check_quantize_strategy(recipe, strategy)


def test_int8_is_refused_by_every_strategy_but_ddp() -> None:
    assert [s for s in ("ddp", "fsdp", "zero2", "zero3") if "int8" not in QUANTIZE_REFUSED.get(s, ())] == ["ddp"]


def _src(tiny_dev: Path) -> ModelSource:
    return ModelSource(tiny_dev, "dev", (10, 20, 30), "Flux2Pipeline")


def test_a_non_main_fsdp_process_builds_the_transformer_on_meta_and_gets_a_real_lora(tiny_dev: Path) -> None:
    from diffusers import Flux2Transformer2DModel

    whole = Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer", torch_dtype=torch.bfloat16)
    meta = _meta_transformer(_src(tiny_dev), torch.bfloat16)
    shapes = {n: (p.shape, p.dtype) for n, p in whole.named_parameters()}
    assert {n: (p.shape, p.dtype) for n, p in meta.named_parameters()} == shapes  # the main process's layout
    assert all(p.is_meta and not p.requires_grad for p in meta.parameters())
    torch.manual_seed(0)
    add_lora(meta, 4, 4, 0.0, "attention+single", "default", False)
    state = torch.get_rng_state()
    torch.manual_seed(0)
    add_lora(whole.requires_grad_(False), 4, 4, 0.0, "attention+single", "default", False)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG stays in step with the main process
    assert count_parameters(meta) == count_parameters(whole)
    acc = SimpleNamespace(
        num_processes=2, is_main_process=False, device=torch.device("cpu"), distributed_type=DistributedType.FSDP
    )
    place_for_prepare(meta, acc, "fsdp")
    lora = [p for p in meta.parameters() if p.requires_grad]
    assert lora and all(not p.is_meta and p.dtype == torch.float32 for p in lora)
    assert len({p.data_ptr() for p in lora}) == len(lora)  # accelerate maps optimizer params by storage
    assert all(p.is_meta for p in meta.parameters() if not p.requires_grad)  # the base waits for the broadcast
    held, total = frozen_bytes(meta)
    assert held == 0 and total == sum(p.numel() * 2 for p in whole.parameters() if not p.requires_grad)


def test_ddp_leaves_torchao_tensors_out_of_its_broadcast(tiny_dev: Path) -> None:
    from flux2_lora.model import load_transformer

    model = load_transformer(_src(tiny_dev), torch.float32, "cpu", quantize="int8")
    add_lora(model, 4, 4, 0.0, "attention", "default", False)
    acc = SimpleNamespace(
        num_processes=2, is_main_process=True, device=torch.device("cpu"), distributed_type=DistributedType.MULTI_CPU
    )
    place_for_prepare(model, acc, "ddp")
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    quantized = {n for n, p in model.named_parameters() if type(p).__module__.startswith("torchao")}
    assert quantized and ignored == quantized  # the LoRA and the unquantized layers are still synchronised


def test_weight_files_map_every_tensor_of_a_sharded_checkpoint(tmp_path: Path, tiny_dev: Path) -> None:
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer")
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    index = json.loads(next(tmp_path.glob("*.index.json")).read_text())
    files = _weight_files(tmp_path)
    assert set(files) == set(model.state_dict()) and len(set(files.values())) > 1
    assert {n: f.name for n, f in files.items()} == index["weight_map"]
    assert set(_weight_files(tiny_dev / "transformer")) == set(model.state_dict())  # one file, no index
