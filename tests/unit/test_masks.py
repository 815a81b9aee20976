"""Masked loss (issue 20, part 3): masks beside the images or in a mask folder, `data validate` one line per bad
mask, `--fix` carrying them, the cache's latent-grid weight map, the loss weighted by it (checked against a hand
computation on one batch) and a short training run whose validation loss uses it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw

from flux2_lora import flow
from flux2_lora.cli import main, parse_train
from flux2_lora.data.cache import build_cache, dataset_source, read_index, settings_for
from flux2_lora.data.cache_check import _Bad, _Expect
from flux2_lora.data.fix import fix_dataset
from flux2_lora.data.folder import DataError, scan_folder
from flux2_lora.data.shards import iter_raw_samples
from flux2_lora.data.stream import CachedSamples, Slot, collate
from flux2_lora.data.validate import format_report, validate_dataset
from flux2_lora.data.validate_shards import validate_shards
from flux2_lora.model import resolve_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def image(path: Path, size: tuple[int, int] = (96, 64), n: int = 0, caption: str = "a red box") -> Path:
    img = Image.new("RGB", size, ((n * 37) % 256, (n * 91) % 256, 90))
    ImageDraw.Draw(img).rectangle((0, 0, size[0] // 3, size[1] // 2), fill=(255, (n * 17) % 256, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    path.with_suffix(".txt").write_text(caption)
    return path


def mask(path: Path, size: tuple[int, int] = (96, 64), left: float = 0.5, grey: int = 255) -> Path:
    """White (or `grey`) on the left `left` of the width, black elsewhere."""
    a = np.zeros((size[1], size[0]), np.uint8)
    a[:, : round(size[0] * left)] = grey
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path)
    return path


def hand_weights(path: Path, bucket: tuple[int, int]) -> torch.Tensor:
    """The mask as the image goes into its bucket (scale to cover, centre crop, Lanczos), averaged per 16x16."""
    grey = np.asarray(Image.open(path).convert("L"), np.float32) / 255
    w, h = bucket
    m = Image.fromarray(grey, "F")
    scale = max(w / m.width, h / m.height)
    new = (max(w, round(m.width * scale)), max(h, round(m.height * scale)))
    m = m.resize(new, Image.Resampling.LANCZOS)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    px = torch.from_numpy(np.asarray(m, np.float32)[top : top + h, left : left + w].copy()).clamp(0, 1)
    return F.avg_pool2d(px[None, None], 16)[0, 0]


# ------------------------------------------------------------------------------------------ layout and validate


def test_masks_beside_and_in_a_mask_folder_belong_to_their_images_and_are_never_trained_on(tmp_path: Path) -> None:
    root, masks = tmp_path / "data", tmp_path / "masks"
    image(root / "a.jpg", n=1)
    image(root / "b.png", n=2)
    image(root / "sub" / "c.webp", n=3)
    image(root / "plain.png", n=4)
    mask(root / "a.mask.png")
    mask(masks / "sub" / "c.jpg")  # the image's relative path and stem, any extension
    mask(masks / "b.mask.png")  # `.mask` is read in the mask folder too
    items = {i.image.name: i.mask for i in scan_folder(root, mask_dir=masks)}
    assert items == {"a.jpg": root / "a.mask.png", "b.png": masks / "b.mask.png", "c.webp": masks / "sub" / "c.jpg",
                     "plain.png": None}  # fmt: skip
    assert [i.mask for i in scan_folder(root)] == [root / "a.mask.png", None, None, None]
    # A mask folder inside the dataset folder is not scanned for images.
    mask(root / "masks" / "plain.png")
    items = {i.image.name: i.mask for i in scan_folder(root, mask_dir=root / "masks")}
    assert items["plain.png"] == (root / "masks" / "plain.png").resolve() and len(items) == 4
    mask(root / "masks" / "a.png")  # a second mask for a.jpg: the one beside it wins, the other is unused
    assert {i.image.name: i.mask for i in scan_folder(root, mask_dir=root / "masks")}["a.jpg"] == root / "a.mask.png"
    report = validate_dataset(root, min_resolution=64, mask_dir=root / "masks")
    assert [(p.code, report.rel(p.path)) for p in report.problems] == [("unused-mask", "masks/a.png")]
    for missing in (tmp_path / "nowhere", root):  # a mask folder that is missing, or the dataset folder itself
        with pytest.raises(DataError, match=r"mask folder (does not exist|is the dataset folder)"):
            scan_folder(root, mask_dir=missing)
        with pytest.raises(DataError, match=rf"^{missing}: (the )?mask folder"):
            validate_dataset(root, mask_dir=missing)
    image(root / "a.png", n=5)  # a.jpg and a.png: whose is a.mask.png? training stops, naming it
    with pytest.raises(DataError, match=r"a\.mask\.png: a mask of which image\? a\.jpg and a\.png"):
        scan_folder(root)


def test_validate_reports_each_bad_mask_in_one_line_and_fix_carries_the_good_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, masks = tmp_path / "data", tmp_path / "masks"
    for n, name in enumerate(["good.png", "grey.jpg", "small.png", "broken.png", "black.png", "plain.png"]):
        image(root / name, n=n)
    mask(root / "good.mask.png")
    mask(masks / "grey.png", grey=128)  # from the mask folder: written beside its image in the copy
    mask(root / "small.mask.png", size=(48, 32))
    (root / "broken.mask.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    mask(masks / "black.png", left=0.0)
    mask(root / "lost.mask.png")  # no image lost.*
    mask(masks / "gone" / "x.png")  # no image gone/x.*
    report = validate_dataset(root, min_resolution=64, mask_dir=masks)
    lines = format_report(report).splitlines()
    want = [
        ("ERROR", "broken.mask.png", "cannot read mask (not an image Pillow can read"),
        ("WARNING", "lost.mask.png", "a mask without its image (no lost.jpg/.png/.webp beside it)"),
        ("ERROR", "small.mask.png", "mask is 48x32, its image small.png is 96x64 (a mask must have its image's size)"),
        ("ERROR", str(masks / "black.png"), "mask is all black: nothing of black.png would train"),
        ("WARNING", str(masks / "gone" / "x.png"), "a mask without its image (no gone/x.jpg/.png/.webp in the"),
    ]
    assert len(lines) == len(want) + 1
    for line, (severity, path, reason) in zip(lines, want, strict=False):
        assert line.startswith(f"{severity:<7} {path}: {reason}"), line
    assert lines[-1] == "6 images: 3 ok, 5 with a loss mask, 3 errors, 2 warnings"
    # The command: --mask-dir, the same lines, exit code 1.
    assert main(["data", "validate", str(root), "--min-resolution", "64", "--mask-dir", str(masks)]) == 1
    assert capsys.readouterr().out.splitlines() == lines
    # --fix: an image with a bad mask is dropped with it; good masks go beside their images' copies.
    out = tmp_path / "fixed"
    changes = fix_dataset(root, out, report)
    assert any(c.startswith("small.png: dropped (mask small.mask.png: mask is 48x32") for c in changes)
    assert f"{masks / 'grey.png'}: mask written beside its image as grey.mask.png" in changes
    items = {i.image.name: i.mask and i.mask.name for i in scan_folder(out)}
    assert items == {"good.png": "good.mask.png", "grey.jpg": "grey.mask.png", "plain.png": None}
    assert (out / "good.mask.png").read_bytes() == (root / "good.mask.png").read_bytes()
    assert not validate_dataset(out, min_resolution=64).problems


def test_shards_carry_masks_as_members_and_validate_checks_them(tmp_path: Path) -> None:
    root, masks = tmp_path / "data", tmp_path / "masks"
    image(root / "a.png", n=1)
    image(root / "b.png", n=2)
    mask(masks / "a.png", left=0.25)
    assert main(["data", "shard", "--dataset", str(root), "--output", str(tmp_path / "sh"), "--min-resolution", "64",
                 "--mask-dir", str(masks)]) == 0  # fmt: skip
    samples = {s.key: s for s in iter_raw_samples(str(tmp_path / "sh"))}
    assert samples["a"].mask == (masks / "a.png").read_bytes() and samples["b"].mask is None
    assert samples["a"].mask_name.endswith("data-000000.tar: a.mask.png")
    assert not validate_shards(str(tmp_path / "sh"), min_resolution=64).problems
    with wds.TarWriter(str(tmp_path / "bad.tar")) as w:  # a mask of the wrong size, one line naming the member
        w.write({"__key__": "x", "png": (root / "b.png").read_bytes(), "txt": "hi",
                 "mask.png": mask(tmp_path / "m.png", (32, 32)).read_bytes()})  # fmt: skip
    report = validate_shards(str(tmp_path / "bad.tar"), min_resolution=64)
    assert [p.reason for p in report.problems] == [
        "x.mask.png: mask is 32x32, its image x.png is 96x64 (a mask must have its image's size)"
    ]


# --------------------------------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> tuple[Path, Path]:
    """A folder of 4 images (3 masked: beside, in a mask folder, grey) and its cache (random flips, 1 held out)."""
    base = tmp_path_factory.mktemp("masked")
    root, masks = base / "data", base / "masks"
    image(root / "wide.png", (128, 80), n=1)  # scaled and cropped into its 80x48 bucket
    mask(root / "wide.mask.png", (128, 80), left=0.3)
    image(root / "tall.png", (64, 96), n=2)
    mask(masks / "tall.png", (64, 96), left=0.5, grey=200)
    image(root / "square.png", (64, 64), n=3)
    mask(root / "square.mask.png", (64, 64), left=0.75)
    image(root / "unmasked.png", (64, 64), n=4)
    recipe, _ = parse_train(["--preset", "tiny", "--data.random_flip", "true", "--data.holdout", "1"])
    samples, _ = dataset_source(str(root), None, str(masks))
    build_cache(base / "cache", settings_for(resolve_model(recipe.model), recipe), samples, torch.device("cpu"),
                torch.float32, shard_size=2)  # fmt: skip
    return root, base / "cache"


def test_the_cache_holds_each_mask_at_the_latent_grid_of_its_bucket(masked: tuple[Path, Path]) -> None:
    root, cache = masked
    index = read_index(cache)  # the open-time checks accept (and check) the masks' shapes
    data = CachedSamples(index)
    table = index.samples()
    files = {"wide": root / "wide.mask.png", "tall": root.parent / "masks" / "tall.png",
             "square": root / "square.mask.png"}  # fmt: skip
    samples = {table[i].key: (table[i], data[Slot(i, 1.0, 0)]) for i in range(len(table))}
    samples.update({s["key"]: (None, s) for s in index.val_samples()})
    assert sorted(samples) == ["square", "tall", "unmasked", "wide"]
    for key, (entry, s) in samples.items():
        w, h = s["bucket"] if entry is None else entry.bucket
        assert s["mask"].shape == s["latents"].shape[1:] == (h // 16, w // 16)
        want = hand_weights(files[key], (w, h)) if key in files else torch.ones(h // 16, w // 16)
        torch.testing.assert_close(s["mask"], want, rtol=0, atol=1e-5)
        assert torch.equal(s["mask_flip"], s["mask"].flip(-1))  # flipped as latents_flip is
    wide = samples["wide"][1]["mask"]  # 128x80 -> 80x50 -> 80x48: white on the left 30 %
    assert wide.shape == (3, 5) and wide[:, 0].min() > 0.99 and wide[:, 2:].max() < 0.01
    torch.testing.assert_close(samples["tall"][1]["mask"][:, 0], torch.full((5,), 200 / 255))
    # collate: a batch of masked and unmasked samples stacks them (ones for the unmasked).
    pair = [samples["square"][1], {k: v for k, v in samples["unmasked"][1].items() if not k.startswith("mask")}]
    batch = collate([{**p, "references": []} for p in pair])
    torch.testing.assert_close(batch["mask"], torch.stack([samples["square"][1]["mask"], torch.ones(4, 4)]))
    torch.testing.assert_close(batch["mask_flip"], torch.stack([samples["square"][1]["mask_flip"], torch.ones(4, 4)]))
    # Every check names a mask of the wrong shape.
    expect = _Expect(64, True, {(64, 64)})
    good = {"latents": ("F32", [4, 4, 4]), "latents_flip": ("F32", [4, 4, 4]), "prompt_embeds": ("F32", [64, 8]),
            "mask": ("F32", [4, 4]), "mask_flip": ("F32", [4, 4])}  # fmt: skip
    expect.tensors(good, 64, 64)
    with pytest.raises(_Bad, match=r"whose loss mask is 4x4 \(the latent grid\); its mask_flip is 4x3"):
        expect.tensors({**good, "mask_flip": ("F32", [4, 3])}, 64, 64)
    with pytest.raises(_Bad, match=r"it holds tensors .*, a sample of this cache .*'mask'"):
        expect.tensors({k: v for k, v in good.items() if not k.startswith("mask")}, 64, 64)


def test_a_changed_mask_changes_the_source_id(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image(root / "a.png")
    _, plain = dataset_source(str(root), None)
    m = mask(root / "a.mask.png")
    _, masked_id = dataset_source(str(root), None)
    assert masked_id != plain and json.loads(masked_id)[0][-1][:2] == ["mask", str(m)]
    mask(m, left=0.25)
    assert dataset_source(str(root), None)[1] != masked_id
    m.unlink()
    assert dataset_source(str(root), None)[1] == plain  # an unmasked dataset keeps its id (and its cache)


# ---------------------------------------------------------------------------------------------------- the loss


def test_a_mask_that_zeroes_half_the_image_gives_no_gradient_from_that_half(tiny_dev: Path) -> None:
    """On one batch, the LoRA's gradient with a mask that keeps the top half of the latent grid equals that of the
    mean squared error computed by hand over the top half's tokens only."""
    from diffusers import Flux2Transformer2DModel

    from flux2_lora.model import add_lora

    torch.manual_seed(0)
    model = Flux2Transformer2DModel.from_pretrained(tiny_dev / "transformer")
    model.requires_grad_(False)
    add_lora(model, 4, 4, 0.0, "attention+single", "gaussian", False)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B: every LoRA weight gets a gradient
            torch.nn.init.normal_(p, std=0.1)
    lora = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 2, model.config.in_channels, 4, 6
    x0, noise = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    embeds = torch.randn(b, 8, model.config.joint_attention_dim, generator=g)
    sigmas = torch.tensor([0.3, 0.7])
    ids = (flow.latent_ids(b, h, w), flow.text_ids(b, 8), torch.full((b,), 4.0))
    keep = torch.zeros(b, h, w)
    keep[:, : h // 2] = 1.0  # the top half trains, the bottom half is ignored

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone() for t in torch.autograd.grad(loss, lora)]

    masked = flow.flow_loss(model, x0, embeds, sigmas, noise, *ids, mask=keep)
    pred = flow.predict(model, flow.add_noise(x0, noise, sigmas), embeds, sigmas, *ids)
    error = (pred.float() - flow.pack(noise - x0)) ** 2  # (B, h*w, C), tokens row by row
    by_hand = error[:, : (h // 2) * w].mean(dim=(1, 2)).mean()
    torch.testing.assert_close(masked, by_hand, rtol=1e-6, atol=0)
    for got, want in zip(grads(masked), grads(by_hand), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    whole = flow.flow_loss(model, x0, embeds, sigmas, noise, *ids)
    assert not torch.allclose(whole, masked)  # the other half did count without the mask
    # Normalised by the area: a uniform grey mask is the unmasked loss, all ones too.
    torch.testing.assert_close(flow.flow_loss(model, x0, embeds, sigmas, noise, *ids, mask=keep * 0 + 0.4), whole)
    torch.testing.assert_close(flow.flow_loss(model, x0, embeds, sigmas, noise, *ids, mask=keep * 0 + 1), whole)
    black_first = keep * torch.tensor([0.0, 1.0]).view(2, 1, 1)
    zero = flow.flow_loss(model, x0, embeds, sigmas, noise, *ids, reduce=False, mask=black_first)
    assert float(zero[0].detach()) == 0.0 and torch.isfinite(zero).all()  # an all-black mask trains nothing, no NaN


# ------------------------------------------------------------------------------------------------ a training run


def test_a_short_run_on_a_masked_folder_trains_and_validates_with_the_mask(
    masked: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux2_lora import train as train_mod

    root, _ = masked
    seen: list[torch.Tensor | None] = []

    def spy(*args: Any, **kw: Any) -> torch.Tensor:
        seen.append(kw.get("mask"))
        return flow.flow_loss(*args, **kw)

    monkeypatch.setattr(train_mod, "flow_loss", spy)
    recipe, _ = parse_train(
        ["--preset", "tiny", "--dataset", str(root), "--data.mask_dir", str(root.parent / "masks"),
         "--data.random_flip", "true", "--data.holdout", "1", "--steps", "3", "--output", str(tmp_path / "run"),
         "--validation.prompts", "[]", "--validation.every_n_steps", "0", "--logging.log_every", "1",
         "--output.checkpoint_every", "0"]
    )  # fmt: skip
    trainer = train_mod.Trainer(recipe)
    trainer.setup()
    assert trainer.fit() == tmp_path / "run" / "lora.safetensors"
    assert all(m is not None for m in seen) and len(seen) == 2 * len(recipe.validation.sigmas) + 3
    (val,) = trainer.val_samples
    assert val["key"] == "square" and float(val["mask"].min()) == 0.0  # the held-out sample is a masked one
    for m in seen[: len(recipe.validation.sigmas)]:  # step 0's validation: the held-out sample's own mask
        torch.testing.assert_close(m, val["mask"].unsqueeze(0), rtol=0, atol=0)
    with_mask = trainer.validation_loss()
    del val["mask"]
    assert trainer.validation_loss() != with_mask
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
