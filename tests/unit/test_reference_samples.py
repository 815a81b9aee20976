"""Sample prompts with reference images (edits, issue 19): the recipe form and its checks, training samples rendered
with `image=[...]` and their grid, and the eval commands' `--image` and suite `images:`, on the tiny FLUX.2-dev model.

The samples here come from the tiny model's random weights (no training): what is checked is that the references reach
the transformer (more image tokens, a different picture, one that changes with the reference) and that the grids and
reports show them, not what an edit looks like.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_lora.cli import main
from flux2_lora.config import ModelArgs, Recipe
from flux2_lora.errors import RecipeError, UsageError
from flux2_lora.recipe import parse_recipe
from flux2_lora.references import SamplePrompt

GEN = ["--size", "32", "--steps", "2"]
RED, BLUE = (220, 40, 40), (40, 70, 220)
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def swatch(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("flux2-lora: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The recipe: validation.prompts entries with images
# ---------------------------------------------------------------------------------------------


def test_prompts_with_images_from_a_recipe_file_the_command_line_and_the_run_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flux2_lora.run_files import write_recipe

    monkeypatch.chdir(tmp_path)
    swatch(tmp_path / "a.png", RED), swatch(tmp_path / "b.png", BLUE)
    recipe_file = tmp_path / "edit.yaml"
    entry = '{prompt: "make the circle red", images: [a.png, b.png]}'
    recipe_file.write_text(f"validation:\n  prompts:\n    - a plain prompt\n    - {entry}\n")
    out = tmp_path / "out"
    r, _ = parse_recipe(["--preset", "tiny", "--config", str(recipe_file), "--output", str(out)])
    assert r.validation.prompts == ["a plain prompt", SamplePrompt("make the circle red", ["a.png", "b.png"])]
    assert r.validation.prompt_texts() == ["a plain prompt", "make the circle red"]
    assert r.validation.prompt_images() == [[], ["a.png", "b.png"]]

    given = '["x", {"prompt": "y", "images": ["a.png"]}]'
    cli, _ = parse_recipe(["--preset", "tiny", "--output", str(out), "--validation.prompts", given])
    assert cli.validation.prompts == ["x", SamplePrompt("y", ["a.png"])]

    # recipe.yaml in the run folder (as the trainer writes it) reads back to the same prompts.
    out.mkdir()
    write_recipe(out / "recipe.yaml", r)
    back, _ = parse_recipe(["--config", str(out / "recipe.yaml")])
    assert back.validation.prompts == r.validation.prompts


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ('["ok", {"prompt": "p", "images": ["ref.png", "nope.png"]}]',
         "validation.prompts[1].images[1]: nope.png does not exist"),
        ('[{"prompt": "p", "images": ["text.png"]}]',
         "validation.prompts[0].images[0]: text.png is not an image file Pillow can read"),
        ('[{"prompt": "p", "images": ["small.png"]}]',
         "validation.prompts[0].images[0]: small.png is 32x32; FLUX.2 takes reference images of at least 64 pixels"),
        ('[{"prompt": "p", "images": ["thin.png"]}]', "validation.prompts[0].images[0]: thin.png is 640x64"),
        ('[{"prompt": "p", "images": ["refs"]}]', "validation.prompts[0].images[0]: refs is a folder, not an image"),
        ('[{"prompt": "p", "images": ' + json.dumps(["ref.png"] * 11) + "}]",
         "validation.prompts[0].images: at most 10 reference images (FLUX.2 takes up to 10), got 11"),
        ('[{"prompt": "p", "imagez": ["ref.png"]}]', "validation.prompts: cannot read [{"),  # a misspelt key
        ("[5]", "validation.prompts: cannot read [5] as a list of prompts"),
    ],
)  # fmt: skip
def test_bad_reference_images_on_the_command_line_are_one_line(
    prompts: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    swatch(tmp_path / "ref.png", RED)
    swatch(tmp_path / "small.png", RED, (32, 32))
    swatch(tmp_path / "thin.png", RED, (640, 64))
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "refs").mkdir()
    assert main(["train", "--preset", "tiny", "--output", str(tmp_path / "out"), "--validation.prompts", prompts]) == 2
    line = _one_line(capsys.readouterr().err)
    assert message in line, line
    assert not (tmp_path / "out").exists()  # stopped before the run started


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{prompt: p, imagez: [ref.png]}", "validation.prompts[0]: unknown key 'imagez' (an entry is a prompt string or"),
        ("{images: [ref.png]}", "validation.prompts[0].prompt: must be a string, got None"),
        ("{prompt: p, images: ref.png}", "validation.prompts[0].images: must be a list of image files, got 'ref.png'"),
        ("5", "validation.prompts[0]: must be a prompt string or {prompt: TEXT, images: [FILE, ...]}, got 5"),
    ],
)  # fmt: skip
def test_misshapen_entries_in_a_recipe_file_name_the_entry(entry: str, message: str, tmp_path: Path) -> None:
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"validation:\n  prompts:\n    - {entry}\n")
    with pytest.raises((RecipeError, UsageError)) as e:
        parse_recipe(["--preset", "tiny", "--config", str(recipe_file), "--output", str(tmp_path / "out")])
    assert str(e.value).startswith(message) and str(e.value).endswith(f" in {recipe_file}"), e.value


# ---------------------------------------------------------------------------------------------
# Training samples: render_samples with references, and the grid
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler(tiny_dev: Path) -> SimpleNamespace:
    """What render_samples reads of a Trainer: the tiny model's transformer (random weights) and two prompt embeddings."""
    from flux2_lora.model import load_transformer, resolve_model

    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    transformer = load_transformer(src, torch.float32)
    dim = transformer.config.joint_attention_dim
    recipe = Recipe()
    recipe.model.name_or_path = str(tiny_dev)
    recipe.validation.sample_steps, recipe.validation.sample_resolution = 2, 32
    embeds = torch.randn(8, dim, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(
        recipe=recipe, src=src, model=transformer, device=torch.device("cpu"),
        accelerator=SimpleNamespace(unwrap_model=lambda m: m), empty_embeds=torch.zeros(8, dim),
        sample_embeds=[embeds], tokens=[],
    )  # fmt: skip


def _render(trainer: SimpleNamespace, out: Path, prompts: list[str | SamplePrompt]) -> tuple[np.ndarray, Path]:
    """render_samples for one prompt: (the sample, the grid path); trainer.tokens gets each forward's image tokens."""
    from flux2_lora.sampling import render_samples

    trainer.recipe.validation.prompts = prompts
    trainer.out = out
    trainer.tokens.clear()
    hook = trainer.model.register_forward_pre_hook(
        lambda _m, _a, kw: trainer.tokens.append(kw["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        (path,) = render_samples(trainer, 7)
    finally:
        hook.remove()
    return np.asarray(Image.open(path), dtype=np.float32), out / "samples" / "step-000007-grid.png"


def test_a_sample_with_references_renders_an_edit_of_them(sampler: SimpleNamespace, tmp_path: Path) -> None:
    red, blue = swatch(tmp_path / "red.png", RED), swatch(tmp_path / "blue.png", BLUE, (96, 64))
    text = "make the circle red"
    plain, plain_grid = _render(sampler, tmp_path / "plain", [text])
    plain_tokens = set(sampler.tokens)
    edit, grid = _render(sampler, tmp_path / "edit", [SamplePrompt(text, [str(red)])])
    edit_tokens = set(sampler.tokens)
    other, _ = _render(sampler, tmp_path / "other", [SamplePrompt(text, [str(blue), str(red)])])
    two_tokens = set(sampler.tokens)
    again, _ = _render(sampler, tmp_path / "again", [SamplePrompt(text, [str(red)])])
    # 32x32 target: (32/16)^2 = 4 tokens; a 64x64 reference adds 16, a 96x64 one 24 more.
    assert plain_tokens == {4} and edit_tokens == {4 + 16} and two_tokens == {4 + 24 + 16}
    assert plain.shape == edit.shape == other.shape == (32, 32, 3)  # the sample size, not the reference's
    # Same prompt and seed: the same references give the same picture, other references (or none) another one. (The
    # tiny model's random weights make the references' effect small, but rendering is deterministic.)
    assert np.array_equal(edit, again)
    assert np.abs(plain - edit).mean() > 0.05 and np.abs(edit - other).mean() > 0.05
    # The grid: the sample with a strip of its references on its left (a third of its width).
    assert Image.open(plain_grid).size == (32, 32)
    g = np.asarray(Image.open(grid).convert("RGB"), dtype=np.float32)
    assert g.shape == (32, 32 + 10, 3)
    assert np.abs(g[16, 5] - np.array(RED)).max() < 30  # the reference, scaled into the strip
    assert np.array_equal(g[:, 10:], edit)  # the sample beside it, as saved


def test_reference_tile_keeps_the_order_and_fits_every_reference() -> None:
    from flux2_lora.sampling import beside_references, reference_tile

    refs = [Image.new("RGB", (64, 64), c) for c in (RED, BLUE, (0, 200, 0))]
    tile = np.asarray(reference_tile(refs, (30, 90)), dtype=np.float32)  # a tall strip: one column of three
    for k, color in enumerate((RED, BLUE, (0, 200, 0))):
        assert np.abs(tile[15 + 30 * k, 15] - np.array(color)).max() < 30
    wide = np.asarray(reference_tile(refs[:2], (64, 32)), dtype=np.float32)  # a wide tile: side by side
    assert np.abs(wide[16, 16] - np.array(RED)).max() < 30 and np.abs(wide[16, 48] - np.array(BLUE)).max() < 30
    blank = beside_references(Image.new("RGB", (48, 48), RED), [])
    assert blank.size == (64, 48) and np.asarray(blank)[24, 8].tolist() == [40, 40, 40]  # an empty strip


# ---------------------------------------------------------------------------------------------
# eval: --image, a run's prompts with images, suite entries with images
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path) -> Path:
    """A run folder with a LoRA (random lora_B, no training) and a recipe.yaml whose sample prompt has a reference."""
    from flux2_lora.checkpoint import save_lora
    from flux2_lora.model import add_lora, load_transformer, pipeline_class, resolve_model
    from flux2_lora.run_files import write_recipe

    run = tmp_path_factory.mktemp("edit-run")
    src = resolve_model(ModelArgs(name_or_path=str(tiny_dev)))
    transformer = load_transformer(src, torch.float32)
    config = add_lora(transformer, 4, None, 0.0, "attention", "gaussian", False)
    torch.manual_seed(0)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    meta = {"base_model": str(tiny_dev), "family": "dev", "trigger": "sks", "rank": 4, "resolution": 32}
    save_lora(run / "lora.safetensors", transformer, pipeline_class(src), config, meta)
    recipe = Recipe()
    recipe.model.name_or_path = str(tiny_dev)
    recipe.data.dataset = "builtin:edit"
    recipe.validation.prompts = [SamplePrompt("make the circle red", [str(swatch(run / "ref.png", RED))])]
    write_recipe(run / "recipe.yaml", recipe)
    return run


@pytest.fixture(scope="module")
def clip_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A tiny open_clip model with random weights (test-prompts needs one; its scores mean nothing here)."""
    from safetensors.torch import save_file

    from flux2_lora.evaluate.clip import build_clip

    root = tmp_path_factory.mktemp("clip")
    (root / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    net = build_clip(str(root / "tiny-clip.json"))[0]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "tiny-clip.safetensors"))
    return ["--clip-model", str(root / "tiny-clip.json"), "--clip-weights", str(root / "tiny-clip.safetensors")]


def test_eval_compare_with_image_and_with_the_runs_own_references(lora_run: Path, tmp_path: Path) -> None:
    blue = swatch(tmp_path / "blue.png", BLUE)
    lora = str(lora_run / "lora.safetensors")
    # No --prompt: the run's sample prompt with its own reference (red); then --image in its place (blue).
    assert main(["eval", "compare", lora, "--output", str(tmp_path / "run"), *GEN]) == 0
    assert main(["eval", "compare", lora, "--prompt", "make the circle red", "--image", str(blue), "--output",
                 str(tmp_path / "blue"), *GEN]) == 0  # fmt: skip

    def sample(name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / name / "images" / "row00-prompt00-seed0.png"), dtype=np.float32)

    assert np.abs(sample("run") - sample("blue")).mean() > 0.05  # same prompt and seed, another reference
    run_result = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert run_result["prompts"] == [{"prompt": "make the circle red", "images": [str(lora_run / "ref.png")]}]
    result = json.loads((tmp_path / "blue" / "compare.json").read_text())
    assert result["prompts"] == [{"prompt": "make the circle red", "images": [str(blue)]}]
    assert [r["lora"] for r in result["rows"]] == [lora]  # the references row is not a LoRA's
    # A references row on top of the grid (labels 140 + one column; header 34 + references + one LoRA) and the page.
    assert Image.open(tmp_path / "blue" / "grid.png").size == (140 + 128, 34 + 2 * 128)
    page = (tmp_path / "blue" / "index.html").read_text()
    assert "references-prompt00.png" in page and "<th>references</th>" in page
    tile = np.asarray(Image.open(tmp_path / "blue" / "images" / "references-prompt00.png"), dtype=np.float32)
    assert tile.shape == (32, 32, 3) and np.abs(tile[16, 16] - np.array(BLUE)).max() < 30


def test_eval_test_prompts_with_image_and_suite_entries_with_images(
    lora_run: Path, clip_args: list[str], tmp_path: Path
) -> None:
    red = swatch(tmp_path / "red.png", RED)
    swatch(tmp_path / "suite" / "refs" / "blue.png", BLUE)
    suite = tmp_path / "suite" / "edits.yaml"
    suite.write_text(
        "prompts:\n  - {category: edit, prompt: 'make {concept} blue', images: [refs/blue.png]}\n"
        "  - 'make {concept} red'\n"
    )
    out = tmp_path / "tp"
    assert main(["eval", "test-prompts", "--checkpoint", str(lora_run / "lora.safetensors"), "--concept",
                 "sks circle", "--suite", str(suite), "--no-builtin", "true", "--image", str(red), "--seeds", "0",
                 "--output", str(out), *GEN, *clip_args]) == 0  # fmt: skip
    result = json.loads((out / "prompts.json").read_text())
    first, second = result["prompts"]
    assert first["prompt"] == "make sks circle blue" and first["images"] == [str(suite.parent / "refs" / "blue.png")]
    assert second["prompt"] == "make sks circle red" and second["images"] == [str(red)]  # --image: no images of its own
    # The grid starts with a references column: labels (140) + references + one seed, two rows.
    assert Image.open(out / "grid.png").size == (140 + 2 * 128, 34 + 2 * 128)
    tile = np.asarray(Image.open(out / "images" / "references-prompt00.png"), dtype=np.float32)
    assert np.abs(tile[16, 16] - np.array(BLUE)).max() < 30


def test_eval_bad_reference_images_are_one_line(
    lora_run: Path, clip_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lora = str(lora_run / "lora.safetensors")
    small = swatch(tmp_path / "small.png", RED, (48, 48))
    out = ["--output", str(tmp_path / "o"), *GEN]
    assert main(["eval", "compare", lora, "--prompt", "x", "--image", str(tmp_path / "nope.png"), *out]) == 2
    assert _one_line(capsys.readouterr().err).endswith(f"--image: {tmp_path / 'nope.png'} does not exist")
    assert main(["eval", "compare", lora, "--prompt", "x", "--image", str(small), *out]) == 2
    assert f"--image: {small} is 48x48; FLUX.2 takes reference images" in _one_line(capsys.readouterr().err)
    many = ["--image", str(lora_run / "ref.png")] * 11
    assert main(["eval", "compare", lora, "--prompt", "x", *many, *out]) == 2
    assert "--image: at most 10 reference images (FLUX.2 takes up to 10), got 11" in _one_line(capsys.readouterr().err)

    suite = tmp_path / "suite.yaml"
    suite.write_text("prompts:\n  - 'a photo of {concept}'\n  - {prompt: 'edit {concept}', images: [gone.png]}\n")
    tp = ["eval", "test-prompts", "--checkpoint", lora, "--concept", "sks circle", "--no-builtin", "true", *clip_args]
    assert main([*tp, "--suite", str(suite), *out]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.endswith(f"--suite: {suite}: item 1 images[0]: {tmp_path / 'gone.png'} does not exist"), line
    assert main([*tp, "--suite", str(suite), "--image", str(tmp_path / "text.txt"), *out]) == 2
    assert f"--image: {tmp_path / 'text.txt'} does not exist" in _one_line(capsys.readouterr().err)

    # A run whose recipe names a reference that has gone: named with the run's recipe.yaml.
    moved = tmp_path / "moved-run"
    moved.mkdir()
    (moved / "lora.safetensors").write_bytes((lora_run / "lora.safetensors").read_bytes())
    (moved / "recipe.yaml").write_text(
        (lora_run / "recipe.yaml").read_text().replace(str(lora_run / "ref.png"), str(tmp_path / "gone.png"))
    )
    assert main(["eval", "compare", str(moved / "lora.safetensors"), *out]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"validation.prompts[0].images[0] (in {moved}/recipe.yaml): {tmp_path / 'gone.png'} does not exist" in line
