"""A cache folder is checked against its index.json: a lying index or a damaged file is one line, never a traceback.

One small cache (the 12 sample images at the tiny preset's settings: 10 training samples in shards of 3, 3, 3 and 1,
2 held out) is built per module; each test corrupts a copy of it. Training samples by shard (key, bucket):
  train-000000.tar  000 48x80, 002 64x64, 003 64x64
  train-000001.tar  004 80x48, 005 64x64, 006 64x64
  train-000002.tar  007 64x64, 008 48x80, 009 64x64
  train-000003.tar  011 64x64
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flux2_lora.cli import main, parse_train
from flux2_lora.data.cache import (
    CacheCorrupt,
    CacheIndex,
    ShardInfo,
    _h,
    audit_cache,
    build_cache,
    check_cache,
    prompt_embeddings,
    read_index,
    settings_for,
)
from flux2_lora.data.folder import DataError, scan_folder
from flux2_lora.data.shards import iter_folder_samples
from flux2_lora.data.stream import CachedSamples, Slot, collate
from flux2_lora.data.validate import format_report, validate_cache
from flux2_lora.model import resolve_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REBUILD = "delete the folder and rebuild it with `flux2-lora data cache`"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path, sample_data: Path) -> Path:
    recipe, _ = parse_train(["--preset", "tiny"])  # the settings `train --preset tiny --dataset CACHE` checks
    src = resolve_model(recipe.model)
    items = scan_folder(sample_data)
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(
        out,
        settings_for(src, recipe),
        lambda: iter_folder_samples(items, sample_data),
        torch.device("cpu"),
        torch.float32,
        shard_size=3,
    )
    return out


@pytest.fixture
def copy(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "c"
    shutil.copytree(cache, out)
    return out


def _edit(root: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    d = json.loads((root / "index.json").read_text())
    change(d)
    (root / "index.json").write_text(json.dumps(d))


def _refused(root: Path, *parts: str) -> str:
    """read_index's one-line CacheCorrupt: the cache folder, then each of `parts` in order, then what to do."""
    with pytest.raises(CacheCorrupt) as e:
        read_index(root)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{root}: corrupt cache: "), msg
    pos = 0
    for part in parts:
        assert part in msg[pos:], (part, msg)
        pos = msg.index(part, pos) + len(part)
    assert msg.endswith(REBUILD), msg
    return msg


def _train(root: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`flux2-lora train --preset tiny --dataset root` in-process: exit 2 and one line on stderr, which it returns."""
    code = main(["train", "--preset", "tiny", "--dataset", str(root), "--output", str(out), "--steps", "2",
                 "--validation.every_n_steps", "0", "--validation.prompts", "[]"])  # fmt: skip
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("flux2-lora: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------ a good cache


def test_a_good_cache_opens_with_a_few_reads_per_shard(cache: Path) -> None:
    index = read_index(cache, check=False)
    assert [[k for k, _, _ in s.samples] for s in index.train + index.val] == [
        ["000", "002", "003"], ["004", "005", "006"], ["007", "008", "009"], ["011"], ["001", "010"]
    ]  # fmt: skip
    reads = check_cache(index)
    assert reads <= 4 * (len(index.train) + len(index.val)), reads  # never one per sample
    report = validate_cache(cache)
    assert not report.problems and format_report(report) == "12 samples: 12 ok, 0 errors, 0 warnings"


# ------------------------------------------------------------------------------------------ index.json


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"version": 1, "settings": {', "not valid JSON (Expecting"),
        (bytes(range(256)) * 4, "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got a list"),
    ],
    ids=["invalid", "random-bytes", "empty", "a-list"],
)
def test_an_index_that_is_not_json_is_one_line(copy: Path, content: bytes, reason: str) -> None:
    (copy / "index.json").write_bytes(content)
    _refused(copy, "index.json: ", reason)


def test_a_truncated_index_is_one_line(copy: Path) -> None:
    raw = (copy / "index.json").read_bytes()
    (copy / "index.json").write_bytes(raw[: len(raw) // 2])
    _refused(copy, "index.json: not valid JSON")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change setting d[a][b]... (path `a.b.0.c`) to value, or deleting it when value is DELETE."""

    def change(d: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parents:
            d = d[p]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value

    return change


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("train", 5, "train: expected a non-empty list of shards, got 5 (a number)"),
        ("val", [], "val: expected a non-empty list of shards, got a list"),
        ("version", 2, "version: cache version 2 is not 1"),
        ("version", True, "version: cache version True is not 1"),
        ("settings", "x", 'settings: expected an object, got "x" (a string)'),
        ("settings.max_sequence_length", "64", "settings.max_sequence_length: expected a whole number > 0, got"),
        ("settings.buckets", [[64, 60]], "settings.buckets: expected a list of [width, height] pairs, multiples of 16"),
        ("settings.random_flip", 0, "settings.random_flip: expected true or false, got 0 (a number)"),
        ("settings.text_layers", None, "settings.text_layers: expected a list of layer numbers, got null"),
        ("train.0", "train-000000.tar", 'train[0]: expected a shard {"url": ..., "samples": [...]}, got'),
        ("train.0.url", 7, "train[0].url: expected the name of a .tar file in the cache folder, got 7"),
        ("train.0.url", "../../x.tar", "train[0].url: expected the name of a .tar file"),
        ("train.1.url", "train-000000.tar", "train[1].url: train-000000.tar is listed twice"),
        ("train.0.samples", {}, "train[0].samples: expected a non-empty list of samples, got an object"),
        ("train.0.samples.1", "002", "train[0].samples[1]: expected [key, width, height, offset, size]"),
        ("train.0.samples.1.0", 2, "train[0].samples[1]: the key must be a non-empty string, got 2 (a number)"),
        ("train.0.samples.2.1", "64", 'train[0].samples[2]: the width must be a whole number, got "64" (a string)'),
        ("train.0.samples.2.3", 3584.0, "train[0].samples[2]: the offset must be a whole number, got 3584.0"),
        ("val.0.samples.0.4", None, "val[0].samples[0]: the size must be a whole number, got null"),
    ],
)
def test_wrong_types_anywhere_in_the_index_are_one_line(copy: Path, path: str, value: Any, reason: str) -> None:
    _edit(copy, _set(path, value))
    _refused(copy, "index.json: ", reason)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("version", "no 'version' key"),
        ("settings", "no 'settings' key"),
        ("val", "no 'val' key"),
        ("settings.buckets", "settings: no 'buckets' key"),
        ("train.0.samples", "train[0]: no 'samples' key"),
        ("val.0.url", "val[0]: no 'url' key"),
    ],
)
def test_missing_keys_are_one_line(copy: Path, path: str, reason: str) -> None:
    _edit(copy, _set(path, DELETE))
    _refused(copy, "index.json: ", reason)


def test_a_bad_index_stops_training_in_one_line(copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(copy, _set("train", 5))
    line = _train(copy, tmp_path / "run", capsys)
    assert f"{copy}: corrupt cache: index.json: train: expected a non-empty list of shards, got 5" in line
    assert line.endswith(REBUILD)


# ------------------------------------------------------------------------------------------ an index that lies


def test_more_samples_listed_than_the_shard_holds_is_refused_before_training(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tester's case: 30 samples claimed for a shard of 3 (steps past the real ones trained on nothing)."""

    def claim_30(d: dict[str, Any]) -> None:
        rows = d["train"][0]["samples"]
        last = rows[-1]
        rows += [[f"fake{i}", last[1], last[2], last[3] + (i + 1) * 17408, last[4]] for i in range(30 - len(rows))]

    _edit(copy, claim_30)
    _refused(copy, "train-000000.tar, sample 'fake0': ", "past the end of the shard")
    line = _train(copy, tmp_path / "run", capsys)
    assert "train-000000.tar, sample 'fake0'" in line and "past the end of the shard" in line and REBUILD in line
    report = validate_cache(copy)
    assert format_report(report).splitlines()[-1].startswith("39 samples: 12 ok, 28 errors")
    assert any("index.json lists 30 samples in it, the shard holds 3" in p.reason for p in report.problems)


def test_listed_samples_sharing_bytes_are_refused(copy: Path) -> None:
    def duplicate(d: dict[str, Any]) -> None:  # a second key for the bytes of the middle sample
        rows = d["train"][0]["samples"]
        rows.insert(2, ["copy", *rows[1][1:]])

    _edit(copy, duplicate)
    _refused(copy, "train-000000.tar, sample ", "index.json gives it the same bytes as sample ")


def test_entries_in_the_padding_after_the_last_sample_are_refused(copy: Path) -> None:
    """Small made-up entries that fit in the file (its zero padding after the tar's end)."""

    def pad(d: dict[str, Any]) -> None:
        rows = d["train"][0]["samples"]
        end = rows[-1][3] + rows[-1][4]
        rows.append(["ghost", rows[-1][1], rows[-1][2], (end + 511) // 512 * 512 + 1536, 64])

    _edit(copy, pad)
    _refused(copy, "train-000000.tar, sample 'ghost': ", "no tar member's data starts at its offset")


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "middle", "last"])
def test_fewer_samples_listed_than_the_shard_holds_is_refused(copy: Path, which: int) -> None:
    d = json.loads((copy / "index.json").read_text())
    dropped = d["train"][0]["samples"].pop(which)[0]
    (copy / "index.json").write_text(json.dumps(d))
    _refused(copy, f"train-000000.tar, sample {dropped!r}: in the shard ", "but not in index.json")
    assert any(p.key == dropped and "not in index.json" in p.reason for p in audit_cache(copy)[0])


def test_a_sample_offset_that_is_off_is_refused(copy: Path) -> None:
    _edit(copy, _set("train.1.samples.2.3", 38400 + 512))  # still inside the file, not where the member's data is
    _refused(copy, "train-000001.tar, sample '006': ", "no tar member's data starts at its offset 38912")
    assert any(p.key == "006" and "index.json puts it at bytes 38912.." in p.reason for p in audit_cache(copy)[0])


def test_a_bucket_that_is_not_the_samples_is_refused(copy: Path) -> None:
    _edit(copy, _set("train.0.samples.0", ["000", 64, 64, 3584, 13400]))  # 000 is 48x80
    msg = _refused(copy, "train-000000.tar, sample '000': index.json lists it as 64x64")
    assert "its latents are 16x5x3 (a 48x80 sample)" in msg
    assert [(p.key, p.reason.split(",")[0]) for p in audit_cache(copy)[0]] == [("000", "index.json lists it as 64x64")]


def test_a_bucket_the_cache_does_not_have_is_refused(copy: Path) -> None:
    _edit(copy, _set("train.1.samples.1.1", 32))
    _refused(copy, "train-000001.tar, sample ", "index.json lists it as 32x", "not one of the cache's buckets")


def test_a_size_that_does_not_fit_the_bucket_is_refused(copy: Path) -> None:
    """A middle sample (its header is not read on opening) whose size is not its bucket's."""
    _edit(copy, _set("train.1.samples.1.4", 13400))
    _refused(
        copy, "train-000001.tar, sample '005': index.json gives it 13400 bytes, a 64x64 sample of this cache has 13464"
    )


def test_a_swapped_bucket_of_the_same_size_is_found_by_validate_and_when_read(copy: Path) -> None:
    """48x80 listed as 80x48 (same byte size) in the middle of a shard: not read on opening, but `data validate`
    finds it, and so does the read that would train it."""
    _edit(copy, _set("train.2.samples.1", ["008", 80, 48, 20992, 13400]))  # 008 is 48x80
    problems = audit_cache(copy)[0]
    assert [(p.file, p.key) for p in problems] == [("train-000002.tar", "008")], problems
    assert problems[0].reason.startswith("index.json lists it as 80x48, whose latents are C x 3 x 5; its latents are")
    index = read_index(copy)  # not read on opening
    k = [e.key for e in index.samples()].index("008")
    with pytest.raises(
        CacheCorrupt, match="train-000002.tar, sample '008': index.json lists it as 80x48, but its latents are 16x5x3"
    ):
        CachedSamples(index).read(k)


@pytest.mark.parametrize(
    ("tensors", "reason"),
    [
        ({"latents": ("F32", [16, 4, 4]), "prompt_embeds": ("F32", [64, 48])}, "it holds tensors ['latents', 'pro"),
        (
            {"latents": ("F32", [16, 4, 4]), "latents_flip": ("F32", [16, 4, 5]), "prompt_embeds": ("F32", [64, 48])},
            "its latents_flip are 16x4x5, its latents 16x4x4",
        ),
        (
            {"latents": ("F32", [8, 4, 4]), "latents_flip": ("F32", [8, 4, 4]), "prompt_embeds": ("F32", [64, 48])},
            "its latents have 8 channels, the other samples' 16",
        ),
        (
            {"latents": ("F32", [16, 4, 4]), "latents_flip": ("F32", [16, 4, 4]), "prompt_embeds": ("F32", [32, 48])},
            "its prompt_embeds are 32x48, this cache's are 64x48",
        ),
        (
            {"latents": ("BF16", [16, 4, 4]), "latents_flip": ("F32", [16, 4, 4]), "prompt_embeds": ("F32", [64, 48])},
            "its latents are BF16, the other samples' F32",
        ),
    ],
    ids=["no-flip", "flip-shape", "channels", "sequence", "dtype"],
)
def test_what_a_sample_of_a_flipped_cache_must_hold(tensors: dict[str, Any], reason: str) -> None:
    from flux2_lora.data.cache_check import _Bad, _Expect

    expect = _Expect(seq=64, flip=True, buckets={(64, 64)}, dim=48)
    good = {"latents": ("F32", [16, 4, 4]), "latents_flip": ("F32", [16, 4, 4]), "prompt_embeds": ("F32", [64, 48])}
    expect.tensors(good, 64, 64)  # learns 16 channels and the dtypes
    with pytest.raises(_Bad, match=reason.replace("[", r"\[")):
        expect.tensors(tensors, 64, 64)


def test_a_key_listed_twice_is_refused(copy: Path) -> None:
    d = json.loads((copy / "index.json").read_text())
    key = d["train"][0]["samples"][0][0]
    d["train"][1]["samples"][1][0] = key
    (copy / "index.json").write_text(json.dumps(d))
    with pytest.raises(CacheCorrupt, match=f"sample '{key}'") as e:
        read_index(copy)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ damaged files


def test_a_truncated_shard_is_one_line(copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shard = copy / "train-000001.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    _refused(copy, "train-000001.tar, sample ", "past the end of the shard", "the shard is truncated")
    line = _train(copy, tmp_path / "run", capsys)
    assert "train-000001.tar" in line and "truncated" in line
    problems = audit_cache(copy)[0]
    assert problems and all(p.file == "train-000001.tar" for p in problems)


def test_a_truncated_validation_shard_is_one_line(copy: Path) -> None:
    shard = copy / "val-000000.tar"
    os.truncate(shard, 5000)
    _refused(copy, "val-000000.tar, sample ", "past the end of the shard")


def test_a_missing_shard_is_one_line(copy: Path) -> None:
    (copy / "train-000000.tar").unlink()
    _refused(copy, "train-000000.tar: the shard file is missing (index.json lists 3 samples in it)")
    assert format_report(validate_cache(copy)).splitlines()[-1].startswith("12 samples: 9 ok, 1 error")


def test_random_bytes_in_a_shard_header_are_one_line(copy: Path) -> None:
    with open(copy / "train-000000.tar", "r+b") as f:
        f.write(os.urandom(512))  # the first sample's first tar header
    _refused(copy, "train-000000.tar", "no valid tar header at byte 0", "(the shard is damaged)")


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "missing", "empty"])
def test_a_damaged_extra_safetensors_is_one_line(copy: Path, damage: str) -> None:
    path = copy / "extra.safetensors"
    if damage == "truncated":
        os.truncate(path, path.stat().st_size - 100)
    elif damage == "random-bytes":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"")
    msg = _refused(copy, "extra.safetensors: ")
    assert ("the file is missing" in msg) == (damage == "missing")
    with pytest.raises(CacheCorrupt, match="extra.safetensors: cannot be read"):
        read_index(copy, check=False).extra()


def test_a_damaged_extra_safetensors_stops_training_in_one_line(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.truncate(copy / "extra.safetensors", 100)
    line = _train(copy, tmp_path / "run", capsys)
    assert f"{copy}: corrupt cache: extra.safetensors: " in line and line.endswith(REBUILD)


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "other-prompts"])
def test_damaged_prompt_embeddings_are_one_line(copy: Path, damage: str) -> None:
    from safetensors.torch import save_file

    prompts = ["sks a red circle", "sks a blue square"]
    path = copy / f"prompts-{_h(json.dumps(prompts))[:16]}.safetensors"
    save_file({f"prompt.{j}": torch.zeros(64, 48) for j in range(2)}, str(path))
    index = read_index(copy)
    assert len(prompt_embeddings(index, prompts, torch.device("cpu"), torch.float32)) == 2  # read from the cache
    if damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "random-bytes":
        path.write_bytes(os.urandom(path.stat().st_size))
    else:
        save_file({"prompt.0": torch.zeros(64, 48)}, str(path))
    with pytest.raises(DataError) as e:
        prompt_embeddings(index, prompts, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: corrupt sample-prompt embeddings: ")
    assert msg.endswith("delete this file and the next run computes it again")
    if damage != "other-prompts":
        problems = audit_cache(copy)[0]
        assert [p.file for p in problems] == [path.name], problems


def test_a_shard_changed_after_opening_is_one_line_from_a_dataloader_worker(copy: Path) -> None:
    index = read_index(copy)
    first = index.samples()[0]
    with open(copy / first.url, "r+b") as f:
        f.seek(first.offset)
        f.write(b"\xff" * 16)
    loader = DataLoader(CachedSamples(index), sampler=[Slot(0, 1.0, 0)], collate_fn=collate, num_workers=1)
    with pytest.raises(DataError) as e:
        next(iter(loader))  # type: ignore[call-overload]
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{copy}: corrupt cache: {first.url}, sample {first.key!r}: "), msg


# ------------------------------------------------------------------------------------------ what to do


def test_a_runs_own_cache_says_that_deleting_it_rebuilds_it(cache: Path, tmp_path: Path) -> None:
    own = tmp_path / "run" / "cache" / "0123456789abcdef"
    shutil.copytree(cache, own)
    os.truncate(own / "train-000000.tar", 4096)
    with pytest.raises(CacheCorrupt) as e:
        read_index(own)
    assert str(e.value).endswith("delete this folder and the next run rebuilds it")
    assert str(e.value).startswith(f"{own}: corrupt cache: train-000000.tar, sample ")


def test_data_validate_on_a_cache_lists_every_problem(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "validate", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == "12 samples: 12 ok, 0 errors, 0 warnings"
    d = json.loads((copy / "index.json").read_text())
    d["train"][0]["samples"][0][0] = "renamed"  # listed but not in the shard, and its real key unlisted
    (copy / "index.json").write_text(json.dumps(d))
    os.truncate(copy / "train-000001.tar", 20000)
    code = main(["data", "validate", str(copy)])
    out, err = capsys.readouterr()
    assert code == 1 and err == "" and "Traceback" not in out
    lines = out.strip().splitlines()
    assert all(line.startswith(f"ERROR   {copy}/train-00000") for line in lines[:-1]), lines
    assert any("sample 'renamed': listed in index.json but not in the shard" in line for line in lines)
    shard = f"ERROR   {copy}/train-000001.tar: "
    assert (
        f"{shard}the file ends at byte 20000, inside a tar member's headers (truncated): the shard is damaged " in out
    )
    assert any("sample '006': listed in index.json but not in the shard (which is damaged" in line for line in lines)
    assert lines[-1].startswith("12 samples: 9 ok, ") and lines[-1].endswith(f"the cache is corrupt: {REBUILD}")
    assert main(["data", "validate", "--dataset", str(copy)]) == 1  # the same as --dataset
    capsys.readouterr()
    assert main(["data", "validate", str(copy), "--fix", str(copy.parent / "fixed")]) == 2
    assert "cannot be fixed" in capsys.readouterr().err


def test_a_cache_without_recorded_offsets_holding_an_unlisted_sample_is_refused(copy: Path) -> None:
    def old_layout(d: dict[str, Any]) -> None:
        for part in ("train", "val"):
            for shard in d[part]:
                shard["samples"] = [x[:3] for x in shard["samples"]]
        d["train"][0]["samples"].pop()

    _edit(copy, old_layout)
    _refused(copy, "train-000000.tar, sample ", "in the shard but not in index.json (the shard holds 3 samples")


# ------------------------------------------------------------------------------------------ cost


def test_opening_a_large_index_reads_per_shard_not_per_sample(tmp_path: Path, cache: Path) -> None:
    """8 shards of 100 copies of one real sample: opening reads a few blocks per shard, whatever their samples."""
    import webdataset as wds

    index = read_index(cache)
    e = index.samples()[0]
    with tarfile.open(cache / e.url) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}  # type: ignore[union-attr]
    sample = {"safetensors": members[f"{e.key}.safetensors"], "json": members[f"{e.key}.json"]}
    root = tmp_path / "big"
    root.mkdir()
    shutil.copy(cache / "extra.safetensors", root)
    shards = []
    for j, name in enumerate([f"train-{j:06d}.tar" for j in range(8)] + ["val-000000.tar"]):
        with wds.TarWriter(str(root / name)) as w:
            for i in range(100):
                w.write({"__key__": f"s{j}_{i}", **sample})
        with tarfile.open(root / name) as tf:  # the offsets index.json records, from the tar headers
            offsets = [(m.offset_data, m.size) for m in tf if m.name.endswith(".safetensors")]
        shards.append(ShardInfo(name, [(f"s{j}_{i}", *e.bucket) for i in range(100)], offsets))
    big = CacheIndex(root, index.settings, shards[:-1], shards[-1:])
    reads = check_cache(big)
    assert reads <= 4 * len(shards), reads
    assert len(big.samples()) == 800 and np.all(big.samples().size == e.size)
