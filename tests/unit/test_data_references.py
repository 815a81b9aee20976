"""Reference images of editing datasets through the data tools: scan_folder's three layouts, `data validate` (folders,
metadata.jsonl, raw shards) one line per problem, `--fix`, `data analyze`, `data augment` and `data shard`."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from flux2_lora.cli import dispatch, main
from flux2_lora.data.analyze import analyze_dataset, format_analysis, plot_analysis
from flux2_lora.data.augment import augment_folder
from flux2_lora.data.fix import fix_dataset
from flux2_lora.data.folder import DataError, Item, scan_folder
from flux2_lora.data.shards import iter_raw_samples, write_raw_shards
from flux2_lora.data.validate import Problem, format_report, validate_dataset
from flux2_lora.data.validate_shards import validate_shards

SIDE = 96  # targets and references; --min-resolution is lowered to 64 for the targets


def picture(path: Path, size: tuple[int, int] = (SIDE, SIDE), n: int = 0) -> bytes:
    """A distinct, left-right asymmetric picture (a flip or a crop shows); returns its bytes."""
    img = Image.new("RGB", size, ((n * 37) % 256, (n * 91) % 256, (n * 53) % 256))
    ImageDraw.Draw(img).rectangle((0, 0, size[0] // 3, size[1] // 2), fill=(255, (n * 17) % 256, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.read_bytes()


def item(root: Path, name: str, n: int, caption: str | None = "make it red") -> None:
    picture(root / name, n=n)
    if caption is not None:
        (root / name).with_suffix(".txt").write_text(caption)


def refs_bytes(items: list[Item]) -> list[tuple[str, str, list[bytes]]]:
    return [(i.image.name, i.caption, [r.read_bytes() for r in i.references]) for i in items]


# ------------------------------------------------------------------------------------------------ scan_folder


def test_three_layouts_scan_to_the_same_items(tmp_path: Path) -> None:
    beside, folder, meta = tmp_path / "beside", tmp_path / "folder", tmp_path / "meta"
    for root in (beside, folder, meta):
        item(root, "a.png", 1)
        item(root, "b.png", 2)
        item(root, "plain.png", 3)  # no references: a mixed dataset
    for n, (b, f, m) in enumerate(
        [("a_ref0", "references/a_ref0", "in/x"), ("a_ref1", "references/a_ref1", "in/y"),
         ("b_ref0", "references/b", "in/z")],  # references/b.png: the target's own name, its one reference
        10,
    ):  # fmt: skip
        for root, name in ((beside, b), (folder, f), (meta, m)):
            picture(root / f"{name}.png", n=n)
    lines = [
        {"file_name": "a.png", "text": "make it red", "references": ["in/x.png", "in/y.png"]},
        {"file_name": "b.png", "text": "make it red", "references": ["in/z.png"]},
    ]
    (meta / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = [refs_bytes(scan_folder(root)) for root in (beside, folder, meta)]
    assert got[0] == got[1] == got[2]
    assert [len(r) for _, _, r in got[0]] == [2, 1, 0]
    for root in (beside, folder, meta):  # validate agrees with training on every layout
        report = validate_dataset(root, min_resolution=64)
        assert report.problems == [], format_report(report)
        assert {k.name: len(v) for k, v in report.references.items()} == {"a.png": 2, "b.png": 1}
        assert format_report(report) == "3 images: 3 ok, 2 with references (3 reference images), 0 errors, 0 warnings"


@pytest.mark.parametrize(
    "layout, match",
    [
        ({"a_ref0.png": 0}, r"a_ref0.png: a reference image without its target a"),
        ({"x.png": 1, "x_ref0.png": 0, "x_ref0.jpg": 0}, r"x_ref0.*: reference 0 of .*x.png is also"),
        (
            {"x.png": 1, **{f"x_ref{i}.png": 2 + i for i in range(11)}},
            r"x.png: 11 reference images; FLUX.2 takes up to 10",
        ),
        ({"x.png": 1, "x.jpg": 2, "x_ref0.png": 3}, r"x_ref0.png: a reference of which image\? x.jpg and x.png"),
    ],
)
def test_scan_folder_refuses_broken_references_in_one_line(tmp_path: Path, layout: dict[str, int], match: str) -> None:
    for name, n in layout.items():
        picture(tmp_path / name, n=n)
    (tmp_path / "x.txt").write_text("make it red")
    with pytest.raises(DataError, match=match) as e:
        scan_folder(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ref", ["../outside.png", "/abs/outside.png", "in/link.png"])
def test_scan_folder_refuses_metadata_references_outside_the_root(tmp_path: Path, ref: str) -> None:
    root = tmp_path / "data"
    picture(root / "a.png")
    picture(tmp_path / "outside.png", n=5)
    (root / "in").mkdir()
    os.symlink(tmp_path / "outside.png", root / "in/link.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "t", "references": [ref]}) + "\n")
    with pytest.raises(DataError, match="outside the dataset folder") as e:
        scan_folder(root)
    assert "\n" not in str(e.value)


def test_metadata_lines_training_cannot_match_give_no_references(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    picture(tmp_path / "r.png", n=1)
    lines = [
        {"file_name": "../a.png", "text": "t", "references": ["r.png"]},  # leaves the folder: an error of its own
        {"file_name": "./a.png", "text": "t", "references": ["r.png"]},  # not matched by training
        {"file_name": "a.png", "text": "t", "references": "r.png"},  # not a list
    ]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = validate_dataset(tmp_path, min_resolution=64)
    assert report.references == {}
    reasons = [p.reason for p in report.problems if p.path.name == "metadata.jsonl"]
    assert any(r.startswith("line 1: file_name '../a.png' leaves the dataset folder") for r in reasons), reasons
    assert "line 3: references must be a list of file names relative to the dataset folder" in reasons


# ---------------------------------------------------------------------------------------------- data validate


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """One editing mistake per item; good.png and its reference are the control."""
    root = tmp_path / "data"
    refs = {
        "good_ref0.png": (SIDE, SIDE), "small_ref0.png": (40, SIDE), "references/wide.png": (900, 100),
        "twice_ref0.png": (SIDE, SIDE), "references/twice_ref0.png": (SIDE, SIDE),
        "gap_ref0.png": (SIDE, SIDE), "gap_ref2.png": (SIDE, SIDE), "orphan_ref0.png": (SIDE, SIDE),
        **{f"many_ref{i}.png": (SIDE, SIDE) for i in range(11)},
    }  # fmt: skip
    for n, (name, size) in enumerate(refs.items()):
        picture(root / name, size, n=100 + n)
    for n, name in enumerate(("good", "small", "wide", "corrupt", "twice", "many", "gap")):
        item(root, f"{name}.png", n)
    (root / "corrupt_ref0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a picture")
    picture(tmp_path / "outside.png", n=16)
    (root / "in").mkdir()
    os.symlink(tmp_path / "outside.png", root / "in/link.png")
    for n, name in enumerate(("gone", "up", "abs", "link")):
        picture(root / f"{name}.png", n=40 + n)
    lines = [
        ("gone.png", ["in/gone.png"]),
        ("up.png", ["../outside.png"]),
        ("abs.png", [str(tmp_path / "outside.png")]),
        ("link.png", ["in/link.png"]),
    ]
    meta = "".join(json.dumps({"file_name": f, "text": "make it red", "references": r}) + "\n" for f, r in lines)
    (root / "metadata.jsonl").write_text(meta)
    return root


# file -> (code, words its reason must hold)
BROKEN = {
    "small_ref0.png": ("too-small", ["40x96", "at least 64 px"]),
    "references/wide.png": ("extreme-aspect", ["900x100", "9.0:1", "over 8:1"]),
    "corrupt_ref0.png": ("unreadable", ["not an image Pillow can read"]),
    "orphan_ref0.png": ("orphan-reference", ["without its target orphan"]),
    "twice.png": ("duplicate-reference", ["reference 0 is both twice_ref0.png and references/twice_ref0.png"]),
    "many.png": ("too-many-references", ["11 reference images", "up to 10"]),
    "gap.png": ("reference-gap", ["numbered 0, 2", "no reference 1"]),
    "gone.png": ("missing-reference", ["'in/gone.png'", "metadata.jsonl line 1", "does not exist"]),
    "up.png": ("outside-root", ["'../outside.png'", "line 2", "outside the dataset folder (refused)"]),
    "abs.png": ("outside-root", ["outside.png'", "line 3", "outside the dataset folder (refused)"]),
    "link.png": ("symlink", ["'in/link.png'", "line 4", "symbolic link (refused, not followed)"]),
}


def test_validate_names_every_reference_problem(broken: Path) -> None:
    report = validate_dataset(broken, min_resolution=64)
    by_file: dict[str, list[Problem]] = {}
    for p in report.problems:
        by_file.setdefault(p.path.relative_to(broken).as_posix(), []).append(p)
    for name, (code, words) in BROKEN.items():
        found = [p for p in by_file.get(name, []) if p.code == code]
        assert found, (name, code, by_file.get(name))
        assert all(w in found[0].reason for w in words), (name, found[0].reason)
        assert found[0].severity == ("warning" if code == "reference-gap" else "error")
    assert "good.png" not in by_file and "good_ref0.png" not in by_file
    assert {"in/link.png"} <= set(by_file)  # the symlink itself, as every symlink
    assert report.references[broken / "good.png"] == (broken / "good_ref0.png",)
    # no reference is an image needing a caption, nor a duplicate of a target
    assert not [p for p in report.problems if p.code in ("missing-caption", "duplicate")]


def test_cmd_validate_prints_one_line_each_and_a_summary(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "validate", str(broken), "--min-resolution", "64"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err == ""
    lines = out.splitlines()
    for name, (_, words) in BROKEN.items():
        line = next((x for x in lines if x.split(maxsplit=1)[1].startswith(f"{name}: ") and words[0] in x), None)
        assert line is not None, name
        assert line.startswith("ERROR   " if name != "gap.png" else "WARNING "), line
    report = validate_dataset(broken, min_resolution=64)
    assert lines[-1] == "12 images: 1 ok, 7 with references (18 reference images), 12 errors, 1 warning"
    assert len(lines) == len(report.problems) + 1


def test_cmd_shard_refuses_a_folder_with_broken_references_in_one_line(
    broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "shard", "--dataset", str(broken), "--output", str(tmp_path / "s")]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.count("\n") == 1 and "has errors (listed above)" in err
    assert "ERROR   orphan_ref0.png: a reference image without its target" in out
    assert not list((tmp_path / "s").glob("*.tar"))


def test_validate_keeps_reference_rules_apart_from_target_rules(tmp_path: Path) -> None:
    """A 64 px reference is fine under --min-resolution 256; a 5:1 reference is fine under --max-aspect 4."""
    Image.new("RGB", (300, 300), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("make it blue")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "a_ref0.png")
    Image.new("RGB", (500, 100), "green").save(tmp_path / "a_ref1.png")
    (tmp_path / "a_ref0.txt").write_text("not read")
    report = validate_dataset(tmp_path)
    assert [(p.path.name, p.code) for p in report.problems] == [("a_ref0.txt", "reference-caption")]
    assert format_report(report).splitlines()[-1] == (
        "1 image: 1 ok, 1 with references (2 reference images), 0 errors, 1 warning"
    )


def test_fix_carries_references_with_their_items(broken: Path, tmp_path: Path) -> None:
    picture(broken / "meta.png", n=60)
    picture(broken / "in/m0.png", n=61)
    picture(broken / "in/m1.png", n=62)
    with (broken / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "meta.png", "text": "edit", "references": ["in/m0.png", "in/m1.png"]}) + "\n")
    item(broken, "dir.png", 63)
    picture(broken / "references/dir_ref0.png", n=64)
    kept = {
        "good.png": ["good_ref0.png"],
        "gap.png": ["gap_ref0.png", "gap_ref2.png"],
        "meta.png": ["in/m0.png", "in/m1.png"],
        "dir.png": ["references/dir_ref0.png"],
    }
    out = tmp_path / "fixed"
    lines = fix_dataset(broken, out, validate_dataset(broken, min_resolution=64))
    after = {i.image.name: (i.image.read_bytes(), [r.read_bytes() for r in i.references]) for i in scan_folder(out)}
    before = {k: ((broken / k).read_bytes(), [(broken / r).read_bytes() for r in v]) for k, v in kept.items()}
    assert after == before  # the same items, the same references in the same order
    assert "gap.png: references written beside it as gap_ref0.png, gap_ref1.png" in lines
    assert "meta.png: references written beside it as meta_ref0.png, meta_ref1.png" in lines
    assert any(line.startswith("small.png: dropped (reference small_ref0.png: 40x96") for line in lines)
    assert any(line.startswith("orphan_ref0.png: not copied (a reference image without its target") for line in lines)
    assert any(line.startswith("twice.png: dropped (reference 0 is both") for line in lines)
    assert not validate_dataset(out, min_resolution=64).has_errors


# ------------------------------------------------------------------------------------------------- raw shards


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _png(size: tuple[int, int] = (SIDE, SIDE), n: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (n, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_shard_round_trip_keeps_references_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    for n, name in enumerate(("a.png", "b.png", "c.png")):
        item(root, name, n)
    for n, name in enumerate(("a_ref0.png", "references/a_ref1.png", "references/b.png")):
        picture(root / name, n=10 + n)
    items = scan_folder(root)
    out = tmp_path / "shards"
    dispatch(["data", "shard", "--dataset", str(root), "--output", str(out), "--min-resolution", "64"])
    assert "wrote 3 samples in 1 shards" in capsys.readouterr().out
    samples = list(iter_raw_samples(str(out)))
    assert [(s.caption, [d for d, _ in s.references]) for s in samples] == [
        (i.caption, [r.read_bytes() for r in i.references]) for i in items
    ]
    assert [s.image for s in samples] == [i.image.read_bytes() for i in items]
    assert [len(s.references) for s in samples] == [2, 1, 0]
    report = validate_shards(out, min_resolution=64)
    assert report.problems == []
    assert format_report(report) == "3 samples: 3 ok, 2 with references (3 reference images), 0 errors, 0 warnings"
    small = tmp_path / "small"
    write_raw_shards(items, root, small, shard_size=1)  # one sample a shard: the same samples
    assert [s.references for s in iter_raw_samples(str(small))] == [s.references for s in samples]


def test_validate_shards_names_the_member_and_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    txt = b"make it red"
    _tar(
        shards / "data-000000.tar",
        {
            "ok.png": _png(), "ok.txt": txt, "ok.ref0.png": _png(n=1),
            "gap.png": _png(), "gap.txt": txt, "gap.ref0.png": _png(n=2), "gap.ref2.png": _png(n=3),
            "twice.png": _png(), "twice.txt": txt, "twice.ref0.png": _png(n=4), "twice.ref0.jpg": _png(n=5),
            "small.png": _png(), "small.txt": txt, "small.ref0.png": _png((SIDE, 50)),
            "wide.png": _png(), "wide.txt": txt, "wide.ref0.png": _png((900, 100)),
            "bad.png": _png(), "bad.txt": txt, "bad.ref0.png": b"\x89PNG\r\n\x1a\nbroken",
            "many.png": _png(), "many.txt": txt, **{f"many.ref{i}.png": _png(n=10 + i) for i in range(11)},
        },
    )  # fmt: skip
    _tar(shards / "data-000001.tar", {"x.png": _png(), "x.txt": txt, "x.exe": b"MZ"})
    assert main(["data", "validate", str(shards), "--min-resolution", "64"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err == ""
    lines = out.splitlines()
    tar0 = str(shards / "data-000000.tar")
    expected = [
        f"ERROR   {tar0}: gap: references ref0, ref2 but no ref1",
        f"ERROR   {tar0}: twice: reference 0 is both twice.ref0.png and twice.ref0.jpg",
        f"ERROR   {tar0}: small.ref0.png: 96x50: a reference image needs both sides at least 64 px",
        f"ERROR   {tar0}: wide.ref0.png: 900x100: aspect ratio 9.0:1 is over 8:1",
        f"ERROR   {tar0}: bad.ref0.png: not an image Pillow can read",
        f"ERROR   {tar0}: many: 11 reference images; FLUX.2 takes up to 10",
        f"ERROR   {shards / 'data-000001.tar'}: x.exe: extension 'exe' is not one training reads",
    ]
    for start in expected:
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert lines[-1].startswith("8 samples: 1 ok, 7 with references")
    with pytest.raises(DataError, match="no ref1"):  # training refuses the same sample
        list(iter_raw_samples(tar0))
    assert main(["data", "validate", str(shards), "--fix", str(tmp_path / "f")]) == 2
    assert "raw shards, which cannot be fixed" in capsys.readouterr().err


def test_validate_of_a_missing_shard_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "validate", str(tmp_path / "nope.tar")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.tar: shard does not exist" in err


# ------------------------------------------------------------------------------------------ analyze, augment


def test_analyze_counts_references_apart_from_images(tmp_path: Path) -> None:
    for n, name in enumerate(("a.png", "b.png", "c.png")):
        item(tmp_path, name, n)
    picture(tmp_path / "a_ref0.png", (80, 120), n=10)
    picture(tmp_path / "references/a_ref1.png", (200, 100), n=11)
    picture(tmp_path / "b_ref0.png", n=12)
    s = analyze_dataset(tmp_path)
    assert (s["n_images"], s["n_missing_captions"]) == (3, 0)
    assert (s["n_with_references"], s["n_references"], s["n_unreadable_references"]) == (2, 3, 0)
    assert s["references_per_item"] == {0: 1, 1: 1, 2: 1}
    assert s["reference_short_side"] == {"min": 80, "median": 96, "p95": 100, "max": 100}
    text = format_analysis(s)
    assert "references: 3 in 2 items (1 with 0, 1 with 1, 1 with 2; 0 unreadable)" in text
    assert "ref short side" in text
    with Image.open(plot_analysis(s, tmp_path / "h.png")) as im:
        assert im.size == (900, 1120)  # a fourth panel: the references' short side


def test_augment_gives_references_the_same_change(tmp_path: Path) -> None:
    root = tmp_path / "data"
    same = picture(root / "a.png", n=1)
    (root / "a.txt").write_text("make it red")
    (root / "a_ref0.png").write_bytes(same)  # the same picture: its variant must match the target's
    picture(root / "a_ref1.png", (SIDE * 2, SIDE), n=2)  # another size: cropped by the same fraction
    item(root, "plain.png", 3)
    written, skipped = augment_folder(root, tmp_path / "out", 3, seed=1)
    assert (written, skipped) == (6, [])
    items = {i.image.name: i for i in scan_folder(tmp_path / "out")}
    assert sorted(items) == [f"{n}_aug00{k}.png" for n in ("a", "plain") for k in range(3)]
    for k in range(3):
        it = items[f"a_aug00{k}.png"]
        assert [r.name for r in it.references] == [f"a_aug00{k}_ref0.png", f"a_aug00{k}_ref1.png"]
        with Image.open(it.image) as t, Image.open(it.references[0]) as r0, Image.open(it.references[1]) as r1:
            assert t.tobytes() == r0.tobytes()
            assert abs(r1.width - 2 * t.width) <= 1 and abs(r1.height - t.height) <= 1
        assert items[f"plain_aug00{k}.png"].references == ()


def test_augment_skips_items_with_broken_references(broken: Path, tmp_path: Path) -> None:
    written, skipped = augment_folder(broken, tmp_path / "out", 1)
    text = "\n".join(skipped)
    for name in ("many.png", "twice.png", "gone.png", "up.png", "orphan_ref0.png", "corrupt.png"):
        assert f"{name}: skipped (" in text, name
    assert "good.png" not in text


def test_the_builtin_edit_dataset_validates_and_analyzes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data validate builtin:edit` and `data analyze --dataset builtin:edit` read the generated folder."""
    monkeypatch.setenv("FLUX2_LORA_HOME", str(tmp_path / "home"))
    assert main(["data", "validate", "builtin:edit", "--min-resolution", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "12 images: 12 ok, 12 with references (16 reference images), 0 errors, 0 warnings"
    )
    assert main(["data", "analyze", "--dataset", "builtin:edit", "--output", str(tmp_path / "a.png")]) == 0
    assert "references: 16 in 12 items" in capsys.readouterr().out
