"""`flux2-lora eval compare | assess-quality | test-prompts | select-best`.

Every command takes LoRA checkpoints as paths (a `.safetensors` file or a `checkpoints/step-N` folder) or
`--run OUTPUT` (all of a training run's checkpoints). The base model comes from the LoRA header
(`flux2_lora.base_model`) unless `--model` names one; generation settings default to the run's recipe.
CLIP weights: `--clip-weights FILE.safetensors`, or an open_clip safetensors file in the hub cache.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import EvalError
from .clip import DEFAULT_CLIP_MODEL, ClipModel, load_clip
from .generate import Evaluator, LoraRef, logged_val_loss, resolve_lora, run_checkpoints, strip_trigger, training_images
from .metrics import DEFAULT_WEIGHTS, OVERFIT_THRESHOLD, clip_score, diversity, overfitting, rank
from .report import html_page, labelled_grid, markdown_table, table, write_json

SUBCOMMANDS = ("compare", "assess-quality", "test-prompts", "select-best")


def cmd_eval(argv: list[str]) -> int:
    sub, rest = (argv[0], argv[1:]) if argv else ("", [])
    runners = {
        "compare": cmd_compare,
        "assess-quality": cmd_assess_quality,
        "test-prompts": cmd_test_prompts,
        "select-best": cmd_select_best,
    }
    if sub not in runners:
        from ..cli import CliError

        raise CliError(f"eval: expected one of {', '.join(SUBCOMMANDS)} (see `flux2-lora --help`)")
    return runners[sub](rest)


# ---------------------------------------------------------------------------------------------
# Arguments shared by the subcommands
# ---------------------------------------------------------------------------------------------


def _parser(name: str, description: str) -> Any:
    from ..cli import command_parser

    return command_parser(f"eval {name}", description)


def _generation_args(p: Any, seeds: list[int]) -> None:
    p.add_argument(
        "--model", type=str | None, default=None, help="Base model (default: the LoRA's flux2_lora.base_model)."
    )
    p.add_argument("--seeds", type=int, nargs="+", default=seeds, help="Seeds: one column of fixed noise each.")
    p.add_argument(
        "--size", type=int | None, default=None, help="Image side in pixels (default: the run's sample size)."
    )
    p.add_argument("--steps", type=int, default=28, help="Denoising steps per image.")
    p.add_argument("--guidance", type=float, default=4.0, help="Guidance scale.")
    p.add_argument("--max-sequence-length", type=int | None, default=None, help="Prompt tokens (default: the run's).")
    p.add_argument("--device", type=str | None, default=None, help="cuda or cpu (default: cuda when available).")
    p.add_argument("--dtype", type=str | None, default=None, choices=["bf16", "fp16", "fp32", None],
                   help="Transformer dtype (default: bf16 on a GPU, fp32 on the CPU).")  # fmt: skip
    p.add_argument("--output", type=str | None, default=None, help="Output folder (default: RUN/eval/CMD or eval/CMD).")


def _clip_args(p: Any) -> None:
    p.add_argument("--clip-model", type=str, default=DEFAULT_CLIP_MODEL,
                   help="open_clip architecture (e.g. ViT-B-32, ViT-L-14) or an open_clip model config .json.")  # fmt: skip
    p.add_argument("--clip-weights", type=str | None, default=None,
                   help="open_clip weights as .safetensors; default: an open_clip safetensors file in the hub cache.")  # fmt: skip
    p.add_argument(
        "--clip-pretrained", type=str | None, default=None, help="open_clip tag to look up in the hub cache."
    )
    p.add_argument("--overfit-threshold", type=float, default=OVERFIT_THRESHOLD,
                   help="Similarity to the nearest training image at or above which a generation counts as a copy.")  # fmt: skip


def _checkpoints(ckpts: list[str], run: str | None, what: str = "CKPT") -> list[LoraRef]:
    refs = [resolve_lora(c, what) for c in ckpts]
    if run:
        refs += run_checkpoints(run)
    unique: dict[Path, LoraRef] = {}
    for r in refs:
        unique.setdefault(r.path.resolve(), r)  # each file once
    refs = list(unique.values())
    if not refs:
        from ..cli import CliError

        raise CliError(f"{what}: give at least one LoRA checkpoint or --run OUTPUT")
    return refs


def _evaluator(a: Any, refs: list[LoraRef]) -> Evaluator:
    if a.steps < 1:
        raise EvalError(f"--steps: must be >= 1, got {a.steps}")
    if not a.seeds:
        raise EvalError("--seeds: give at least one seed")
    return Evaluator(refs, a.model, a.device, a.dtype, a.size, a.steps, a.guidance, a.max_sequence_length)


def _device(a: Any) -> torch.device:
    return torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _output(a: Any, refs: list[LoraRef], name: str) -> Path:
    if a.output:
        out = Path(a.output).expanduser()
    else:
        run = next((r.run for r in refs if r.run is not None), None)
        out = (run / "eval" / name) if run is not None else Path("eval") / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def _clip(a: Any, device: torch.device) -> ClipModel:
    if not 0.0 < a.overfit_threshold <= 1.0:
        raise EvalError(f"--overfit-threshold: must be in (0, 1], got {a.overfit_threshold}")
    return load_clip(a.clip_model, a.clip_weights, a.clip_pretrained, device)


def _prompts(a: Any, ev: Evaluator, fallback: list[str] | None = None) -> list[str]:
    prompts = list(a.prompt or [])
    if not prompts and ev.recipe is not None:
        prompts = list(ev.recipe.validation.prompts)
    if not prompts and fallback:
        prompts = fallback
    if not prompts:
        raise EvalError("--prompt: give at least one prompt (the run's recipe has no validation.prompts)")
    return prompts


def _training_data(a: Any, ev: Evaluator, required: bool) -> str | None:
    data = getattr(a, "training_data", None) or (ev.recipe.data.dataset if ev.recipe is not None else None)
    if data is None and required:
        raise EvalError("--training-data: needed (an image folder or shards; the run's recipe names no dataset)")
    return data


def _trigger(ev: Evaluator) -> str | None:
    if ev.recipe is not None and ev.recipe.data.trigger:
        return ev.recipe.data.trigger
    return next((r.trigger for r in ev.refs if r.trigger), None)


def _done(paths: list[Path]) -> None:
    for p in paths:
        print(f"wrote {p}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def cmd_compare(argv: list[str]) -> int:
    p = _parser("compare", "Grid of checkpoints x prompts x seeds (same noise per column) and an HTML page.")
    p.add_argument("ckpts", type=str, nargs="*", help="LoRA .safetensors files or checkpoints/step-N folders.")
    p.add_argument("--run", type=str | None, default=None, help="Also take every checkpoint of this training run.")
    p.add_argument(
        "--prompt", type=str, nargs="+", action="extend", help="Prompts (default: the run's sample prompts)."
    )
    p.add_argument("--include-base", type=bool, default=False, help="Add a row for the base model without a LoRA.")
    _generation_args(p, [0])
    from ..cli import _parse

    a = _parse(p, argv)
    refs = _checkpoints(a.ckpts, a.run)
    ev = _evaluator(a, refs)
    prompts = _prompts(a, ev)
    out = _output(a, refs, "compare")
    result = compare(ev, prompts, a.seeds, out, a.include_base)
    _done([result["grid"], result["html"], out / "compare.json"])
    return 0


def compare(
    ev: Evaluator, prompts: list[str], seeds: list[int], out: Path, include_base: bool = False
) -> dict[str, Any]:
    embeds = ev.encode(prompts)
    ev.load()
    rows: list[LoraRef | None] = ([None] if include_base else []) + list(ev.refs)
    labels = [r.label if r is not None else "base model" for r in rows]
    cols = [(j, s) for j in range(len(prompts)) for s in seeds]
    col_labels = [f"#{j + 1} seed {s}\n{prompts[j]}" for j, s in cols]
    (out / "images").mkdir(exist_ok=True)
    cells: list[list[Any]] = []
    files: list[list[Path]] = []
    bar = tqdm(total=len(rows) * len(cols), desc="eval: compare", unit="img")
    for i, ref in enumerate(rows):
        ev.use(ref)
        row, row_files = [], []
        for j, s in cols:
            image = ev.generate(embeds[prompts[j]], s)
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
    notes = [f"{j + 1}: {p}" for j, p in enumerate(prompts)]
    notes.append(
        f"model {ev.src.name}; {ev.gen.size}px, {ev.gen.steps} steps, guidance {ev.gen.guidance}; same seed = same noise"
    )
    page = html_page(out / "index.html", "flux2-lora: checkpoint comparison", labels, col_labels, files, notes)
    write_json(out / "compare.json", {
        "model": ev.src.name, "prompts": prompts, "seeds": seeds, "settings": vars(ev.gen),
        "rows": [{"label": lab, "lora": str(r.path) if r else None, "images": [str(f) for f in fs]}
                 for lab, r, fs in zip(labels, rows, files, strict=True)],
    })  # fmt: skip
    return {"grid": out / "grid.png", "html": page, "labels": labels}


# ---------------------------------------------------------------------------------------------
# assess-quality (and the measurements select-best ranks)
# ---------------------------------------------------------------------------------------------


def assess(
    ev: Evaluator,
    clip: ClipModel | None,
    prompts: list[str],
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
    trigger = _trigger(ev)
    texts = clip.embed_texts([strip_trigger(p, trigger) for p in prompts]) if clip is not None else None
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
            for j, prompt in enumerate(prompts):
                images = [ev.generate(embeds[prompt], s) for s in seeds]
                if image_dir is not None:
                    for s, im in zip(seeds, images, strict=True):
                        im.save(image_dir / f"ckpt{i:02d}-prompt{j:02d}-seed{s}.png")
                emb = clip.embed_images(images)
                scores = clip_score(emb, texts[j].expand_as(emb))
                per_prompt.append({"prompt": prompt, "clip_score": float(scores.mean()), "diversity": diversity(emb)})
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


def cmd_assess_quality(argv: list[str]) -> int:
    p = _parser("assess-quality", "CLIP score, diversity, overfitting and validation loss of LoRA checkpoints.")
    p.add_argument("--checkpoint", type=str, nargs="+", action="extend", help="LoRA file(s) or checkpoint folder(s).")
    p.add_argument("--run", type=str | None, default=None, help="Also take every checkpoint of this training run.")
    p.add_argument("--training-data", type=str | None, default=None,
                   help="Training images (folder or shards; default: the run's dataset).")  # fmt: skip
    p.add_argument("--prompt", type=str, nargs="+", action="extend",
                   help="Prompts (default: the run's sample prompts, else training captions).")  # fmt: skip
    _generation_args(p, [0, 1, 2])
    _clip_args(p)
    from ..cli import _parse

    a = _parse(p, argv)
    refs = _checkpoints(a.checkpoint or [], a.run, "--checkpoint")
    clip = _clip(a, _device(a))  # before any model loads: a missing CLIP model fails in seconds, not minutes
    ev = _evaluator(a, refs)
    data = _training_data(a, ev, required=True)
    assert data is not None
    out = _output(a, refs, "quality")
    keys, captions, images = training_images(data, ev.recipe.data.instance_prompt if ev.recipe else None)
    trigger = _trigger(ev)
    from ..data.cache import full_caption

    prompts = _prompts(a, ev, [full_caption(c, trigger) for c in dict.fromkeys(captions) if c][:4])
    train = (keys, clip.embed_images(images))
    index = ev.val_cache(data, out)
    embeds = ev.encode(prompts)
    ev.load()
    (out / "images").mkdir(exist_ok=True)
    rows = assess(ev, clip, prompts, embeds, a.seeds, train, a.overfit_threshold, index, out / "images")
    result = {
        "model": ev.src.name,
        "clip_model": clip.name,
        "clip_weights": clip.weights,
        "training_data": data,
        "overfit_threshold": a.overfit_threshold,
        "prompts": prompts,
        "seeds": a.seeds,
        "settings": vars(ev.gen),
        "checkpoints": rows,
    }
    write_json(out / "quality.json", result)
    print(table(rows, QUALITY_COLUMNS))
    for r in rows:
        for f in r.get("overfit_flagged", []):
            print(f"overfit: {r['checkpoint']} '{f['prompt']}' seed {f['seed']} ~ training image {f['training_image']} "
                  f"(similarity {f['similarity']:.3f} >= {a.overfit_threshold})")  # fmt: skip
    _done([out / "quality.json"])
    return 0


# ---------------------------------------------------------------------------------------------
# test-prompts
# ---------------------------------------------------------------------------------------------


def cmd_test_prompts(argv: list[str]) -> int:
    p = _parser("test-prompts", "Run a prompt suite (built-in templates and/or a YAML file) on one LoRA.")
    p.add_argument("--checkpoint", type=str, required=True, help="LoRA file or checkpoint folder.")
    p.add_argument("--concept", type=str, required=True, help='The trained concept with its trigger, e.g. "sks dog".')
    p.add_argument("--trigger", type=str | None, default=None,
                   help="The trigger word (default: the LoRA's, else the concept's first word).")  # fmt: skip
    p.add_argument("--suite", type=str | None, default=None, help="A YAML prompt suite (see README: Evaluation).")
    p.add_argument("--no-builtin", type=bool, default=False, help="Run only the --suite prompts.")
    p.add_argument("--leakage-threshold", type=float, default=0.85,
                   help="A trigger-less prompt whose image is less similar than this to the base model's is flagged.")  # fmt: skip
    _generation_args(p, [0, 1])
    _clip_args(p)
    from ..cli import _parse

    a = _parse(p, argv)
    ref = resolve_lora(a.checkpoint, "--checkpoint")
    from .suite import build_suite

    items, trigger = build_suite(a.concept, a.trigger or ref.trigger, a.suite, not a.no_builtin)
    clip = _clip(a, _device(a))
    ev = _evaluator(a, [ref])
    out = _output(a, [ref], "prompts")
    result = test_prompts(ev, clip, items, trigger, a.seeds, a.leakage_threshold, out)
    print(table(result["prompts"], PROMPT_COLUMNS))
    _done([out / "grid.png", out / "prompts.json", out / "prompts.md"])
    return 0


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
    from .suite import LEAKAGE

    prompts = [it.prompt for it in items]
    embeds = ev.encode(prompts)
    ev.load()
    (out / "images").mkdir(exist_ok=True)
    texts = clip.embed_texts([strip_trigger(p, trigger) for p in prompts])
    ref = ev.refs[0]
    cells, rows = [], []
    bar = tqdm(total=len(items) * len(seeds), desc="eval: prompts", unit="img")
    for j, it in enumerate(items):
        ev.use(ref)
        images = []
        for s in seeds:
            images.append(ev.generate(embeds[it.prompt], s))
            images[-1].save(out / "images" / f"prompt{j:02d}-seed{s}.png")
            bar.update(1)
        emb = clip.embed_images(images)
        row: dict[str, Any] = {
            "category": it.category,
            "prompt": it.prompt,
            "clip_score": float(clip_score(emb, texts[j].expand_as(emb)).mean()),
            "diversity": diversity(emb),
        }
        if it.category == LEAKAGE:
            ev.use(None)  # the base model, same prompt and seeds
            base = clip.embed_images([ev.generate(embeds[it.prompt], s) for s in seeds])
            sim = float((emb * base).sum(-1).mean())
            row.update(similarity_to_base=sim, leaked=sim < leakage_threshold)
        rows.append(row)
        cells.append(images)
    bar.close()
    ev.use(None)
    labelled_grid(cells, [f"{r['category']}: {r['prompt']}" for r in rows], [f"seed {s}" for s in seeds]).save(
        out / "grid.png"
    )
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


def cmd_select_best(argv: list[str]) -> int:
    p = _parser("select-best", "Rank checkpoints by a composite score and name the best (README: Evaluation).")
    p.add_argument("ckpts", type=str, nargs="*", help="LoRA .safetensors files or checkpoints/step-N folders.")
    p.add_argument("--run", type=str | None, default=None, help="Rank every checkpoint of this training run.")
    p.add_argument("--training-data", type=str | None, default=None,
                   help="Training images (default: the run's dataset): overfitting, and validation loss not in the log.")  # fmt: skip
    p.add_argument(
        "--prompt", type=str, nargs="+", action="extend", help="Prompts (default: the run's sample prompts)."
    )
    for k, v in DEFAULT_WEIGHTS.items():
        p.add_argument(f"--weight-{k}", type=float, default=v, help=f"Weight of the {k} term (0 skips it).")
    _generation_args(p, [0, 1])
    _clip_args(p)
    from ..cli import _parse

    a = _parse(p, argv)
    weights = {k: getattr(a, f"weight_{k}") for k in DEFAULT_WEIGHTS}
    for k, w in weights.items():
        if w < 0:
            raise EvalError(f"--weight-{k}: must be >= 0, got {w}")
    if not any(weights.values()):
        raise EvalError("--weight-*: at least one weight must be > 0")
    refs = _checkpoints(a.ckpts, a.run)
    ev = _evaluator(a, refs)
    out = _output(a, refs, "select-best")
    ranked = select_best(ev, a, weights, out)
    print(table(ranked, RANK_COLUMNS))
    best = ranked[0]
    print(f"best: {best['checkpoint']} ({best['path']}), score {best['score']:.4f}")
    _done([out / "ranking.json", out / "ranking.md"])
    return 0


def select_best(ev: Evaluator, a: Any, weights: dict[str, float], out: Path) -> list[dict[str, Any]]:
    need_images = weights["clip"] > 0 or weights["diversity"] > 0 or weights["overfit"] > 0
    if weights["diversity"] > 0 and len(a.seeds) < 2:
        raise EvalError("--seeds: diversity needs at least two seeds (or --weight-diversity 0)")
    clip = None
    if need_images:
        try:
            clip = _clip(a, ev.device)
        except EvalError:
            # No CLIP weights given and none found: rank by validation loss, as the web app does. Weights given
            # explicitly that cannot be used stay an error, and so does a ranking that asked for no loss term.
            if a.clip_weights is not None or weights["loss"] <= 0 or not 0.0 < a.overfit_threshold <= 1.0:
                raise
            print(
                f"select-best: no CLIP weights for {a.clip_model} (--clip-weights FILE.safetensors, or open_clip "
                "weights in the hub cache): ranking by validation loss only"
            )
            weights.update(clip=0.0, diversity=0.0, overfit=0.0)
            need_images = False
    need_loss = weights["loss"] > 0 and any(logged_val_loss(r) is None for r in ev.refs)
    data = _training_data(a, ev, required=need_loss or weights["overfit"] > 0)
    train = None
    if clip is not None and weights["overfit"] > 0 and data is not None:
        keys, _, images = training_images(data, ev.recipe.data.instance_prompt if ev.recipe else None)
        train = (keys, clip.embed_images(images))
    index = ev.val_cache(data, out) if need_loss and data is not None else None
    prompts = _prompts(a, ev) if need_images else []
    embeds = ev.encode(prompts) if need_images else {}
    ev.load()
    rows = assess(ev, clip, prompts, embeds, a.seeds, train, a.overfit_threshold, index, None, prefer_logged_loss=True)
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
        "prompts": prompts,
        "seeds": a.seeds,
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
    return ranked
