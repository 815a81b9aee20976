"""`flux2-lora eval compare | assess-quality | test-prompts | select-best` (docs/eval.md).

Every command takes LoRA checkpoints as paths (a `.safetensors` file or a `checkpoints/step-N` folder) or
`--run OUTPUT` (all of a training run's checkpoints). The base model comes from the LoRA header
(`flux2_lora.base_model`) unless `--model` names one; generation settings default to the run's recipe.
CLIP weights: `--clip-weights FILE.safetensors`, or an open_clip safetensors file in the hub cache.

The generation flags (--model ... --output) and the CLIP flags (--clip-model ... --overfit-threshold) are the same
in each command; only the --seeds default differs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from ..evaluate.clip import DEFAULT_CLIP_MODEL
from ..evaluate.metrics import DEFAULT_WEIGHTS, OVERFIT_THRESHOLD

Dtype = Literal["bf16", "fp16", "fp32"]

# The generation and CLIP flags' help, the same in every eval command (commands/args.py reads FLAG_HELP).
FLAG_HELP = {
    "model": "Base model (default: the LoRA's flux2_lora.base_model).",
    "seeds": "Seeds: one column of fixed noise each.",
    "size": "Image side in pixels (default: the run's sample size).",
    "steps": "Denoising steps per image.",
    "guidance": "Guidance scale.",
    "max_sequence_length": "Prompt tokens (default: the run's).",
    "device": "cuda or cpu (default: cuda when available).",
    "dtype": "Transformer dtype (default: bf16 on a GPU, fp32 on the CPU).",
    "output": "Output folder (default: RUN/eval/CMD or eval/CMD).",
    "clip_model": "open_clip architecture (e.g. ViT-B-32, ViT-L-14) or an open_clip model config .json.",
    "clip_weights": "open_clip weights as .safetensors; default: an open_clip safetensors file in the hub cache.",
    "clip_pretrained": "open_clip tag to look up in the hub cache.",
    "overfit_threshold": "Similarity to the nearest training image at or above which a generation counts as a copy.",
    "image": "A reference image for every prompt (an edit; repeat for up to 10, in order).",
}


def _done(paths: list[Path]) -> None:
    for p in paths:
        print(f"wrote {p}")
    sys.stdout.flush()


def compare(
    ckpts: list[str] | None = None,
    /,
    *,
    run: str | None = None,
    prompt: list[str] | None = None,
    image: list[str] | None = None,
    include_base: bool = False,
    model: str | None = None,
    seeds: list[int] = [0],  # noqa: B006  (argparse's default, never changed)
    size: int | None = None,
    steps: int = 28,
    guidance: float = 4.0,
    max_sequence_length: int | None = None,
    device: str | None = None,
    dtype: Dtype | None = None,
    output: str | None = None,
) -> None:
    """Grid of checkpoints x prompts x seeds (same noise per column) and an HTML page.

    Args:
        ckpts: LoRA .safetensors files or checkpoints/step-N folders.
        run: Also take every checkpoint of this training run.
        prompt: Prompts (default: the run's sample prompts, with their reference images).
        include_base: Add a row for the base model without a LoRA.
    """
    from ..evaluate import runs

    refs = runs.checkpoint_refs(ckpts or [], run)
    ev = runs.evaluator(refs, seeds, model, size, steps, guidance, max_sequence_length, device, dtype)
    prompts = runs.eval_prompts(prompt, ev, images=image)
    out = runs.output_dir(output, refs, "compare")
    result = runs.compare(ev, prompts, seeds, out, include_base)
    _done([result["grid"], result["html"], out / "compare.json"])


def assess_quality(
    *,
    checkpoint: list[str] | None = None,
    run: str | None = None,
    training_data: str | None = None,
    prompt: list[str] | None = None,
    model: str | None = None,
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    size: int | None = None,
    steps: int = 28,
    guidance: float = 4.0,
    max_sequence_length: int | None = None,
    device: str | None = None,
    dtype: Dtype | None = None,
    output: str | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_weights: str | None = None,
    clip_pretrained: str | None = None,
    overfit_threshold: float = OVERFIT_THRESHOLD,
) -> None:
    """CLIP score, diversity, overfitting and validation loss of LoRA checkpoints.

    Args:
        checkpoint: LoRA file(s) or checkpoint folder(s).
        run: Also take every checkpoint of this training run.
        training_data: Training images (folder or shards; default: the run's dataset).
        prompt: Prompts (default: the run's sample prompts, else training captions).
    """
    from ..evaluate import runs
    from ..evaluate.report import table

    refs = runs.checkpoint_refs(checkpoint or [], run, "--checkpoint")
    # Before any model loads: a missing CLIP model fails in seconds, not minutes.
    clip = runs.eval_clip(runs.eval_device(device), clip_model, clip_weights, clip_pretrained, overfit_threshold)
    ev = runs.evaluator(refs, seeds, model, size, steps, guidance, max_sequence_length, device, dtype)
    data = runs.training_data_of(training_data, ev, required=True)
    assert data is not None
    out = runs.output_dir(output, refs, "quality")
    result = runs.assess_quality(ev, clip, data, prompt, seeds, overfit_threshold, out)
    rows = result["checkpoints"]
    print(table(rows, runs.QUALITY_COLUMNS))
    for r in rows:
        for f in r.get("overfit_flagged", []):
            print(f"overfit: {r['checkpoint']} '{f['prompt']}' seed {f['seed']} ~ training image {f['training_image']} "
                  f"(similarity {f['similarity']:.3f} >= {overfit_threshold})")  # fmt: skip
    _done([out / "quality.json"])


def test_prompts(
    *,
    checkpoint: str,
    concept: str,
    trigger: str | None = None,
    suite: str | None = None,
    image: list[str] | None = None,
    no_builtin: bool = False,
    leakage_threshold: float = 0.85,
    model: str | None = None,
    seeds: list[int] = [0, 1],  # noqa: B006
    size: int | None = None,
    steps: int = 28,
    guidance: float = 4.0,
    max_sequence_length: int | None = None,
    device: str | None = None,
    dtype: Dtype | None = None,
    output: str | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_weights: str | None = None,
    clip_pretrained: str | None = None,
    overfit_threshold: float = OVERFIT_THRESHOLD,
) -> None:
    """Run a prompt suite (built-in templates and/or a YAML file) on one LoRA.

    Args:
        checkpoint: LoRA file or checkpoint folder.
        concept: The trained concept with its trigger, e.g. "sks dog".
        trigger: The trigger word (default: the LoRA's, else the concept's first word).
        suite: A YAML prompt suite (see docs/eval.md); an entry may name its own reference images.
        image: A reference image for every prompt whose suite entry names none (an edit; repeat for up to 10).
        no_builtin: Run only the --suite prompts.
        leakage_threshold: A trigger-less prompt whose image is less similar than this to the base model's is
            flagged.
    """
    from ..evaluate import runs
    from ..evaluate.generate import resolve_lora
    from ..evaluate.report import table
    from ..evaluate.suite import build_suite

    ref = resolve_lora(checkpoint, "--checkpoint")
    runs.check_images(image or [])
    items, trig = build_suite(concept, trigger or ref.trigger, suite, not no_builtin, image)
    clip = runs.eval_clip(runs.eval_device(device), clip_model, clip_weights, clip_pretrained, overfit_threshold)
    ev = runs.evaluator([ref], seeds, model, size, steps, guidance, max_sequence_length, device, dtype)
    out = runs.output_dir(output, [ref], "prompts")
    result = runs.test_prompts(ev, clip, items, trig, seeds, leakage_threshold, out)
    print(table(result["prompts"], runs.PROMPT_COLUMNS))
    _done([out / "grid.png", out / "prompts.json", out / "prompts.md"])


def select_best(
    ckpts: list[str] | None = None,
    /,
    *,
    run: str | None = None,
    training_data: str | None = None,
    prompt: list[str] | None = None,
    weight_loss: float = DEFAULT_WEIGHTS["loss"],
    weight_clip: float = DEFAULT_WEIGHTS["clip"],
    weight_diversity: float = DEFAULT_WEIGHTS["diversity"],
    weight_overfit: float = DEFAULT_WEIGHTS["overfit"],
    model: str | None = None,
    seeds: list[int] = [0, 1],  # noqa: B006
    size: int | None = None,
    steps: int = 28,
    guidance: float = 4.0,
    max_sequence_length: int | None = None,
    device: str | None = None,
    dtype: Dtype | None = None,
    output: str | None = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_weights: str | None = None,
    clip_pretrained: str | None = None,
    overfit_threshold: float = OVERFIT_THRESHOLD,
) -> None:
    """Rank checkpoints by a composite score and name the best (docs/eval.md).

    Args:
        ckpts: LoRA .safetensors files or checkpoints/step-N folders.
        run: Rank every checkpoint of this training run.
        training_data: Training images (default: the run's dataset): overfitting, and validation loss not in the
            log.
        prompt: Prompts (default: the run's sample prompts).
        weight_loss: Weight of the loss term (0 skips it).
        weight_clip: Weight of the clip term (0 skips it).
        weight_diversity: Weight of the diversity term (0 skips it).
        weight_overfit: Weight of the overfit term (0 skips it).
    """
    from ..evaluate import runs
    from ..evaluate.report import table

    weights = {"loss": weight_loss, "clip": weight_clip, "diversity": weight_diversity, "overfit": weight_overfit}
    runs.check_weights(weights)
    refs = runs.checkpoint_refs(ckpts or [], run)
    ev = runs.evaluator(refs, seeds, model, size, steps, guidance, max_sequence_length, device, dtype)
    out = runs.output_dir(output, refs, "select-best")
    ranked, note = runs.select_best(
        ev, weights, out, seeds, prompt, training_data, clip_model, clip_weights, clip_pretrained, overfit_threshold
    )
    if note:
        print(note)
    print(table(ranked, runs.RANK_COLUMNS))
    best = ranked[0]
    print(f"best: {best['checkpoint']} ({best['path']}), score {best['score']:.4f}")
    _done([out / "ranking.json", out / "ranking.md"])
