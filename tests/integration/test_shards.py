"""Shards as the one data path: same result as the folder, exactly-once split, stale caches, unsafe tars."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from flux2_lora.config import ModelArgs, Recipe
from flux2_lora.data.cache import CacheIndex, build_cache, read_cached_shard, read_index, settings_for
from flux2_lora.data.folder import DataError, scan_folder
from flux2_lora.data.shards import iter_folder_samples, iter_raw_samples
from flux2_lora.data.stream import CachedSamples, GlobalBatches, RankBatchSampler, collate
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


def _rank_batches(
    index: CacheIndex, rank: int, world: int, accum: int, steps: int, workers: int = 0
) -> list[dict[str, Any]]:
    """A rank's micro-batches for `steps` optimizer steps of global batches of 4, through a DataLoader."""
    plan = GlobalBatches(index, 4, seed=3)
    loader = DataLoader(
        CachedSamples(index),
        batch_sampler=RankBatchSampler(plan, rank, world, accum),
        collate_fn=collate,
        num_workers=workers,
    )
    return list(itertools.islice(iter(loader), steps * accum))


def test_ranks_and_workers_read_the_same_global_batches_as_one_process(three_shard_cache: Path) -> None:
    index = read_index(three_shard_cache)
    assert [len(s.samples) for s in index.train] == [4, 4, 2]  # 3 shards for 2 ranks x 2 workers
    steps = GlobalBatches(index, 4, seed=3).steps_per_epoch * 2
    one = _rank_batches(index, 0, 1, 1, steps)  # one process, batch 4
    two = [_rank_batches(index, r, 2, 2, steps, workers=2) for r in (0, 1)]  # 2 processes x batch 1 x accumulation 2
    for step in range(steps):
        whole = one[step]
        parts = [b for r in (0, 1) for b in two[r][step * 2 : step * 2 + 2]]
        real = sorted(k for b in parts for k, w in zip(b["keys"], b["weights"].tolist(), strict=True) if w > 0)
        assert real == sorted(whole["keys"])
        assert len({b["latents"].shape[1:] for b in parts} | {whole["latents"].shape[1:]}) == 1  # one bucket
    # DataLoader workers do not change what a rank trains.
    assert [b["keys"] for b in _rank_batches(index, 1, 2, 2, steps)] == [b["keys"] for b in two[1]]


def test_a_rank_reads_only_its_own_samples_at_their_offsets(
    three_shard_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux2_lora.data import stream

    index = read_index(three_shard_cache)
    reads: list[tuple[int, int]] = []
    real_pread = stream.os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        reads.append((size, offset))
        return real_pread(fd, size, offset)

    monkeypatch.setattr(stream.os, "pread", pread)
    batches = _rank_batches(index, 1, 2, 1, GlobalBatches(index, 4, seed=3).steps_per_epoch)
    entries = {e.key: e for e in index.samples()}
    wanted = [(entries[k].size, entries[k].offset) for b in batches for k in b["keys"]]
    assert reads == wanted  # one positioned read per sample this rank trains, nothing else
    shard_bytes = sum((three_shard_cache / s.url).stat().st_size for s in index.train)
    assert sum(size for size, _ in reads) < 0.7 * shard_bytes
    # What it read is what the shard holds for that sample.
    by_key = {s["key"]: s for info in index.train for s in read_cached_shard(str(three_shard_cache / info.url))}
    for b in batches:
        for j, k in enumerate(b["keys"]):
            assert torch.equal(b["latents"][j], by_key[k]["latents"])
            assert torch.equal(b["prompt_embeds"][j], by_key[k]["prompt_embeds"])


def test_a_cache_without_recorded_offsets_finds_them_in_the_tar_headers(
    three_shard_cache: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(three_shard_cache, old)
    d = json.loads((old / "index.json").read_text())
    for part in ("train", "val"):
        for shard in d[part]:
            shard["samples"] = [x[:3] for x in shard["samples"]]  # the layout before offsets were recorded
    (old / "index.json").write_text(json.dumps(d))
    assert list(read_index(old).samples()) == list(read_index(three_shard_cache).samples())


def test_a_changed_shard_is_a_one_line_error_naming_it(three_shard_cache: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(three_shard_cache, broken)
    index = read_index(broken)
    first = index.samples()[0]
    with open(broken / first.url, "r+b") as f:
        f.seek(first.offset)
        f.write(b"\xff" * 16)  # the safetensors header of the first sample is gone
    with pytest.raises(DataError, match=f"{first.url}.*{first.key}.*rebuild it"):
        CachedSamples(index).read(0)


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
