"""`data validate`: a generated corpus of broken and awkward files, each named with the right code, and `--fix`."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from flux2_lora.data.fix import fix_dataset
from flux2_lora.data.folder import DataError, scan_folder
from flux2_lora.data.validate import (
    FIXES_FILE,
    Problem,
    Report,
    format_report,
    validate_dataset,
)


def cmd_validate(argv: list[str]) -> int:
    """`flux2-lora data validate ARGV` through the command layer, with its errors raised."""
    from flux2_lora.cli import dispatch

    return dispatch(["data", "validate", *argv])


MAX_FILE_MB = 0.05  # 52 kB: the noisy big.png is over it, every other file is well under
MAX_PIXELS = 1_000_000  # Image.MAX_IMAGE_PIXELS during the tests: bomb_warn.png (1.1 MP) is over it
MAX_TOKENS = 16

# Every file of the corpus -> the codes validate must report for it (sorted); [] means no problem.
EXPECTED: dict[str, list[str]] = {
    "good1.png": [],
    "good2.jpg": [],
    "gray.png": [],
    "sub/good3.webp": [],
    "cmyk.jpg": [],
    "palette.png": [],
    "deep16.png": [],
    "rgba.png": [],
    "rotated.jpg": [],
    "dup_a.png": [],
    "meta/m1.png": [],
    "meta/m2.png": [],
    "meta/m3.png": ["empty-caption"],
    "notes.md": ["ignored"],
    "model.pt": ["ignored"],
    "weights.bin": ["ignored"],
    "script.py": ["ignored"],
    ".DS_Store": [],
    "metadata.jsonl": ["bad-metadata", "bad-metadata", "bad-metadata"],
    "anim.gif": ["bad-extension"],
    "scan.bmp": ["bad-extension"],
    "photo.tiff": ["bad-extension"],
    "disguised.dat": ["bad-extension"],
    "empty.png": ["empty-file"],
    "truncated.jpg": ["unreadable"],
    "garbage.png": ["unreadable"],
    "bomb_header.png": ["decompression-bomb"],
    "bomb_warn.png": ["decompression-bomb"],
    "nocap.png": ["missing-caption"],
    "emptycap.txt": ["empty-caption"],
    "latin1.txt": ["caption-not-utf8"],
    "bom.txt": ["caption-bom"],
    "longcap.txt": ["caption-too-long"],
    "orphan.txt": ["orphan-caption"],
    "dup_b.png": ["duplicate"],
    "tiny.png": ["too-small"],
    "panorama.png": ["extreme-aspect"],
    "anim.png": ["animated"],
    "big.png": ["too-large"],
    "link.png": ["outside-root", "symlink"],
    "link_in.png": ["symlink"],
    "linkdir": ["outside-root", "symlink"],
}
WARNING_CODES = {
    "caption-bom", "caption-too-long", "orphan-caption", "duplicate", "extreme-aspect", "animated", "ignored",
}  # fmt: skip


class WordTokenizer:
    """A stand-in Hugging Face tokenizer: one token per word."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


def _picture(path: Path, size: tuple[int, int], n: int, mode: str = "RGB", **save: Any) -> None:
    """A distinct picture (colour from n) so that no two corpus files are byte-identical by accident."""
    img = Image.new("RGB", size, ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256))
    ImageDraw.Draw(img).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=(n % 256, 0, 255))
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (no pixel data): a decompression bomb's front door."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def make_corpus(root: Path, outside: Path) -> None:
    """Write the corpus of EXPECTED into root (and a secret file in outside that only symlinks point to)."""
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    good = {"good1.png": (320, 320), "good2.jpg": (400, 300), "sub/good3.webp": (300, 300), "dup_a.png": (300, 300)}
    for n, (name, size) in enumerate(good.items()):
        _picture(root / name, size, n)
    (root / "dup_b.png").write_bytes((root / "dup_a.png").read_bytes())
    _picture(root / "gray.png", (300, 300), 10, "L")
    _picture(root / "cmyk.jpg", (300, 300), 11, "CMYK")
    _picture(root / "palette.png", (300, 300), 12, "P")
    Image.new("I;16", (300, 300), 40000).save(root / "deep16.png")
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((50, 50, 150, 150), fill=(0, 0, 255, 255))
    rgba.save(root / "rgba.png")
    rotated = Image.new("RGB", (300, 400), (1, 2, 3))
    exif = rotated.getexif()
    exif[0x0112] = 6  # stored 300x400, shown 400x300
    rotated.save(root / "rotated.jpg", exif=exif)
    _picture(root / "meta/m1.png", (300, 300), 13)
    _picture(root / "meta/m2.png", (300, 300), 14)
    _picture(root / "meta/m3.png", (300, 300), 15)
    (root / "meta/m2.txt").write_text("a picture from a txt file")
    (root / "metadata.jsonl").write_text(
        '{"file_name": "meta/m1.png", "text": "a picture from metadata"}\n'
        '{"file_name": "meta/m2.png", "text": \n'  # malformed: line 2
        '{"file_name": "meta/gone.png", "text": "no such file"}\n'  # warning: line 3
        '{"file_name": "./meta/m2.png", "text": "training does not match this name"}\n'  # warning: line 4
        '{"file_name": "meta/m3.png", "text": " "}\n'  # an empty caption
    )
    (root / "notes.md").write_text("# how I collected these\n")
    (root / "model.pt").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's first bytes (never unpickled)
    (root / "weights.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # torch.save's zip container
    (root / "script.py").write_text("print('hello')\n")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _picture(root / "anim.gif", (300, 300), 20)
    _picture(root / "scan.bmp", (300, 300), 21)
    _picture(root / "photo.tiff", (300, 300), 22)
    _picture(root / "disguised.dat", (300, 300), 23, format="JPEG")
    (root / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    _noise((256, 256), 1).save(buf, format="JPEG", quality=70)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "garbage.png").write_bytes(random.Random(2).randbytes(2000))
    _png_claiming(root / "bomb_header.png", 100_000, 100_000)
    _picture(root / "bomb_warn.png", (1100, 1000), 24)
    _picture(root / "nocap.png", (300, 300), 25)
    _picture(root / "emptycap.png", (300, 300), 26)
    (root / "emptycap.txt").write_text("  \n\t")
    _picture(root / "latin1.png", (300, 300), 27)
    (root / "latin1.txt").write_bytes("un caf\xe9 au lait".encode("latin-1"))
    _picture(root / "bom.png", (300, 300), 28)
    (root / "bom.txt").write_bytes(b"\xef\xbb\xbfa photo with a byte-order mark")
    _picture(root / "longcap.png", (300, 300), 29)
    (root / "longcap.txt").write_text(" ".join(["word"] * 40))
    (root / "orphan.txt").write_text("a caption whose image was deleted")
    _picture(root / "tiny.png", (64, 64), 30)
    _picture(root / "panorama.png", (2600, 260), 31)
    frames = [Image.new("RGB", (300, 300), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(root / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    _noise((300, 300), 3).save(root / "big.png")
    _picture(outside / "secret.png", (300, 300), 40)
    (outside / "secret.txt").write_text("outside the dataset")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink("good1.png", root / "link_in.png")
    os.symlink(outside, root / "linkdir", target_is_directory=True)
    for name in EXPECTED:
        path = root / name
        if path.suffix in (".png", ".jpg", ".webp") and name not in ("nocap.png", "link.png", "link_in.png"):
            if not path.with_suffix(".txt").exists() and not name.startswith("meta/"):
                path.with_suffix(".txt").write_text(f"a photo of {path.stem}")


def _validate(root: Path, **kw: Any) -> Report:
    opts: dict[str, Any] = {"max_file_mb": MAX_FILE_MB, "max_caption_tokens": MAX_TOKENS, "tokenizer": WordTokenizer()}
    return validate_dataset(root, **{**opts, **kw})


def _snapshot(root: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under root: symlinks by their link text (never followed), files by their bytes."""
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path).encode())
            elif path.is_file():
                out[rel] = ("file", path.read_bytes())
            else:
                out[rel] = ("dir", b"")
    return out


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)
    root = tmp_path / "dataset"
    make_corpus(root, tmp_path / "outside")
    return root


def test_corpus_covers_enough_broken_files(corpus: Path) -> None:
    assert sum(1 for codes in EXPECTED.values() if codes) >= 20


def test_every_bad_file_is_named_with_its_code(corpus: Path) -> None:
    report = _validate(corpus)
    got: dict[str, list[str]] = {}
    for p in report.problems:
        got.setdefault(p.path.relative_to(report.root).as_posix(), []).append(p.code)
    unexpected = {k: v for k, v in got.items() if k not in EXPECTED}
    assert not unexpected, unexpected
    mismatched = {k: (sorted(got.get(k, [])), v) for k, v in EXPECTED.items() if sorted(got.get(k, [])) != v}
    assert not mismatched, mismatched
    for p in report.problems:
        expected_severity = "warning" if p.code in WARNING_CODES else "error"
        if p.code == "bad-metadata":
            expected_severity = "error" if p.reason.startswith("line 2:") else "warning"
        assert p.severity == expected_severity, p
    assert report.has_errors


def test_reasons_say_what_and_where(corpus: Path) -> None:
    report = _validate(corpus)

    def reason(name: str, code: str) -> str:
        return next(p.reason for p in report.problems if p.path == report.root / name and p.code == code)

    assert reason("dup_b.png", "duplicate") == "same bytes as dup_a.png (trains that image twice)"
    assert "40 tokens" in reason("longcap.txt", "caption-too-long")
    assert "last 24 are cut" in reason("longcap.txt", "caption-too-long")
    assert reason("metadata.jsonl", "bad-metadata").startswith("line 2:")
    assert "2600x260" in reason("panorama.png", "extreme-aspect")
    assert "64x64" in reason("tiny.png", "too-small")
    assert "MB" in reason("big.png", "too-large")
    assert str(corpus.parent / "outside" / "secret.png") in reason("link.png", "symlink")


def test_files_that_are_not_part_of_the_dataset_are_named_and_never_opened(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    def never(*a: Any, **k: Any) -> Any:
        raise AssertionError("a dataset file was unpickled")

    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    report = _validate(corpus)

    def reason(name: str) -> str:
        return next(p.reason for p in report.problems if p.path == report.root / name)

    assert reason("notes.md") == "ignored: not an image or caption"
    assert reason("script.py") == "ignored: not an image or caption"
    assert (
        reason("model.pt")
        == "ignored: not an image or caption (a Python pickle; it is never opened past its first bytes)"
    )
    assert reason("weights.bin") == (
        "ignored: not an image or caption (a PyTorch archive, which holds pickles; it is never opened past its first bytes)"
    )
    out = corpus.parent / "clean"
    fix_dataset(corpus, out, report)
    assert not any((out / name).exists() for name in ("model.pt", "weights.bin", "script.py", "notes.md"))
    assert "model.pt: not copied (not an image or a caption)" in (out / "FIXES.txt").read_text()


def test_counts_and_summary_line(corpus: Path) -> None:
    report = _validate(corpus)
    images = [p.relative_to(corpus).as_posix() for p in corpus.rglob("*") if p.suffix in (".png", ".jpg", ".webp")]
    bad_images = {k for k in images if EXPECTED.get(k) or EXPECTED.get(str(Path(k).with_suffix(".txt")))}
    assert report.n_images == len(images)
    assert report.n_ok == len(images) - len(bad_images)
    text = format_report(report)
    lines = text.splitlines()
    assert len(lines) == len(report.problems) + 1
    for line, p in zip(lines, report.problems, strict=False):
        rel = p.path.relative_to(corpus).as_posix()
        assert line == f"{'ERROR  ' if p.severity == 'error' else 'WARNING'} {rel}: {p.reason}"
    errors = sum(p.severity == "error" for p in report.problems)
    warnings = len(report.problems) - errors
    assert lines[-1] == f"{len(images)} images: {report.n_ok} ok, {errors} errors, {warnings} warnings"


def test_clean_folder_and_format_of_one(tmp_path: Path) -> None:
    _picture(tmp_path / "a.png", (300, 300), 1)
    (tmp_path / "a.txt").write_text("a picture")
    report = validate_dataset(tmp_path)
    assert report.problems == [] and not report.has_errors
    assert format_report(report) == "1 image: 1 ok, 0 errors, 0 warnings"


def test_instance_prompt_fills_missing_and_empty_captions(corpus: Path) -> None:
    report = _validate(corpus, instance_prompt="photo of sks")
    assert report.codes(corpus / "nocap.png") == []
    assert [(p.code, p.severity) for p in report.problems if p.path == corpus / "emptycap.txt"] == [
        ("empty-caption", "warning")
    ]
    assert report.codes(corpus / "meta/m3.png") == ["empty-caption"]  # metadata text has no fallback


def test_no_tokenizer_no_token_check(corpus: Path) -> None:
    report = validate_dataset(corpus, max_file_mb=MAX_FILE_MB)
    assert "caption-too-long" not in {p.code for p in report.problems}


def test_symlink_targets_are_never_opened(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(file)))
        return real_open(file, *args, **kwargs)

    def spy_os_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(os.path.realpath(os.fsdecode(file)))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    report = _validate(corpus)
    fix_dataset(corpus, corpus.parent / "fixed", report)
    monkeypatch.undo()
    outside = str((corpus.parent / "outside").resolve())
    assert opened, "the spy saw no file opened at all"
    assert not [p for p in opened if p.startswith(outside)]
    assert not (corpus.parent / "fixed" / "link.png").exists()


def test_fix_writes_a_clean_copy_and_leaves_the_original_alone(corpus: Path) -> None:
    before = _snapshot(corpus)
    report = _validate(corpus)
    out = corpus.parent / "fixed"
    lines = fix_dataset(corpus, out, report)
    assert _snapshot(corpus) == before
    assert (out / FIXES_FILE).read_text() == "".join(f"{line}\n" for line in lines)

    again = _validate(out)
    assert not again.has_errors, format_report(again)
    assert {p.code for p in again.problems} == {"extreme-aspect", "caption-too-long"}
    kept = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.suffix != ".txt"}
    assert kept == {
        "good1.png", "good2.jpg", "gray.png", "sub/good3.webp", "dup_a.png", "meta/m1.png", "meta/m2.png",
        "bom.png", "longcap.png", "panorama.png",
        "cmyk.png", "palette.png", "deep16.png", "rgba.png", "rotated.png", "anim.png",
    }  # fmt: skip
    for name in ("cmyk.png", "palette.png", "deep16.png", "rgba.png", "rotated.png", "anim.png"):
        with Image.open(out / name) as im:
            assert im.mode == "RGB" and not getattr(im, "is_animated", False), name
    with Image.open(out / "rotated.png") as im:
        assert im.size == (400, 300) and im.getexif().get(0x0112) is None
    assert (out / "bom.txt").read_bytes() == b"a photo with a byte-order mark\n"
    assert (out / "meta/m1.txt").read_text() == "a picture from metadata\n"
    assert [i.image.name for i in scan_folder(out)]  # training reads the copy

    text = "\n".join(lines)
    for name in ("dup_b.png", "orphan.txt", "link.png", "empty.png", "latin1.png", "big.png", "anim.gif"):
        assert re.search(rf"^{re.escape(name)}: (dropped|not copied)", text, re.M), name
    assert "bom.txt: byte-order mark removed" in lines
    assert "cmyk.jpg: re-saved as RGB PNG cmyk.png (CMYK)" in lines


def test_fix_fills_captions_with_the_instance_prompt(corpus: Path) -> None:
    report = _validate(corpus, instance_prompt="photo of sks")
    out = corpus.parent / "fixed"
    lines = fix_dataset(corpus, out, report, instance_prompt="photo of sks")
    assert (out / "nocap.txt").read_text() == "photo of sks\n"
    assert (out / "emptycap.txt").read_text() == "photo of sks\n"
    assert "nocap.png: caption filled with the instance prompt" in lines
    assert not _validate(out).has_errors


def test_fix_refuses_an_output_inside_the_dataset_or_not_empty(corpus: Path, tmp_path: Path) -> None:
    report = _validate(corpus)
    with pytest.raises(DataError, match="inside the dataset folder"):
        fix_dataset(corpus, corpus / "cleaned", report)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(DataError, match="exists and is not empty"):
        fix_dataset(corpus, busy, report)


def test_cmd_validate_exit_codes_and_fix(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--dataset", str(corpus), "--max-file-mb", str(MAX_FILE_MB)]
    assert cmd_validate(args) == 1
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\d+ images: \d+ ok, \d+ errors, \d+ warnings", out[-1])
    assert any(line.startswith("ERROR   link.png: symbolic link") for line in out)
    fixed = corpus.parent / "fixed"
    assert cmd_validate([*args, "--fix", str(fixed)]) == 1
    out = capsys.readouterr().out
    assert "cleaned copy written to" in out and re.search(r"cleaned copy: \d+ images: \d+ ok, 0 errors", out)
    assert cmd_validate(["--dataset", str(fixed), "--max-file-mb", str(MAX_FILE_MB)]) == 0


def test_cmd_validate_missing_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: dataset folder does not exist$"):
        cmd_validate(["--dataset", str(tmp_path / "nowhere")])


def test_cmd_validate_counts_tokens_with_the_model_tokenizer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "a", "photo", "of", "word"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "model" / "tokenizer")
    data = tmp_path / "data"
    _picture(data / "a.png", (300, 300), 1)
    (data / "a.txt").write_text(" ".join(["word"] * 20))
    args = ["--dataset", str(data), "--model", str(tmp_path / "model"), "--max-tokens", "16"]
    assert cmd_validate(args) == 0
    out = capsys.readouterr().out
    assert "WARNING a.txt: caption is 20 tokens" in out and "last 4 are cut" in out


def test_problem_is_a_plain_record() -> None:
    p = Problem(Path("x.png"), "error", "empty-file", "file is empty (0 bytes)")
    assert (p.severity, p.code) == ("error", "empty-file")
    assert json.dumps({"code": p.code})
