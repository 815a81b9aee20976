"""The four evaluations: compare checkpoints, assess their quality, run a prompt suite, rank them.

Each takes LoRA checkpoints as paths (a `.safetensors` file or a `checkpoints/step-N` folder) or a training run
(all of its checkpoints: `checkpoint_refs`). The base model comes from the LoRA header (`flux2_lora.base_model`)
unless a model is named; generation settings default to the run's recipe. CLIP weights: a `.safetensors` file, or
an open_clip safetensors file in the hub cache. Each writes its images, JSON and pages to an output folder and
returns what it measured; the command layer (`flux2-lora eval ...`) prints it.

A prompt may carry reference images (an edit): `--image FILE` for every prompt, a run's `validation.prompts` entry
`{prompt, images}`, a suite entry's `images:`. Each is checked before any model loads and given to the pipeline as
`image=[...]`; the grids show them (a `references` row or column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import MAX_REFERENCES
from ..errors import UsageError
from ..references import SamplePrompt, open_reference
from ..sampling import reference_tile
from . import EvalError
from .clip import DEFAULT_CLIP_MODEL, ClipModel, load_clip
from .generate import Evaluator, LoraRef, logged_val_loss, resolve_lora, run_checkpoints, strip_trigger, training_images
from .metrics import OVERFIT_THRESHOLD, clip_score, diversity, overfitting, rank
from .report import html_page, labelled_grid, markdown_table, write_json

# ---------------------------------------------------------------------------------------------
# What every evaluation starts from
# ---------------------------------------------------------------------------------------------


def checkpoint_refs(ckpts: list[str], run: str | None, what: str = "CKPT") -> list[LoraRef]:
    """The LoRAs named (files or checkpoint folders) and, with `run`, every checkpoint of that run; each file once."""
    refs = [resolve_lora(c, what) for c in ckpts]
    if run:
        refs += run_checkpoints(run)
    unique: dict[Path, LoraRef] = {}
    for r in refs:
        unique.setdefault(r.path.resolve(), r)  # each file once
    refs = list(unique.values())
    if not refs:
        raise UsageError(f"{what}: give at least one LoRA checkpoint or --run OUTPUT")
    return refs


def evaluator(
    refs: list[LoraRef],
    seeds: list[int],
    model: str | None = None,
    size: int | None = None,
    steps: int = 28,
    guidance: float = 4.0,
    max_sequence_length: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> Evaluator:
    """The Evaluator for these LoRAs, after checking the generation settings."""
    if steps < 1:
        raise EvalError(f"--steps: must be >= 1, got {steps}")
    if not seeds:
        raise EvalError("--seeds: give at least one seed")
    return Evaluator(refs, model, device, dtype, size, steps, guidance, max_sequence_length)


def eval_device(device: str | None) -> torch.device:
    """`device`, else cuda when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def output_dir(output: str | None, refs: list[LoraRef], name: str) -> Path:
    """`output`, else RUN/eval/NAME for the first LoRA from a run, else eval/NAME; created."""
    if output:
        out = Path(output).expanduser()
    else:
        run = next((r.run for r in refs if r.run is not None), None)
        out = (run / "eval" / name) if run is not None else Path("eval") / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def eval_clip(
    device: torch.device,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_weights: str | None = None,
    clip_pretrained: str | None = None,
    overfit_threshold: float = OVERFIT_THRESHOLD,
) -> ClipModel:
    """The CLIP model, after checking the overfitting threshold (so a bad one fails before any model loads)."""
    if not 0.0 < overfit_threshold <= 1.0:
        raise EvalError(f"--overfit-threshold: must be in (0, 1], got {overfit_threshold}")
    return load_clip(clip_model, clip_weights, clip_pretrained, device)


def eval_prompts(
    prompt: list[str] | None, ev: Evaluator, fallback: list[str] | None = None, images: list[str] | None = None
) -> list[SamplePrompt]:
    """The prompts given, else the run's validation prompts (with their reference images), else `fallback`.

    images (--image): the reference images of every prompt, in place of a run prompt's own. Every reference is read
    here, before any model loads: a missing or unusable file is one line naming it."""
    items = [SamplePrompt(p) for p in prompt or []]
    run = next((r.run for r in ev.refs if r.run is not None), None)
    if not items and ev.recipe is not None:
        v = ev.recipe.validation
        items = [SamplePrompt(t, paths) for t, paths in zip(v.prompt_texts(), v.prompt_images(), strict=True)]
        for i, it in enumerate(items):
            for j, path in enumerate(it.images if not images else []):
                ev.references([path], f"validation.prompts[{i}].images[{j}] (in {run}/recipe.yaml)")
    if not items and fallback:
        items = [SamplePrompt(p) for p in fallback]
    if not items:
        raise EvalError("--prompt: give at least one prompt (the run's recipe has no validation.prompts)")
    if images:
        check_images(images)
        ev.references(images)
        items = [SamplePrompt(it.prompt, list(images)) for it in items]
    return items


def check_images(images: list[str], field_name: str = "--image") -> None:
    """At most MAX_REFERENCES reference images, each one FLUX.2's pipelines take (an EvalError naming it)."""
    if len(images) > MAX_REFERENCES:
        raise EvalError(
            f"{field_name}: at most {MAX_REFERENCES} reference images (FLUX.2 takes up to {MAX_REFERENCES}), "
            f"got {len(images)}"
        )
    for path in images:
        open_reference(path, field_name, EvalError)


def shown(items: list[SamplePrompt]) -> list[Any]:
    """The prompts as the JSON reports hold them: a string, or {prompt, images} for one with references."""
    return [it.prompt if not it.images else {"prompt": it.prompt, "images": it.images} for it in items]


def reference_tiles(ev: Evaluator, items: list[Any], out: Path) -> list[Path] | None:
    """Each item's references as one image of the generation size, saved as OUT/images/references-promptNN.png; None
    when no item has references (the grids then have no references row or column)."""
    if not any(it.images for it in items):
        return None
    paths = []
    for j, it in enumerate(items):
        path = out / "images" / f"references-prompt{j:02d}.png"
        reference_tile(ev.references(it.images), (ev.gen.size, ev.gen.size)).save(path)
        paths.append(path)
    return paths


def training_data_of(given: str | None, ev: Evaluator, required: bool) -> str | None:
    """The training images given, else the run's dataset (an error when `required` and there is none)."""
    data = given or (ev.recipe.data.dataset if ev.recipe is not None else None)
    if data is None and required:
        raise EvalError("--training-data: needed (an image folder or shards; the run's recipe names no dataset)")
    return data


def run_trigger(ev: Evaluator) -> str | None:
    """The trigger word of the run's recipe, else of the first LoRA header that names one."""
    if ev.recipe is not None and ev.recipe.data.trigger:
        return ev.recipe.data.trigger
    return next((r.trigger for r in ev.refs if r.trigger), None)


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def compare(
    ev: Evaluator, items: list[SamplePrompt], seeds: list[int], out: Path, include_base: bool = False
) -> dict[str, Any]:
    """One row per LoRA (the base model first with `include_base`), one column per (prompt, seed) with the same
    noise down each column; a `references` row on top when a prompt has reference images. Writes OUT/images,
    grid.png, index.html and compare.json; returns the grid and page paths and the row labels."""
    prompts = [it.prompt for it in items]
    embeds = ev.encode(prompts)
    ev.load()
    rows: list[LoraRef | None] = ([None] if include_base else []) + list(ev.refs)
    labels = [r.label if r is not None else "base model" for r in rows]
    cols = [(j, s) for j in range(len(prompts)) for s in seeds]
    col_labels = [f"#{j + 1} seed {s}\n{prompts[j]}" for j, s in cols]
    (out / "images").mkdir(exist_ok=True)
    cells: list[list[Any]] = []
    files: list[list[Path]] = []
    tiles = reference_tiles(ev, items, out)
    if tiles is not None:
        labels.insert(0, "references")
        files.append([tiles[j] for j, _ in cols])
        cells.append([Image.open(f).convert("RGB") for f in files[0]])
    bar = tqdm(total=len(rows) * len(cols), desc="eval: compare", unit="img")
    for i, ref in enumerate(rows):
        ev.use(ref)
        row, row_files = [], []
        for j, s in cols:
            image = ev.generate(embeds[prompts[j]], s, items[j].images)
            path = out / "images" / f"row{i:02d}-prompt{j:02d}-seed{s}.png"
            image.save(path)
            row.append(image)
            row_files.append(path)
            bar.update(1)
        cells.append(row)
        files.append(row_files)
    bar.close()
    ev.use(None)
    grid = labelled_grid(cells, labels, col_labels)
    grid.save(out / "grid.png")
    notes = [f"{j + 1}: {it.prompt}" + (f" (references: {', '.join(it.images)})" if it.images else "")
             for j, it in enumerate(items)]  # fmt: skip
    notes.append(
        f"model {ev.src.name}; {ev.gen.size}px, {ev.gen.steps} steps, guidance {ev.gen.guidance}; same seed = same noise"
    )
    page = html_page(out / "index.html", "flux2-lora: checkpoint comparison", labels, col_labels, files, notes)
    generated = files[1:] if tiles is not None else files
    write_json(out / "compare.json", {
        "model": ev.src.name, "prompts": shown(items), "seeds": seeds, "settings": vars(ev.gen),
        "rows": [{"label": r.label if r else "base model", "lora": str(r.path) if r else None,
                  "images": [str(f) for f in fs]} for r, fs in zip(rows, generated, strict=True)],
    })  # fmt: skip
    return {"grid": out / "grid.png", "html": page, "labels": labels}


# ---------------------------------------------------------------------------------------------
# assess-quality (and the measurements select-best ranks)
# ---------------------------------------------------------------------------------------------


def assess(
    ev: Evaluator,
    clip: ClipModel | None,
    items: list[SamplePrompt],
    embeds: dict[str, torch.Tensor],
    seeds: list[int],
    train: tuple[list[str], torch.Tensor] | None,
    threshold: float,
    index: Any,
    image_dir: Path | None,
    prefer_logged_loss: bool = False,
) -> list[dict[str, Any]]:
    """Per checkpoint: validation loss, CLIP score, diversity and overfitting (each only where it can be measured).

    clip None: no generation (loss only). train: (keys, embeddings) of the training images, or None.
    index: the cached validation items, or None to use only the loss the run logged."""
    trigger = run_trigger(ev)
    texts = clip.embed_texts([strip_trigger(it.prompt, trigger) for it in items]) if clip is not None else None
    rows = []
    for i, ref in enumerate(tqdm(ev.refs, desc="eval: checkpoints", unit="ckpt")):
        ev.use(ref)
        logged = logged_val_loss(ref)
        computed = None if index is None or (prefer_logged_loss and logged is not None) else ev.validation_loss(index)
        row: dict[str, Any] = {
            "checkpoint": ref.label,
            "path": str(ref.path),
            "step": ref.step,
            "val_loss": computed if computed is not None else logged,
            "logged_val_loss": logged,
        }
        if clip is not None and texts is not None:
            per_prompt: list[dict[str, Any]] = []
            all_emb: list[torch.Tensor] = []
            where: list[tuple[str, int]] = []
            for j, it in enumerate(items):
                prompt = it.prompt
                images = [ev.generate(embeds[prompt], s, it.images) for s in seeds]
                if image_dir is not None:
                    for s, im in zip(seeds, images, strict=True):
                        im.save(image_dir / f"ckpt{i:02d}-prompt{j:02d}-seed{s}.png")
                emb = clip.embed_images(images)
                scores = clip_score(emb, texts[j].expand_as(emb))
                per_prompt.append({"prompt": prompt, "clip_score": float(scores.mean()), "diversity": diversity(emb)})
                if it.images:
                    per_prompt[-1]["images"] = it.images
                all_emb.append(emb)
                where += [(prompt, s) for s in seeds]
            row["clip_score"] = sum(p["clip_score"] for p in per_prompt) / len(per_prompt)
            row["diversity"] = sum(p["diversity"] for p in per_prompt) / len(per_prompt)
            row["prompts"] = per_prompt
            if train is not None:
                keys, train_emb = train
                of = overfitting(torch.cat(all_emb), train_emb, threshold)
                row.update(
                    overfit_fraction=of.fraction,
                    overfit_max_similarity=of.max_similarity,
                    overfit_mean_similarity=of.mean_similarity,
                    overfit_flagged=[
                        {"prompt": pr, "seed": s, "training_image": keys[k], "similarity": sim}
                        for (pr, s), k, sim, flag in zip(where, of.nearest, of.similarity, of.flagged, strict=True)
                        if flag
                    ],
                )
        rows.append(row)
    ev.use(None)
    return rows


QUALITY_COLUMNS = [
    ("checkpoint", "checkpoint"),
    ("step", "step"),
    ("val_loss", "val loss"),
    ("clip_score", "CLIP score"),
    ("diversity", "diversity"),
    ("overfit_fraction", "overfit share"),
    ("overfit_max_similarity", "max sim to train"),
]


def assess_quality(
    ev: Evaluator,
    clip: ClipModel,
    data: str,
    prompt: list[str] | None,
    seeds: list[int],
    overfit_threshold: float,
    out: Path,
) -> dict[str, Any]:
    """Validation loss, CLIP score, diversity and overfitting of each checkpoint, against the training images in
    `data`. Prompts: `prompt`, else the run's validation prompts, else up to four training captions. Writes the
    generations to OUT/images and the result to OUT/quality.json, and returns that result."""
    from ..data.cache import full_caption

    keys, captions, images = training_images(data, ev.recipe.data.instance_prompt if ev.recipe else None)
    trigger = run_trigger(ev)
    items = eval_prompts(prompt, ev, [full_caption(c, trigger) for c in dict.fromkeys(captions) if c][:4])
    train = (keys, clip.embed_images(images))
    index = ev.val_cache(data, out)
    embeds = ev.encode([it.prompt for it in items])
    ev.load()
    (out / "images").mkdir(exist_ok=True)
    rows = assess(ev, clip, items, embeds, seeds, train, overfit_threshold, index, out / "images")
    result = {
        "model": ev.src.name,
        "clip_model": clip.name,
        "clip_weights": clip.weights,
        "training_data": data,
        "overfit_threshold": overfit_threshold,
        "prompts": shown(items),
        "seeds": seeds,
        "settings": vars(ev.gen),
        "checkpoints": rows,
    }
    write_json(out / "quality.json", result)
    return result


# ---------------------------------------------------------------------------------------------
# test-prompts
# ---------------------------------------------------------------------------------------------


PROMPT_COLUMNS = [
    ("category", "category"),
    ("prompt", "prompt"),
    ("clip_score", "CLIP score"),
    ("diversity", "diversity"),
    ("similarity_to_base", "sim to base"),
    ("leaked", "leaked"),
]


def test_prompts(
    ev: Evaluator,
    clip: ClipModel,
    items: list[Any],
    trigger: str,
    seeds: list[int],
    leakage_threshold: float,
    out: Path,
) -> dict[str, Any]:
    """Each suite prompt on the LoRA, with CLIP score and diversity; a leakage prompt (no trigger) is also run on
    the base model and flagged when its images drift from the base model's. Writes OUT/images, grid.png,
    prompts.json and prompts.md; returns the result written to prompts.json. An item with reference images is an
    edit of them (the grid then starts with a references column)."""
    from .suite import LEAKAGE

    prompts = [it.prompt for it in items]
    embeds = ev.encode(prompts)
    ev.load()
    (out / "images").mkdir(exist_ok=True)
    tiles = reference_tiles(ev, items, out)
    texts = clip.embed_texts([strip_trigger(p, trigger) for p in prompts])
    ref = ev.refs[0]
    cells, rows = [], []
    bar = tqdm(total=len(items) * len(seeds), desc="eval: prompts", unit="img")
    for j, it in enumerate(items):
        ev.use(ref)
        images = []
        for s in seeds:
            images.append(ev.generate(embeds[it.prompt], s, it.images))
            images[-1].save(out / "images" / f"prompt{j:02d}-seed{s}.png")
            bar.update(1)
        emb = clip.embed_images(images)
        row: dict[str, Any] = {
            "category": it.category,
            "prompt": it.prompt,
            "clip_score": float(clip_score(emb, texts[j].expand_as(emb)).mean()),
            "diversity": diversity(emb),
        }
        if it.images:
            row["images"] = it.images
        if it.category == LEAKAGE:
            ev.use(None)  # the base model, same prompt, references and seeds
            base = clip.embed_images([ev.generate(embeds[it.prompt], s, it.images) for s in seeds])
            sim = float((emb * base).sum(-1).mean())
            row.update(similarity_to_base=sim, leaked=sim < leakage_threshold)
        rows.append(row)
        cells.append(images if tiles is None else [Image.open(tiles[j]).convert("RGB"), *images])
    bar.close()
    ev.use(None)
    col_labels = ([] if tiles is None else ["references"]) + [f"seed {s}" for s in seeds]
    labelled_grid(cells, [f"{r['category']}: {r['prompt']}" for r in rows], col_labels).save(out / "grid.png")
    result = {
        "checkpoint": str(ref.path),
        "trigger": trigger,
        "clip_model": clip.name,
        "seeds": seeds,
        "leakage_threshold": leakage_threshold,
        "settings": vars(ev.gen),
        "prompts": rows,
    }
    write_json(out / "prompts.json", result)
    (out / "prompts.md").write_text(
        f"# Prompt suite: {ref.label}\n\nTrigger `{trigger}`; CLIP scores against each prompt without the trigger; "
        f"`leaked`: a prompt without the trigger drifts from the base model (similarity < {leakage_threshold}).\n\n"
        + markdown_table(rows, PROMPT_COLUMNS)
        + "\n\n![grid](grid.png)\n"
    )
    return result


# ---------------------------------------------------------------------------------------------
# select-best
# ---------------------------------------------------------------------------------------------


RANK_COLUMNS = [
    ("rank", "rank"),
    ("checkpoint", "checkpoint"),
    ("step", "step"),
    ("score", "score"),
    ("val_loss", "val loss"),
    ("clip_score", "CLIP score"),
    ("diversity", "diversity"),
    ("overfit_fraction", "overfit share"),
]


def check_weights(weights: dict[str, float]) -> None:
    """Every weight of the composite score (DEFAULT_WEIGHTS' keys) >= 0, and one at least > 0."""
    for k, w in weights.items():
        if w < 0:
            raise EvalError(f"--weight-{k}: must be >= 0, got {w}")
    if not any(weights.values()):
        raise EvalError("--weight-*: at least one weight must be > 0")


def select_best(
    ev: Evaluator,
    weights: dict[str, float],
    out: Path,
    seeds: list[int],
    prompt: list[str] | None = None,
    training_data: str | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_weights: str | None = None,
    clip_pretrained: str | None = None,
    overfit_threshold: float = OVERFIT_THRESHOLD,
) -> tuple[list[dict[str, Any]], str | None]:
    """Rank the checkpoints by the composite score (metrics.py) with these weights (DEFAULT_WEIGHTS' keys).

    Writes OUT/ranking.json and OUT/ranking.md. Returns the ranking, best first, and a line saying why it fell back
    to validation loss alone (no CLIP weights given and none in the hub cache), or None."""
    check_weights(weights)
    weights = dict(weights)
    note = None
    need_images = weights["clip"] > 0 or weights["diversity"] > 0 or weights["overfit"] > 0
    if weights["diversity"] > 0 and len(seeds) < 2:
        raise EvalError("--seeds: diversity needs at least two seeds (or --weight-diversity 0)")
    clip = None
    if need_images:
        try:
            clip = eval_clip(ev.device, clip_model, clip_weights, clip_pretrained, overfit_threshold)
        except EvalError:
            # No CLIP weights given and none found: rank by validation loss, as the web app does. Weights given
            # explicitly that cannot be used stay an error, and so does a ranking that asked for no loss term.
            if clip_weights is not None or weights["loss"] <= 0 or not 0.0 < overfit_threshold <= 1.0:
                raise
            note = (
                f"select-best: no CLIP weights for {clip_model} (--clip-weights FILE.safetensors, or open_clip "
                "weights in the hub cache): ranking by validation loss only"
            )
            weights.update(clip=0.0, diversity=0.0, overfit=0.0)
            need_images = False
    need_loss = weights["loss"] > 0 and any(logged_val_loss(r) is None for r in ev.refs)
    data = training_data_of(training_data, ev, required=need_loss or weights["overfit"] > 0)
    train = None
    if clip is not None and weights["overfit"] > 0 and data is not None:
        keys, _, images = training_images(data, ev.recipe.data.instance_prompt if ev.recipe else None)
        train = (keys, clip.embed_images(images))
    index = ev.val_cache(data, out) if need_loss and data is not None else None
    items = eval_prompts(prompt, ev) if need_images else []
    embeds = ev.encode([it.prompt for it in items]) if need_images else {}
    ev.load()
    rows = assess(ev, clip, items, embeds, seeds, train, overfit_threshold, index, None, prefer_logged_loss=True)
    if weights["loss"] > 0:
        missing = [r["checkpoint"] for r in rows if r["val_loss"] is None]
        if missing:
            raise EvalError(f"--training-data: no validation loss for {', '.join(missing)}; pass the training data")
    ranked = rank(rows, weights)
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    result = {
        "best": {"checkpoint": ranked[0]["checkpoint"], "path": ranked[0]["path"], "score": ranked[0]["score"]},
        "weights": weights,
        "formula": "score = w_loss*L + w_clip*C + w_diversity*D - w_overfit*O (L, C, D rescaled to [0,1] over the "
        "checkpoints, 1 = best; O = share of generations flagged as overfit)",
        "clip_model": clip.name if clip else None,
        "prompts": shown(items),
        "seeds": seeds,
        "ranking": ranked,
    }
    write_json(out / "ranking.json", result)
    best = ranked[0]
    (out / "ranking.md").write_text(
        "# Checkpoint ranking\n\n"
        f"**Best: {best['checkpoint']}** (`{best['path']}`), score {best['score']:.4f}.\n\n"
        f"score = {weights['loss']:g}·L + {weights['clip']:g}·C + {weights['diversity']:g}·D − {weights['overfit']:g}·O "
        "(L: validation loss, C: CLIP score, D: diversity, each rescaled to [0, 1] over these checkpoints with 1 the "
        "best; O: share of generations flagged as overfit).\n\n" + markdown_table(ranked, RANK_COLUMNS) + "\n"
    )
    return ranked, note
