"""Shards as the one data path: same result as the folder, exactly-once split, stale caches, unsafe tars."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from flux2_lora.config import ModelArgs, Recipe
from flux2_lora.data.cache import build_cache, read_index, settings_for
from flux2_lora.data.folder import DataError, scan_folder
from flux2_lora.data.shards import iter_folder_samples, iter_raw_samples
from flux2_lora.data.stream import CachedBatches, batches_per_rank
from flux2_lora.model import resolve_model
from tests.conftest import run_cli

RUN = ["--preset", "tiny", "--steps", "12", "--validation.every_n_steps", "0", "--validation.prompts", "[]"]


def _ok(res: object) -> None:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory: pytest.TempPathFactory, sample_data: Path) -> Path:
    out = tmp_path_factory.mktemp("raw") / "shards"
    _ok(
        run_cli(
            "data",
            "shard",
            "--dataset",
            str(sample_data),
            "--output",
            str(out),
            "--shard-size",
            "5",
            "--min-resolution",
            "64",
        )
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar", "data-000001.tar", "data-000002.tar"]
    return out


def test_training_from_shards_equals_training_from_the_folder(
    tmp_path: Path, tiny_dev: Path, sample_data: Path, raw_shards: Path
) -> None:
    runs = {
        "folder": str(sample_data),
        "brace": str(raw_shards / "data-{000000..000002}.tar"),
        "pipe": f"pipe:cat {raw_shards}/data-{{000000..000002}}.tar",
    }
    loras = {}
    for name, spec in runs.items():
        _ok(run_cli("train", *RUN, "--dataset", spec, "--output", str(tmp_path / name)))
        loras[name] = load_file(str(tmp_path / name / "lora.safetensors"))
    # And from a cache folder made by `data cache` from the shards.
    cache = tmp_path / "cache"
    _ok(run_cli("data", "cache", "--preset", "tiny", "--shards", str(raw_shards), "--output", str(cache)))
    _ok(run_cli("train", *RUN, "--dataset", str(cache), "--output", str(tmp_path / "cached")))
    loras["cached"] = load_file(str(tmp_path / "cached" / "lora.safetensors"))
    ref = loras["folder"]
    for name, lora in loras.items():
        for k in ref:
            assert torch.equal(ref[k], lora[k]), (name, k)


def test_a_stale_cache_is_refused_with_the_difference_named(tmp_path: Path, tiny_dev: Path, raw_shards: Path) -> None:
    cache = tmp_path / "cache"
    _ok(run_cli("data", "cache", "--preset", "tiny", "--shards", str(raw_shards), "--output", str(cache)))
    res = run_cli("train", *RUN, "--dataset", str(cache), "--output", str(tmp_path / "run"), "--data.resolution", "48")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "stale cache" in lines[0] and "resolution: cache has 64, recipe wants 48" in lines[0]


@pytest.fixture(scope="module")
def three_shard_cache(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path, sample_data: Path) -> Path:
    recipe = Recipe()
    recipe.model.name_or_path = str(tiny_dev)
    recipe.model.max_sequence_length = 64
    recipe.data.resolution = 64
    recipe.data.holdout = 2
    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    items = scan_folder(sample_data)
    out = tmp_path_factory.mktemp("cache3") / "c"
    build_cache(
        out,
        settings_for(src, recipe),
        lambda: iter_folder_samples(items, sample_data),
        torch.device("cpu"),
        torch.float32,
        shard_size=4,
    )
    return out


def test_two_ranks_two_workers_three_shards_see_every_sample_once(three_shard_cache: Path) -> None:
    index = read_index(three_shard_cache)
    assert [len(s.samples) for s in index.train] == [4, 4, 2]  # 3 shards for 2 x 2 = 4 slots: one slot is empty
    everything = sorted(k for s in index.train for k, _, _ in s.samples)
    for epoch in (0, 1):
        seen: list[str] = []
        per_rank = []
        for rank in (0, 1):
            ds = CachedBatches(index, batch_size=2, seed=3, rank=rank, world=2, shuffle_buffer=3)
            ds.set_epoch(epoch)
            batches = list(DataLoader(ds, batch_size=None, num_workers=2))
            per_rank.append(len(batches))
            for b in batches:
                assert b["latents"].shape[0] == len(b["keys"]) <= 2
                seen += b["keys"]
        assert sorted(seen) == everything  # every sample exactly once per epoch, across ranks and workers
        assert per_rank == batches_per_rank(index, 2, 2, 2)  # the count the loop plans with, without reading data


def test_persistent_workers_follow_the_epoch(three_shard_cache: Path) -> None:
    # Workers started once (persistent) must see set_epoch() of the main process: the same batches per epoch
    # as workers started afresh for each epoch.
    index = read_index(three_shard_cache)

    def fresh(epoch: int) -> list[str]:
        ds = CachedBatches(index, batch_size=1, seed=3, shuffle_buffer=4)
        ds.set_epoch(epoch)
        return [k for b in DataLoader(ds, batch_size=None, num_workers=2) for k in b["keys"]]

    ds = CachedBatches(index, batch_size=1, seed=3, shuffle_buffer=4)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    for epoch in (0, 1, 2):
        ds.set_epoch(epoch)
        assert [k for b in loader for k in b["keys"]] == fresh(epoch)


def test_order_is_seeded_by_epoch_and_identical_on_reread(three_shard_cache: Path) -> None:
    index = read_index(three_shard_cache)

    def keys(epoch: int) -> list[str]:
        ds = CachedBatches(index, batch_size=1, seed=3, shuffle_buffer=4)
        ds.set_epoch(epoch)
        return [k for b in DataLoader(ds, batch_size=None, num_workers=2) for k in b["keys"]]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1) and sorted(keys(0)) == sorted(keys(1))


def _tar_with(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("name", "reason"),
    [("../escape.txt", "escapes the shard"), ("/abs/x.txt", "escapes the shard"), ("a.exe", "has extension 'exe'")],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, name: str, reason: str) -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    bad = _tar_with(tmp_path / "bad.tar", {"ok.png": png.getvalue(), "ok.txt": b"a caption", name: b"x"})
    with pytest.raises(DataError, match=reason):
        list(iter_raw_samples(str(bad)))
    res = run_cli("train", *RUN, "--dataset", str(bad), "--output", str(tmp_path / "run"))
    assert res.returncode == 2 and reason in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "escape.txt").exists()


def test_fixed_corpus_trains(tmp_path: Path, tiny_dev: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`data validate --fix` on the broken corpus gives a folder that trains (and validate names its errors)."""
    from tests.unit.test_validate import MAX_PIXELS, make_corpus

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)
    root = tmp_path / "broken"
    make_corpus(root, tmp_path / "outside")
    fixed = tmp_path / "fixed"
    res = run_cli("data", "validate", "--dataset", str(root), "--fix", str(fixed), "--min-resolution", "64")
    assert res.returncode == 1 and "ERROR" in res.stdout and "Traceback" not in res.stderr + res.stdout
    assert (fixed / "FIXES.txt").exists()
    shutil.rmtree(tmp_path / "outside", ignore_errors=True)
    _ok(run_cli("train", *RUN, "--steps", "3", "--dataset", str(fixed), "--output", str(tmp_path / "run")))
