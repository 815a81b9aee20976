"""`data analyze` numbers and histogram PNG; `data augment` counts, captions and seeded determinism."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from flux2_lora.cli import dispatch
from flux2_lora.data.analyze import analyze_dataset, format_analysis, plot_analysis
from flux2_lora.data.augment import augment_dataset
from flux2_lora.data.folder import DataError, scan_folder
from flux2_lora.data.validate import validate_dataset


class WordTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [0] * (2 * len(text.split()))}  # two tokens a word: tokens differ from words


def cmd_analyze(argv: list[str]) -> int:
    """`flux2-lora data analyze ARGV` through the command layer, with its errors raised."""
    return dispatch(["data", "analyze", *argv])


def cmd_augment(argv: list[str]) -> int:
    """`flux2-lora data augment ARGV` through the command layer, with its errors raised."""
    return dispatch(["data", "augment", *argv])


@pytest.fixture
def known(tmp_path: Path) -> Path:
    """3 readable images (300x200, 400x400, 200x600 shown; the last stored 600x200 with EXIF rotation), 1 broken."""
    root = tmp_path / "known"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (300, 200), (200, 30, 30)).save(root / "wide.png")
    (root / "wide.txt").write_text("a red wide picture")  # 4 words
    Image.new("RGB", (400, 400), (30, 200, 30)).save(root / "sub" / "square.jpg")
    (root / "sub" / "square.txt").write_text("a   green square picture of grass")  # 6 words
    tall = Image.new("RGB", (600, 200), (30, 30, 200))
    exif = tall.getexif()
    exif[0x0112] = 6  # shown 200x600
    tall.save(root / "tall.jpg", exif=exif)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "tall.jpg", "text": "blue"}) + "\n")  # 1 word
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "broken.txt").write_text("never counted")
    return root


def test_analyze_numbers_on_a_known_dataset(known: Path) -> None:
    s = analyze_dataset(known, tokenizer=WordTokenizer())
    assert (s["n_images"], s["n_unreadable"], s["unreadable"]) == (4, 1, ["broken.png"])
    assert (s["n_captioned"], s["n_missing_captions"], s["n_bad_captions"]) == (3, 0, 0)
    assert s["width"] == {"min": 200, "median": 300, "p95": 400, "max": 400}
    assert s["height"] == {"min": 200, "median": 400, "p95": 600, "max": 600}
    assert s["short_side"] == {"min": 200, "median": 200, "p95": 400, "max": 400}
    assert s["megapixels"] == {"min": 0.06, "median": 0.12, "p95": 0.16, "max": 0.16}
    assert s["aspect_ratio"]["min"] == pytest.approx(1 / 3) and s["aspect_ratio"]["max"] == 1.5
    assert s["caption_words"] == {"min": 1, "median": 4, "p95": 6, "max": 6}
    assert s["caption_tokens"] == {"min": 2, "median": 8, "p95": 12, "max": 12}
    classes = {k: v for k, v in s["aspect_classes"].items() if v}
    assert classes == {"< 1:2 (very tall)": 1, "~1:1 (square)": 1, "4:3 - 2:1 (landscape)": 1}
    table = format_analysis(s)
    assert "images: 4 (1 unreadable, skipped)" in table and "broken.png" in table
    assert any(line.split() == ["width", "(px)", "200", "300", "400", "400"] for line in table.splitlines())
    assert analyze_dataset(known)["caption_tokens"] is None


def test_analyze_writes_a_readable_histogram(known: Path, tmp_path: Path) -> None:
    out = plot_analysis(analyze_dataset(known), tmp_path / "plots" / "a.png")
    assert out.stat().st_size > 5000
    with Image.open(out) as im:
        assert im.size == (900, 840)
        colors = {c for _, c in im.convert("RGB").getcolors(1 << 20) or []}
        assert (31, 119, 180) in colors and (0, 0, 0) in colors  # bars and text


def test_analyze_of_an_empty_folder_still_draws(tmp_path: Path) -> None:
    s = analyze_dataset(tmp_path)
    assert s["n_images"] == 0 and s["width"] is None
    assert plot_analysis(s, tmp_path / "x.png").exists()
    assert "images: 0" in format_analysis(s)


def test_cmd_analyze_default_output_is_in_the_current_folder(
    known: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cmd_analyze(["--dataset", str(known)]) == 0
    assert (tmp_path / "analysis.png").stat().st_size > 5000
    assert "histograms written to analysis.png" in capsys.readouterr().out
    with pytest.raises(DataError, match="dataset folder does not exist"):
        cmd_analyze(["--dataset", str(tmp_path / "nope")])


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_augment_counts_captions_and_crop_bounds(known: Path, tmp_path: Path) -> None:
    out = tmp_path / "aug"
    assert augment_dataset(known, out, samples_per_image=3) == 9  # broken.png is skipped
    items = scan_folder(out)
    assert len(items) == 9
    captions = {"wide": "a red wide picture", "sub/square": "a green square picture of grass", "tall": "blue"}
    sizes = {"wide": (300, 200), "sub/square": (400, 400), "tall": (200, 600)}
    for item in items:
        stem = item.image.relative_to(out).as_posix().rsplit("_aug", 1)[0]
        assert item.caption == captions[stem]
        with Image.open(item.image) as im:
            w, h = sizes[stem]
            assert 0.8 * w <= im.width <= w and 0.8 * h <= im.height <= h and im.mode == "RGB"
    assert not validate_dataset(out, min_resolution=128).has_errors


def test_augment_is_deterministic_by_seed(known: Path, tmp_path: Path) -> None:
    augment_dataset(known, tmp_path / "a", 2, seed=7)
    augment_dataset(known, tmp_path / "b", 2, seed=7)
    augment_dataset(known, tmp_path / "c", 2, seed=8)
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    images = [v for k, v in a.items() if k.endswith(".png")]
    assert len(set(images)) == len(images)  # every sample differs


def test_augment_refuses_bad_outputs(known: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="inside the dataset folder"):
        augment_dataset(known, known / "aug", 1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(DataError, match="not empty"):
        augment_dataset(known, busy, 1)
    assert not os.path.exists(known / "aug")


def test_cmd_augment(known: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flux2_lora.cli import CliError

    out = tmp_path / "aug"
    assert cmd_augment(["--dataset", str(known), "--output", str(out), "--samples", "2", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "broken.png: skipped" in text and f"wrote 6 augmented images with captions to {out}" in text
    with pytest.raises(CliError, match="--samples: must be >= 1"):
        cmd_augment(["--dataset", str(known), "--output", str(tmp_path / "z"), "--samples", "0"])
