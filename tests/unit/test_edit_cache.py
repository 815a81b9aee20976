"""An editing dataset through the cache stage: references encoded as the pipeline encodes `image=` inputs, cached
beside the target, grouped by reference sizes, read back by position, checked on open; raw shards give the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux2_lora.cli import parse_train
from flux2_lora.data.cache import CacheCorrupt, build_cache, dataset_source, read_index, settings_for
from flux2_lora.data.folder import scan_folder
from flux2_lora.data.shards import write_raw_shards
from flux2_lora.data.stream import CachedSamples, GlobalBatches, Slot, collate
from flux2_lora.flow import encode_images, reference_pixels
from flux2_lora.model import load_vae, resolve_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _folder(root: Path) -> Path:
    """9 targets of 64x64: 3 without references, 3 with one 64x64, 3 with a 64x64 and a 96x64 one."""
    root.mkdir(parents=True)
    for i in range(9):
        Image.new("RGB", (64, 64), (20 * i, 100, 50)).save(root / f"t{i}.png")
        (root / f"t{i}.txt").write_text(f"edit number {i}")
        for n, size in enumerate([(64, 64), (96, 64)][: i // 3]):
            Image.new("RGB", size, (10 * i, 30 * n, 200)).save(root / f"t{i}_ref{n}.png")
    return root


def _cache(spec: str, out: Path, holdout: int = 0) -> Path:
    recipe, _ = parse_train(["--preset", "tiny", "--data.holdout", str(holdout), "--data.random_flip", "true"])
    src = resolve_model(recipe.model)
    samples, _ = dataset_source(spec, None)
    build_cache(out, settings_for(src, recipe), samples, torch.device("cpu"), torch.float32, shard_size=4)
    return out


@pytest.fixture(scope="module")
def edit(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("edit")
    folder = _folder(base / "data")
    return folder, _cache(str(folder), base / "cache")


def test_references_are_cached_as_the_pipeline_encodes_them(edit: tuple[Path, Path], tiny_dev: Path) -> None:
    folder, cache = edit
    index = read_index(cache)
    table = index.samples()
    by_key = {table[i].key: table[i] for i in range(len(table))}
    assert by_key["t0"].references == () and by_key["t4"].references == ((64, 64),)
    assert by_key["t8"].references == ((64, 64), (96, 64))
    # Three groups: the one bucket with no, one or two references.
    assert sorted(r for _, r in table.groups) == [(), ((64, 64),), ((64, 64), (96, 64))]
    item = CachedSamples(index)[Slot(next(i for i in range(len(table)) if table[i].key == "t8"), 1.0, 0)]
    vae = load_vae(resolve_model(parse_train(["--preset", "tiny"])[0].model))
    for n in range(2):
        pixels = reference_pixels(Image.open(folder / f"t8_ref{n}.png").convert("RGB"))
        torch.testing.assert_close(item["references"][n], encode_images(vae, pixels)[0], rtol=0, atol=0)
        torch.testing.assert_close(item["references_flip"][n], encode_images(vae, pixels.flip(-1))[0], rtol=0, atol=0)
    assert item["references"][1].shape[1:] == (4, 6)


def test_every_global_batch_is_one_group_and_collates(edit: tuple[Path, Path]) -> None:
    index = read_index(edit[1])
    table = index.samples()
    plan = GlobalBatches(index, 2, seed=3)
    assert len(plan.buckets) == 3 and plan.steps_per_epoch == 6  # 3 groups of 3 samples, batches of 2
    data = CachedSamples(index)
    for batch in plan.epoch(0):
        ids = [int(s) for s, _ in batch[0]]
        assert len({table.group[i] for i in ids}) == 1
        micro = collate([data[Slot(i, 1.0, 0)] for i in ids])
        assert len(micro["references"]) == len(table[ids[0]].references)
        for r in micro["references"]:
            assert r.shape[0] == len(ids)


def test_the_cache_key_changes_when_a_reference_does(edit: tuple[Path, Path], tmp_path: Path) -> None:
    folder = tmp_path / "data"
    shutil.copytree(edit[0], folder)
    _, before = dataset_source(str(folder), None)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(folder / "t4_ref0.png")
    _, after = dataset_source(str(folder), None)
    assert before != after
    (folder / "t4_ref0.png").unlink()  # t4 is now a text-to-image item
    _, gone = dataset_source(str(folder), None)
    assert gone not in (before, after)


def test_raw_shards_with_references_cache_to_the_same_tensors(edit: tuple[Path, Path], tmp_path: Path) -> None:
    folder, cache = edit
    shards = tmp_path / "shards"
    write_raw_shards(scan_folder(folder), folder, shards, shard_size=5)
    from_shards = read_index(_cache(str(shards), tmp_path / "cache"))
    a, b = read_index(cache), from_shards
    ta, tb = a.samples(), b.samples()
    assert sorted(ta.groups) == sorted(tb.groups)
    da, db = CachedSamples(a), CachedSamples(b)
    for i in range(len(ta)):
        j = tb.keys.index(ta.keys[i])
        x, y = da[Slot(i, 1.0, 0)], db[Slot(j, 1.0, 0)]
        assert len(x["references"]) == len(y["references"])
        for r, s in zip(x["references"], y["references"], strict=True):
            assert torch.equal(r, s)


def test_a_reference_tensor_that_does_not_match_the_index_is_refused_on_open(
    edit: tuple[Path, Path], tmp_path: Path
) -> None:
    copy = tmp_path / "c"
    shutil.copytree(edit[1], copy)
    d = json.loads((copy / "index.json").read_text())
    row = next(r for s in d["train"] for r in s["samples"] if len(r[5]) == 2)
    row[5][1] = [64, 96]  # a 96x64 reference listed as 64x96
    (copy / "index.json").write_text(json.dumps(d))
    with pytest.raises(CacheCorrupt, match=r"reference 1 as 64x96.*ref\.1 are") as e:
        read_index(copy)
    assert "\n" not in str(e.value)


def test_training_an_editing_lora_end_to_end(tiny_dev: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """builtin:edit with every reference option on: it trains, validates with the references, and the LoRA loads
    in Flux2Pipeline unchanged."""
    from diffusers import Flux2Pipeline

    from flux2_lora.cli import main

    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--dataset", "builtin:edit", "--output", str(out), "--steps", "6",
                 "--validation.every_n_steps", "3", "--validation.prompts", "[]", "--data.max_references", "1",
                 "--data.reference_dropout", "0.3", "--batch-size", "2"])  # fmt: skip
    log = capsys.readouterr().out
    assert code == 0, log
    assert "group(s) of bucket and reference sizes" in log and "step 6: validation loss" in log
    pipe = Flux2Pipeline.from_pretrained(tiny_dev)
    pipe.load_lora_weights(str(out / "lora.safetensors"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
