"""Dataset folders, image conversion, buckets and the seeded batch order."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from flux2_lora.data.buckets import bucket_sizes, nearest_bucket, resize_to_bucket, to_tensor
from flux2_lora.data.cache import full_caption
from flux2_lora.data.folder import DataError, load_image, scan_folder


def test_scan_pairs_images_and_captions_in_stable_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "z.PNG")
    (tmp_path / "b" / "z.txt").write_bytes("\ufeffa  dog\n on grass".encode())  # BOM and whitespace
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a cat")
    (tmp_path / "notes.md").write_text("ignored")
    items = scan_folder(tmp_path)
    assert [(i.image.relative_to(tmp_path).as_posix(), i.caption) for i in items] == [
        ("a.jpg", "a cat"),
        ("b/z.PNG", "a dog on grass"),
    ]


def test_metadata_jsonl_and_json_sidecar_captions(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "from  metadata"}\n')
    (tmp_path / "a.txt").write_text("ignored: metadata wins")
    (tmp_path / "b.txt").write_text("from txt")
    (tmp_path / "c.json").write_text('{"caption": "from json"}')
    assert [i.caption for i in scan_folder(tmp_path)] == ["from metadata", "from txt", "from json"]
    (tmp_path / "c.json").write_text('{"nothing": 1}')
    with pytest.raises(DataError, match=r"c\.json: not a JSON object with a caption"):
        scan_folder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{broken\n")
    with pytest.raises(DataError, match=r"metadata\.jsonl:1"):
        scan_folder(tmp_path)


def test_missing_or_bad_captions_name_the_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"x\.png: no caption file x\.txt"):
        scan_folder(tmp_path)
    assert scan_folder(tmp_path, instance_prompt="photo of sks")[0].caption == "photo of sks"
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(DataError, match=r"x\.txt: caption is not UTF-8"):
        scan_folder(tmp_path)
    with pytest.raises(DataError, match="no images found"):
        scan_folder(_empty(tmp_path))


def _empty(tmp: Path) -> Path:
    d = tmp / "empty"
    d.mkdir()
    return d


def test_images_are_converted_safely(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "alpha.png")
    assert load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"
    Image.new("P", (4, 4)).save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").mode == "RGB"
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png").getpixel((0, 0))[0] > 250
    # EXIF orientation 6 (rotate 90): a 4x2 stored image is shown 2x4.
    img = Image.new("RGB", (4, 2))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (2, 4)
    (tmp_path / "trunc.png").write_bytes((tmp_path / "alpha.png").read_bytes()[:20])
    with pytest.raises(DataError, match=r"trunc\.png: cannot read image"):
        load_image(tmp_path / "trunc.png")


def test_buckets_keep_area_and_multiples_of_16() -> None:
    sizes = bucket_sizes(1024)
    assert (1024, 1024) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.85 < (w * h) / 1024**2 < 1.15
    assert nearest_bucket(1600, 900, sizes) == max(sizes, key=lambda s: s[0] / s[1] if s[0] / s[1] < 1.8 else 0)
    assert bucket_sizes(512, enabled=False) == [(512, 512)]
    out = resize_to_bucket(Image.new("RGB", (300, 100)), (64, 48))
    assert out.size == (64, 48)
    t = to_tensor(Image.new("RGB", (2, 2), (255, 0, 128)))
    assert t.shape == (3, 2, 2) and t.max() == 1.0 and t.min() == -1.0


def test_bucket_aspects_are_configurable() -> None:
    assert bucket_sizes(512, aspects=[1.0, 2.0]) == [(512, 512), (720, 368)]


def test_trigger_is_prepended_once() -> None:
    assert full_caption("a dog", "sks") == "sks a dog"
    assert full_caption("sks a dog", "sks") == "sks a dog"
    assert full_caption("a dog", None) == "a dog"
