"""Caption tag shuffle and tag dropout: variants made from (seed, key, k), K of them cached per image, one drawn per
sample and pass from (seed, pass, key), read alone, and a run that uses them resumes bitwise (data/captions.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load, load_file

from flux2_lora.cli import parse_train
from flux2_lora.data import captions as captions_mod
from flux2_lora.data.cache import (
    CacheCorrupt,
    audit_cache,
    build_cache,
    dataset_source,
    full_caption,
    read_index,
    settings_for,
)
from flux2_lora.data.captions import TagRules, caption_variant, caption_variants, split_tags
from flux2_lora.data.stream import CachedSamples, Slot, collate
from flux2_lora.draws import choose_caption_variant, sample_seed
from flux2_lora.errors import RecipeError
from flux2_lora.model import resolve_model
from flux2_lora.train import Trainer
from tests.conftest import reset_accelerate

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

K = 3
SHUFFLED = ["--data.caption_shuffle", "true", "--data.caption_variants", str(K), "--data.holdout", "0"]
CAPTIONS = [
    "a red circle, blue background, small, centered, soft light",
    "sks, green square, white background, large, sharp",  # the trigger as a tag: not repeated
    "a yellow triangle on a black background",  # no commas: one tag
    "purple star, grey background, tiny, left, noisy, bright",
    "orange ring, teal background, medium",
    "cyan cross, pink background, right, dim",
]


# ---------------------------------------------------------------------------------------- the variant function
def test_a_variant_keeps_the_first_tags_in_place_and_the_trigger_first() -> None:
    caption = "woman, red hair, smiling, outdoors, blue dress, sunny, bokeh"
    rules = TagRules(shuffle=True, keep_tokens=2)
    seen = set()
    for k in range(50):
        v = caption_variant(caption, "sks", rules, 0, "img", k)
        assert v.startswith("sks woman, red hair, ")
        assert sorted(split_tags(v.removeprefix("sks "))) == sorted(split_tags(caption))  # shuffled, none dropped
        seen.add(v)
    assert len(seen) > 20  # 5! orders of the unkept tags


def test_a_trigger_tag_is_not_repeated_and_a_caption_without_commas_is_one_tag() -> None:
    rules = TagRules(shuffle=True, dropout=0.5)
    for k in range(20):
        v = caption_variant("sks, green square, white background", "sks", rules, 0, "x", k)
        assert v.startswith("sks ") and v.count("sks") == 1
        assert (
            caption_variant("a yellow triangle on black", "sks", rules, 0, "x", k) == "sks a yellow triangle on black"
        )


def test_without_shuffle_or_dropout_a_variant_is_the_caption_as_before() -> None:
    for caption in CAPTIONS + ["", "sks, a, b", "  spaced ,  tags  "]:
        for trigger in (None, "sks"):
            assert caption_variant(caption, trigger, TagRules(keep_tokens=3), 7, "k", 0) == full_caption(
                caption, trigger
            )


def test_tag_dropout_drops_at_its_rate_and_never_empties_a_caption() -> None:
    tags = [f"t{i}" for i in range(10)]
    caption = ", ".join(tags)
    rules = TagRules(dropout=0.3, keep_tokens=1)
    dropped = 0
    for i in range(2000):
        v = split_tags(caption_variant(caption, None, rules, 0, f"img{i}", i % 8))
        assert v[0] == "t0"  # kept, never dropped
        assert v == [t for t in tags if t in v]  # no shuffle: the order stays
        dropped += 10 - len(v)
    assert abs(dropped / (2000 * 9) - 0.3) < 0.015
    # Dropout 0.9, nothing kept in place: every variant still has a tag.
    for i in range(500):
        text = caption_variant("a, b, c", None, TagRules(shuffle=True, dropout=0.9), 0, f"img{i}", 0)
        assert len(split_tags(text)) >= 1
        assert caption_variant("one tag only", "sks", TagRules(dropout=0.9), 0, f"img{i}", 0) == "sks one tag only"


def test_variants_are_seeded_by_seed_key_and_k() -> None:
    caption, rules = ", ".join(f"tag{i}" for i in range(8)), TagRules(shuffle=True, dropout=0.2)
    a = caption_variants(caption, "sks", rules, 1, "img", 8)
    assert a == caption_variants(caption, "sks", rules, 1, "img", 8)
    assert len(set(a)) > 4  # the variants of one image differ
    assert a != caption_variants(caption, "sks", rules, 2, "img", 8)
    assert a != caption_variants(caption, "sks", rules, 1, "other", 8)
    assert caption_variants(caption, "sks", rules, 1, "img", 3) == a[:3]  # variant k does not depend on K


def test_variant_draws_are_seeded_per_pass_and_spread_over_the_variants() -> None:
    def draw(seed: int, data_pass: int, key: str) -> int:
        return choose_caption_variant(K, sample_seed(seed, data_pass, key + "#caption"))

    assert all(draw(0, p, "004") == draw(0, p, "004") for p in range(20))
    counts = [0] * K
    for p in range(600):
        counts[draw(0, p, "004")] += 1
    assert all(150 < c < 250 for c in counts), counts
    assert [draw(0, p, "004") for p in range(30)] != [draw(1, p, "004") for p in range(30)]
    assert choose_caption_variant(1, 123) == 0


def test_shuffle_options_are_checked_and_leave_other_caches_alone(tiny_dev: Path) -> None:
    with pytest.raises(RecipeError, match=r"^data.caption_variants: is 3, but without caption_shuffle or tag_dropout"):
        parse_train(["--preset", "tiny", "--data.caption_variants", "3"])
    with pytest.raises(RecipeError, match=r"^data.tag_dropout: must be in \[0, 1\)"):
        parse_train(["--preset", "tiny", "--data.tag_dropout", "1.0"])
    # Without shuffling the cache settings (and so the digest of every existing cache) are unchanged.
    plain, _ = parse_train(["--preset", "tiny", "--data.keep_tokens", "2"])
    st = settings_for(resolve_model(plain.model), plain).to_json()
    assert not {"caption_shuffle", "keep_tokens", "tag_dropout", "caption_variants"} & set(st)
    auto, _ = parse_train(["--preset", "tiny", "--data.tag_dropout", "0.1"])
    assert settings_for(resolve_model(auto.model), auto).caption_variants == 8


# ------------------------------------------------------------------------------------------- the cache
@pytest.fixture(scope="module")
def shuffled_cache(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> tuple[Path, str]:
    """6 images with tag captions, cached with caption_shuffle and K = 3 variants (what `train` below checks)."""
    base = tmp_path_factory.mktemp("captions")
    folder = base / "data"
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption + "\n")
    recipe, _ = parse_train(["--preset", "tiny", *SHUFFLED])
    samples, _ = dataset_source(str(folder), None)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        build_cache(
            base / "cache",
            settings_for(resolve_model(recipe.model), recipe),
            samples,
            torch.device("cpu"),
            torch.float32,
        )
    return base / "cache", out.getvalue()


def _members(cache: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    out: dict[str, Any] = {}
    for shard in sorted(cache.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                out.setdefault(key, [None, None])[0 if ext == "safetensors" else 1] = (
                    load(data) if ext == "safetensors" else json.loads(data)
                )
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_the_cache_holds_k_variants_per_image_and_prints_their_cost(shuffled_cache: tuple[Path, str]) -> None:
    cache, printed = shuffled_cache
    index = read_index(cache)  # the open-time checks accept the variant tensors
    assert index.settings["caption_variants"] == K and index.settings["caption_shuffle"] is True
    assert audit_cache(cache)[0] == []  # and so does `data validate CACHE`
    recipe, _ = parse_train(["--preset", "tiny", *SHUFFLED])
    seed = recipe.training.seed
    members = _members(cache)
    assert len(members) == len(CAPTIONS)
    distinct: dict[str, torch.Tensor] = {}
    for key, (tensors, meta) in members.items():
        names = sorted(n for n in tensors if n.startswith("prompt_embeds"))
        assert names == [f"prompt_embeds.{k}" for k in range(K)]
        caption = CAPTIONS[int(key)]
        want = caption_variants(caption, "sks", TagRules(shuffle=True), seed, key, K)
        assert meta["captions"] == want and meta["caption"] == want[0]
        for k, text in enumerate(want):  # one embedding per distinct text, whichever image it came from
            e = tensors[f"prompt_embeds.{k}"]
            if text in distinct:
                assert torch.equal(distinct[text], e)
            distinct[text] = e
    by_text = list(distinct.items())
    assert any(not torch.equal(by_text[0][1], e) for _, e in by_text[1:])
    # One line before the encoding: K x MB per embedding = MB per image, GB for N images.
    lines = [ln for ln in printed.splitlines() if "caption variants" in ln]
    assert len(lines) == 1, printed
    m = re.fullmatch(
        r"cache: 3 caption variants x ([\d.]+) MB per prompt embedding \(64 tokens x (\d+) = 3 layers x (\d+) hidden x "
        r"4 bytes\) = ([\d.]+) MB per image, ([\d.]+) GB for 6 images",
        lines[0],
    )
    assert m, lines[0]
    width = int(m.group(3))
    assert int(m.group(2)) == 3 * width == by_text[0][1].shape[1]
    per = 64 * 3 * width * 4  # bytes of one fp32 embedding
    for printed_mb, exact in ((m.group(1), per / 1e6), (m.group(4), 3 * per / 1e6), (m.group(5), 6 * 3 * per / 1e9)):
        assert abs(float(printed_mb) - exact) <= 0.05 * exact, (printed_mb, exact)


def test_a_read_returns_the_drawn_variant_and_reads_only_its_bytes(
    shuffled_cache: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, _ = shuffled_cache
    index = read_index(cache)
    members = _members(cache)
    data = CachedSamples(index, seed=5)
    reads: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, offset: int) -> bytes:
        out = real(fd, n, offset)
        reads.append(len(out))
        return out

    monkeypatch.setattr(captions_mod.os, "pread", counting)
    table = index.samples()
    used = set()
    for i in range(len(table)):
        key = table.keys[i]
        tensors = members[key][0]
        for p in range(6):
            reads.clear()
            item = data[Slot(i, 1.0, p)]
            k = choose_caption_variant(K, sample_seed(5, p, key + "#caption"))
            used.add(k)
            assert torch.equal(item["prompt_embeds"], tensors[f"prompt_embeds.{k}"])
            assert torch.equal(item["latents"], tensors["latents"])
            assert not any(n.startswith("prompt_embeds.") for n in item)
            embed = tensors["prompt_embeds.0"].numel() * 4
            # Its header, then only the tensors it needs: the other K - 1 variants are not read.
            assert sum(reads) <= table.size[i] - (K - 1) * embed + captions_mod.HEAD
    assert used == set(range(K))
    batch = collate([data[Slot(i, 1.0, 0)] for i in range(2)])  # the loop sees one prompt_embeds, as before
    assert batch["prompt_embeds"].shape[0] == 2
    # Validation reads variant 0.
    val = index.val_samples()
    assert val and all(torch.equal(v["prompt_embeds"], members[v["key"]][0]["prompt_embeds.0"]) for v in val)
    assert all(v["caption"] == members[v["key"]][1]["captions"][0] for v in val)


def test_a_cache_whose_variants_do_not_match_its_settings_is_refused(
    shuffled_cache: tuple[Path, str], tmp_path: Path
) -> None:
    copy = tmp_path / "c"
    shutil.copytree(shuffled_cache[0], copy)
    d = json.loads((copy / "index.json").read_text())
    d["settings"]["caption_variants"] = 2
    (copy / "index.json").write_text(json.dumps(d))
    with pytest.raises(CacheCorrupt, match=r"it holds tensors \[.*'prompt_embeds.2'\], a sample of this cache"):
        read_index(copy)
    d["settings"]["caption_variants"] = 0
    (copy / "index.json").write_text(json.dumps(d))
    with pytest.raises(CacheCorrupt, match=r"settings.caption_variants: expected a whole number >= 1, got 0"):
        read_index(copy)
    # A sample whose bytes changed after the cache was opened: the variant read names it in one line.
    d["settings"]["caption_variants"] = K
    (copy / "index.json").write_text(json.dumps(d))
    index = read_index(copy)
    e = index.samples()[1]
    with open(copy / e.url, "r+b") as f:
        f.seek(e.offset)
        f.write((10**9).to_bytes(8, "little"))
    with pytest.raises(CacheCorrupt, match=rf"{e.url}, sample '{e.key}': cannot be read at its indexed offset \(its "):
        CachedSamples(index)[Slot(1, 1.0, 0)]


# --------------------------------------------------------------------------------------------- resume
def _train(out: Path, cache: Path, *extra: str, stop_at: int | None = None) -> Trainer:
    args = ["--preset", "tiny", "--output", str(out), "--dataset", str(cache), *SHUFFLED]
    args += ["--steps", "8", "--output.checkpoint_every", "3", "--validation.every_n_steps", "0"]
    args += ["--validation.prompts", "[]", "--logging.tensorboard", "false", "--data.caption_dropout", "0.2"]
    recipe, resume = parse_train(args + list(extra))
    trainer = Trainer(recipe, resume)
    trainer.setup()
    if stop_at is not None:  # a scheduler's SIGUSR1 during step `stop_at`: checkpoint there and exit
        update = trainer.signals.update

        def signalled(step: int) -> str:
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            return update(step)

        trainer.signals.update = signalled  # type: ignore[method-assign]
    trainer.fit()
    reset_accelerate()
    return trainer


def test_a_shuffled_run_stopped_at_a_checkpoint_resumes_to_the_same_lora(
    shuffled_cache: tuple[Path, str], tmp_path: Path
) -> None:
    cache = shuffled_cache[0]
    _train(tmp_path / "straight", cache)
    stopped = _train(tmp_path / "stopped", cache, stop_at=5)
    assert stopped.interrupted and stopped.state.step == 5
    assert not (tmp_path / "stopped" / "lora.safetensors").exists()
    resumed = _train(tmp_path / "stopped", cache, "--resume", "latest")
    assert resumed.state.step == 8
    a = load_file(str(tmp_path / "straight" / "lora.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
