"""Evaluation on the tiny FLUX.2-dev model: metrics on constructed cases, the four `eval` commands end to end,
select-best's ranking, the training callbacks, and one-line errors.

About the CLIP model in these tests: it is open_clip's real CLIP architecture built with `pretrained=None` (no
download) from a tiny model config registered from a JSON file (32-d embeddings, 2 vision and 2 text layers, 32 px
images) - not a published CLIP model, and its scores say nothing about real image quality. Its weights are trained
here for a few steps on coloured shapes and their captions (the alignment test checks that it learnt them), saved
as safetensors and loaded through `--clip-weights` / `validation.clip_weights` exactly as a user's file would be.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

from flux2_lora.cli import main
from tests.conftest import reset_accelerate, run_cli

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square")
GEN = ["--size", "32", "--steps", "2"]  # tiny images, 2 denoising steps


def shape_image(color: str, kind: str, size: int = 32) -> Image.Image:
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    c, r = size // 2, size // 3
    box = (c - r, c - r, c + r, c + r)
    (d.ellipse if kind == "circle" else d.rectangle)(box, fill=COLORS[color])
    return im


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The tiny open_clip config (JSON) and its weights (safetensors): random towers (open_clip, pretrained=None)
    whose two output projections are trained with the CLIP contrastive loss on 6 shape/caption pairs.

    Only the projections are trained (on tower features computed once) so that training takes well under a second."""
    from flux2_lora.evaluate.clip import build_clip

    root = tmp_path_factory.mktemp("clip")
    config = root / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    net, preprocess, tokenizer, _ = build_clip(str(config))
    pairs = [(shape_image(c, k), f"a {c} {k}") for c in COLORS for k in SHAPES]
    vproj, tproj = net.visual.proj, net.text_projection
    net.visual.proj, net.text_projection = None, None  # the towers' pooled features, before projection
    with torch.no_grad():
        feats_img = net.encode_image(torch.stack([preprocess(im) for im, _ in pairs]))
        feats_txt = net.encode_text(tokenizer([t for _, t in pairs]))
    net.visual.proj, net.text_projection = vproj, tproj
    labels = torch.arange(len(pairs))
    opt = torch.optim.AdamW([vproj, tproj, net.logit_scale], lr=1e-2, foreach=False)
    for _ in range(100):  # the CLIP loss, both directions
        img = F.normalize(feats_img @ vproj, dim=-1)
        txt = F.normalize(feats_txt @ tproj, dim=-1)
        logits = net.logit_scale.exp() * img @ txt.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    weights = root / "tiny-clip.safetensors"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(weights))
    return SimpleNamespace(config=str(config), weights=str(weights), pairs=pairs)


@pytest.fixture(scope="module")
def clip(clip_files: SimpleNamespace) -> object:
    from flux2_lora.evaluate.clip import load_clip

    return load_clip(clip_files.config, clip_files.weights)


def clip_args(clip_files: SimpleNamespace) -> list[str]:
    return ["--clip-model", clip_files.config, "--clip-weights", clip_files.weights]


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, tiny_dev: Path, sample_data: Path, clip_files: SimpleNamespace
) -> Iterator[Path]:
    """A 4-step tiny run, in-process, with CLIP score and overfitting on at every validation (0, 2, 4)."""

    from flux2_lora.cli import parse_train
    from flux2_lora.train import train

    out = tmp_path_factory.mktemp("run")
    recipe, _ = parse_train(
        ["--preset", "tiny", "--output", str(out), "--steps", "4", "--validation.every_n_steps", "2",
         "--output.checkpoint_every", "2", "--output.keep_last", "5", "--validation.sample_steps", "2",
         "--validation.prompts", '["sks a red circle on a blue background"]',
         "--validation.sample_resolution", "32", "--validation.clip_score", "true", "--validation.overfit_check", "true",
         "--validation.clip_model", clip_files.config, "--validation.clip_weights", clip_files.weights]
    )  # fmt: skip
    try:
        assert train(recipe) is not None
    finally:
        reset_accelerate()
    yield out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------------------------------------
# Metrics on constructed cases
# ---------------------------------------------------------------------------------------------


def test_clip_score_prefers_the_aligned_caption(clip: object, clip_files: SimpleNamespace) -> None:
    """The encoder trained above scores each shape with its own caption above every other caption."""
    from flux2_lora.evaluate.metrics import clip_score

    images = [im for im, _ in clip_files.pairs]
    captions = [t for _, t in clip_files.pairs]
    img, txt = clip.embed_images(images), clip.embed_texts(captions)  # type: ignore[attr-defined]
    n = len(images)
    scores = torch.stack([clip_score(img, txt[j].expand_as(img)) for j in range(n)], dim=1)  # image x caption
    assert (scores.argmax(dim=1) == torch.arange(n)).all(), scores
    assert clip_score(img[:1], txt[:1]) > clip_score(img[:1], txt[3:4])  # red circle vs green square


def test_identical_images_have_zero_diversity(clip: object) -> None:
    from flux2_lora.evaluate.metrics import diversity

    same = clip.embed_images([shape_image("red", "circle")] * 3)  # type: ignore[attr-defined]
    varied = clip.embed_images([shape_image(c, "circle") for c in COLORS])  # type: ignore[attr-defined]
    assert diversity(same) == 0.0
    assert diversity(varied) > 0.01
    assert diversity(same[:1]) == 0.0


def test_a_generation_equal_to_a_training_image_is_flagged_as_overfit(clip: object) -> None:
    from flux2_lora.evaluate.metrics import overfitting

    train_imgs = [shape_image(c, "circle") for c in COLORS]
    train = clip.embed_images(train_imgs)  # type: ignore[attr-defined]
    gens = clip.embed_images([train_imgs[1], shape_image("blue", "square")])  # type: ignore[attr-defined]
    of = overfitting(gens, train, threshold=0.999)
    assert of.flagged == [True, False]
    assert of.nearest[0] == 1 and of.similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert of.similarity[1] < of.similarity[0] and of.fraction == 0.5


def test_rank_follows_the_documented_weights() -> None:
    from flux2_lora.evaluate.metrics import rank

    rows = [
        {"checkpoint": "a", "step": 1, "val_loss": 0.50, "clip_score": 30.0, "diversity": 0.2, "overfit_fraction": 0.0},
        {"checkpoint": "b", "step": 2, "val_loss": 0.40, "clip_score": 20.0, "diversity": 0.1, "overfit_fraction": 0.0},
        {"checkpoint": "c", "step": 3, "val_loss": 0.45, "clip_score": 25.0, "diversity": 0.3, "overfit_fraction": 1.0},
    ]
    only = {"loss": 0.0, "clip": 0.0, "diversity": 0.0, "overfit": 0.0}
    assert [r["checkpoint"] for r in rank(rows, {**only, "loss": 1.0})] == ["b", "c", "a"]  # lowest loss first
    assert [r["checkpoint"] for r in rank(rows, {**only, "clip": 1.0})] == ["a", "c", "b"]  # highest CLIP first
    assert [r["checkpoint"] for r in rank(rows, {**only, "diversity": 1.0})] == ["c", "a", "b"]
    # Defaults (loss 1, clip 1, diversity 0.5, overfit 2): c would win on diversity but is a memoriser.
    ranked = rank(rows, {})
    assert [r["checkpoint"] for r in ranked] == ["a", "b", "c"]
    a = ranked[0]
    assert a["terms"] == {"loss": 0.0, "clip": 1.0, "diversity": 0.5, "overfit": 0.0}
    assert a["score"] == pytest.approx(1.0 * 0.0 + 1.0 * 1.0 + 0.5 * 0.5 - 2.0 * 0.0)
    assert ranked[2]["score"] == pytest.approx(1.0 * 0.5 + 1.0 * 0.5 + 0.5 * 1.0 - 2.0 * 1.0)


def test_builtin_suite_covers_every_category_and_drops_the_trigger_for_leakage() -> None:
    from flux2_lora.evaluate.suite import LEAKAGE, build_suite

    items, trigger = build_suite("sks dog", None, None, builtin=True)
    assert trigger == "sks"
    cats = {it.category for it in items}
    assert cats == {"recontextualisation", "style", "attribute", "composition", LEAKAGE}
    assert all("sks dog" in it.prompt for it in items if it.category != LEAKAGE)
    assert all("sks" not in it.prompt.split() and "dog" in it.prompt for it in items if it.category == LEAKAGE)


# ---------------------------------------------------------------------------------------------
# Training callbacks
# ---------------------------------------------------------------------------------------------


def test_training_logs_clip_score_and_overfitting_next_to_val_loss(run: Path) -> None:
    m = _metrics(run)
    val_steps = [r["step"] for r in m if "val_loss" in r]
    quality = {r["step"]: r for r in m if "clip_score" in r}
    assert val_steps == [0, 2, 4] and sorted(quality) == val_steps
    for r in quality.values():
        assert 0.0 <= r["clip_score"] <= 100.0
        assert -1.0 <= r["overfit_max_similarity"] <= 1.0 and 0.0 <= r["overfit_fraction"] <= 1.0
    events = b"".join(p.read_bytes() for p in (run / "logs").rglob("events.out.tfevents.*"))
    assert b"clip_score" in events and b"overfit_fraction" in events  # TensorBoard too


# ---------------------------------------------------------------------------------------------
# The four commands, end to end (in-process through cli.main; the subprocess wiring is tested below)
# ---------------------------------------------------------------------------------------------


def test_compare_writes_a_grid_and_html_with_the_same_noise_per_column(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    ckpts = [str(run / "checkpoints" / "step-2"), str(run / "checkpoints" / "step-4" / "lora.safetensors")]
    assert main(["eval", "compare", *ckpts, "--prompt", "sks a red circle", "--seeds", "0", "1", "--include-base",
                 "true", "--output", str(out), *GEN]) == 0  # fmt: skip
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 2 * 128 and grid.size[1] > 3 * 128  # 3 rows (base, 2 checkpoints) x 2 seeds
    page = (out / "index.html").read_text()
    srcs = [s.split('"')[0] for s in page.split('src="')[1:]]
    assert len(srcs) == 6 and all((out / s).exists() for s in srcs)
    assert "step-2" in page and "step-4" in page and "base model" in page
    img = {
        (r, s): np.asarray(Image.open(out / "images" / f"row{r:02d}-prompt00-seed{s}.png"), dtype=np.float32)
        for r in range(3)
        for s in (0, 1)
    }
    across_rows = np.abs(img[(0, 0)] - img[(2, 0)]).mean()  # same seed, different LoRA
    across_seeds = np.abs(img[(2, 0)] - img[(2, 1)]).mean()  # same LoRA, different seed
    assert across_rows < across_seeds / 2


def test_assess_quality_writes_json_and_a_table(run: Path, sample_data: Path, clip_files: SimpleNamespace,
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "q"
    assert main(["eval", "assess-quality", "--checkpoint", str(run / "checkpoints" / "step-4"), "--training-data",
                 str(sample_data), "--seeds", "0", "1", "--output", str(out), *GEN, *clip_args(clip_files)]) == 0  # fmt: skip
    result = json.loads((out / "quality.json").read_text())
    row = result["checkpoints"][0]
    # The fixed-seed validation loss, recomputed with the LoRA loaded through diffusers, equals the logged one.
    logged = next(r["val_loss"] for r in _metrics(run) if r.get("step") == 4 and "val_loss" in r)
    assert row["val_loss"] == pytest.approx(logged, rel=1e-5) and row["logged_val_loss"] == logged
    assert 0.0 <= row["clip_score"] <= 100.0 and row["diversity"] >= 0.0
    assert 0.0 <= row["overfit_fraction"] <= 1.0 and row["overfit_max_similarity"] <= 1.0
    assert [p["prompt"] for p in row["prompts"]] == ["sks a red circle on a blue background"]  # the run's prompt
    text = capsys.readouterr().out
    assert "CLIP score" in text and "step-4" in text and "quality.json" in text


def test_test_prompts_runs_a_user_suite_with_a_leakage_check(run: Path, clip_files: SimpleNamespace,
                                                             tmp_path: Path) -> None:  # fmt: skip
    suite = tmp_path / "suite.yaml"
    suite.write_text('prompts:\n  - {category: style, prompt: "a drawing of {concept}"}\n'
                     '  - {category: leakage, prompt: "a photo of {cls}"}\n')  # fmt: skip
    out = tmp_path / "tp"
    assert main(["eval", "test-prompts", "--checkpoint", str(run / "lora.safetensors"), "--concept", "sks circle",
                 "--suite", str(suite), "--no-builtin", "true", "--seeds", "0", "--output", str(out), *GEN,
                 *clip_args(clip_files)]) == 0  # fmt: skip
    result = json.loads((out / "prompts.json").read_text())
    assert result["trigger"] == "sks"
    style, leak = result["prompts"]
    assert style["prompt"] == "a drawing of sks circle" and "leaked" not in style
    assert leak["prompt"] == "a photo of circle" and isinstance(leak["leaked"], bool)
    assert -1.0 <= leak["similarity_to_base"] <= 1.0
    assert style["diversity"] == 0.0  # one seed
    assert Image.open(out / "grid.png").size[1] > 2 * 128 and "| leakage |" in (out / "prompts.md").read_text()


def test_select_best_with_only_loss_weighted_picks_the_lowest_val_loss(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "sb"
    weights = ["--weight-loss", "1", "--weight-clip", "0", "--weight-diversity", "0", "--weight-overfit", "0"]
    assert main(["eval", "select-best", "--run", str(run), *weights, "--output", str(out)]) == 0
    result = json.loads((out / "ranking.json").read_text())
    logged = {r["step"]: r["val_loss"] for r in _metrics(run) if "val_loss" in r and r["step"] in (2, 4)}
    assert result["best"]["checkpoint"] == f"step-{min(logged, key=logged.__getitem__)}"
    assert [r["val_loss"] for r in result["ranking"]] == sorted(logged.values())
    assert f"**Best: {result['best']['checkpoint']}**" in (out / "ranking.md").read_text()


def test_select_best_without_clip_weights_ranks_by_validation_loss_and_says_so(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("flux2_lora.evaluate.clip.hub_cached_weights", lambda arch, tag=None: None)
    out = tmp_path / "sb"
    assert main(["eval", "select-best", "--run", str(run), "--output", str(out)]) == 0  # the default weights
    lines = capsys.readouterr().out.splitlines()
    assert (
        "select-best: no CLIP weights for ViT-B-32 (--clip-weights FILE.safetensors, or open_clip weights in the hub "
        "cache): ranking by validation loss only"
    ) in lines
    result = json.loads((out / "ranking.json").read_text())
    assert result["weights"]["clip"] == result["weights"]["diversity"] == result["weights"]["overfit"] == 0.0
    logged = {r["step"]: r["val_loss"] for r in _metrics(run) if "val_loss" in r and r["step"] in (2, 4)}
    assert result["best"]["checkpoint"] == f"step-{min(logged, key=logged.__getitem__)}"
    # Weights named explicitly that do not exist are still an error.
    missing = str(tmp_path / "nope.safetensors")
    assert main(["eval", "select-best", "--run", str(run), "--clip-weights", missing, "--output", str(out)]) == 2
    assert "nope.safetensors does not exist" in capsys.readouterr().err


def test_select_best_with_clip_terms_ranks_by_the_documented_formula(run: Path, clip_files: SimpleNamespace,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "sb2"
    assert main(["eval", "select-best", str(run / "checkpoints" / "step-2"), str(run / "checkpoints" / "step-4"),
                 "--weight-loss", "0.25", "--weight-clip", "1", "--weight-diversity", "0", "--weight-overfit", "2",
                 "--seeds", "0", "--output", str(out), *GEN, *clip_args(clip_files)]) == 0  # fmt: skip
    result = json.loads((out / "ranking.json").read_text())
    rows = result["ranking"]
    assert all("clip_score" in r and "diversity" in r and "overfit_fraction" in r for r in rows)

    def unit(key: str, higher: bool) -> dict[str, float]:  # the README's rescaling, written out independently
        vals = {r["checkpoint"]: r[key] for r in rows}
        lo, hi = min(vals.values()), max(vals.values())
        return {k: 1.0 if hi == lo else ((v - lo) if higher else (hi - v)) / (hi - lo) for k, v in vals.items()}

    L, C, D = unit("val_loss", False), unit("clip_score", True), unit("diversity", True)
    for r in rows:
        k = r["checkpoint"]
        expected = 0.25 * L[k] + 1.0 * C[k] + 0.0 * D[k] - 2.0 * r["overfit_fraction"]
        assert r["score"] == pytest.approx(expected, abs=1e-5)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert result["best"]["checkpoint"] == rows[0]["checkpoint"]


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 2
# ---------------------------------------------------------------------------------------------


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("flux2-lora: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_or_pickled_clip_weights_are_refused(run: Path, tmp_path: Path) -> None:
    from flux2_lora.evaluate import EvalError
    from flux2_lora.evaluate.clip import load_clip

    with pytest.raises(EvalError, match=r"--clip-weights: .*nope.safetensors does not exist"):
        load_clip("ViT-B-32", str(tmp_path / "nope.safetensors"))
    pickled = tmp_path / "clip.bin"
    pickled.write_bytes(b"not opened")
    with pytest.raises(EvalError, match="not a .safetensors file; only safetensors"):
        load_clip("ViT-B-32", str(pickled))


def test_no_clip_weights_anywhere_says_how_to_provide_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flux2_lora.evaluate import EvalError
    from flux2_lora.evaluate.clip import load_clip

    monkeypatch.setattr("flux2_lora.evaluate.clip.hub_cached_weights", lambda arch, tag=None: None)
    with pytest.raises(
        EvalError, match=r"--clip-weights: no CLIP weights for ViT-B-32: pass --clip-weights .*hf download"
    ):
        load_clip("ViT-B-32", None)


def test_a_lora_for_a_different_model_is_refused(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = run / "checkpoints" / "step-4" / "lora.safetensors"
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    klein = tmp_path / "klein.safetensors"  # the header says FLUX.2 klein
    save_file(tensors, str(klein), metadata={**header, "flux2_lora.family": "klein"})
    assert main(["eval", "compare", str(klein), "--prompt", "x", *GEN]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "klein.safetensors is a LoRA for FLUX.2 klein" in line and "is FLUX.2 dev" in line
    # No family in the header, but shaped for a wider model: the first tensor that does not fit is named.
    wide = tmp_path / "wide.safetensors"
    widened = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else torch.zeros(2 * v.shape[0], v.shape[1])
               for k, v in tensors.items()}  # fmt: skip
    save_file(widened, str(wide), metadata={k: v for k, v in header.items() if k != "flux2_lora.family"})
    assert main(["eval", "compare", str(wide), "--prompt", "x", "--output", str(tmp_path / "o"), *GEN]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "wide.safetensors: transformer." in line and "a LoRA for a different model" in line


# One subprocess per command: the `flux2-lora eval ...` wiring, each on an input error that stops it early.


def test_cli_compare_refuses_a_pickled_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "lora.ckpt"
    ckpt.write_bytes(b"\x80\x04 pickle bytes, never opened")
    res = run_cli("eval", "compare", str(ckpt), "--prompt", "x")
    assert res.returncode == 2
    line = _one_line(res.stderr)
    assert "lora.ckpt is a pickle-based .ckpt file, refused without opening it" in line and "safetensors" in line


def test_cli_assess_quality_names_a_missing_clip_weights_file(run: Path, sample_data: Path, tmp_path: Path) -> None:
    res = run_cli("eval", "assess-quality", "--checkpoint", str(run / "lora.safetensors"), "--training-data",
                  str(sample_data), "--clip-weights", str(tmp_path / "missing.safetensors"))  # fmt: skip
    assert res.returncode == 2
    assert "--clip-weights:" in _one_line(res.stderr) and "missing.safetensors does not exist" in res.stderr


def test_cli_test_prompts_needs_a_concept(run: Path) -> None:
    res = run_cli("eval", "test-prompts", "--checkpoint", str(run / "lora.safetensors"))
    assert res.returncode == 2 and "concept" in _one_line(res.stderr)


def test_cli_select_best_needs_checkpoints(tmp_path: Path) -> None:
    res = run_cli("eval", "select-best", "--run", str(tmp_path))
    assert res.returncode == 2
    assert f"--run: {tmp_path} has no checkpoints/step-N/lora.safetensors" in _one_line(res.stderr)


def test_prompts_are_encoded_as_the_runs_recipe_places_and_quantizes_the_text_encoder(
    run: Path, tmp_path: Path
) -> None:
    import shutil

    from flux2_lora.evaluate.generate import Evaluator
    from flux2_lora.evaluate.runs import checkpoint_refs as _checkpoints

    int8_run = tmp_path / "int8-run"
    shutil.copytree(run, int8_run, ignore=shutil.ignore_patterns("cache", "logs", "samples"))
    recipe = (int8_run / "recipe.yaml").read_text()
    assert "text_encoder_quantize: none" in recipe
    (int8_run / "recipe.yaml").write_text(recipe.replace("text_encoder_quantize: none", "text_encoder_quantize: int8"))
    prompt = "sks a red circle on a blue background"
    emb = {}
    for name, folder in (("none", run), ("int8", int8_run)):
        ev = Evaluator(_checkpoints([str(folder / "checkpoints" / "step-4")], None), device="cpu", steps=2, size=32)
        assert ev.recipe is not None and ev.recipe.model.text_encoder_quantize == name
        emb[name] = ev.encode([prompt])[prompt].float()
    rel = ((emb["int8"] - emb["none"]).norm() / emb["none"].norm()).item()
    assert 0 < rel < 0.03, rel  # int8 weights: close to full precision, and not the same computation
