"""`flux2-lora ui`: Dataset, Training, Evaluation and Optimization tabs over the same functions as the CLI.

    flux2-lora ui [--root DIR ...] [--port 7860] [--host 127.0.0.1] [--share] [--auth USER:PASS | --auth-file F]

Datasets are checked in this process (the same `validate_dataset` / `analyze_dataset` as `flux2-lora data`); the
Dataset tab also lists a recipe's sources with their counts and masks (sources_view.py).
Training, sweeps and evaluations run as `flux2-lora train|tune|eval` child processes (jobs.JobManager): the page
polls their folders once a second, a reload finds a running job again, and Stop asks the process to checkpoint and
exit. Every path typed in the page must lie inside a `--root` folder (default: the current folder).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shlex
from pathlib import Path
from typing import Any

from ..errors import DataError, RecipeError, UsageError
from ..recipe import parse_recipe, presets
from ..resources import recipes_dir
from .jobs import Job, JobManager
from .paths import DATASETS, Roots, UiError
from .sources_view import HEADERS, read_sources, recipe_argv, sources_gallery, sources_summary, sources_table
from .views import (
    checkpoint_label,
    checkpoints,
    dataset_entries,
    problem_rows,
    recipe_value,
    reference_summary,
    run_view,
    stamp,
    sweep_view,
    thumbnails,
)

# The Training tab's fields: (label, recipe field, kind). Blank fields keep the recipe's value.
TRAIN_FIELDS = [
    ("Max steps", "training.max_steps", "int"),
    ("Learning rate", "training.lr", "float"),
    ("LoRA rank", "lora.rank", "int"),
    ("LoRA alpha (blank: = rank)", "lora.alpha", "float"),
    ("Batch size", "training.batch_size", "int"),
    ("Gradient accumulation", "training.gradient_accumulation", "int"),
    ("Resolution", "data.resolution", "int"),
    ("Trigger word", "data.trigger", "str"),
    ("Validate every N steps", "validation.every_n_steps", "int"),
    ("Checkpoint every N steps", "output.checkpoint_every", "int"),
    ("Log every N steps", "logging.log_every", "int"),
]

STATE_WORDS = {
    "running": "running",
    "finished": "finished",
    "stopped": "stopped (checkpoint kept; start again with the same output to resume)",
    "failed": "failed",
    "ended": "ended",
}


def _error(e: BaseException) -> str:
    return f"**Error:** {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def _recipe_values(preset: str | None, config: str | None, roots: Roots) -> list[Any]:
    """The Training fields' values for a preset or recipe file (the defaults a user edits)."""
    argv = ["--config", roots.resolve(config, "recipe file")] if (config or "").strip() else ["--preset", preset or ""]
    recipe, _ = parse_recipe(argv, need_data=False)
    values = []
    for _, name, _ in TRAIN_FIELDS:
        section, key = name.split(".")
        values.append(getattr(getattr(recipe, section), key))
    return values


def _overrides(values: list[Any]) -> list[str]:
    args: list[str] = []
    for (label, name, kind), v in zip(TRAIN_FIELDS, values, strict=True):
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if kind == "int":
            if float(v) != int(float(v)):
                raise UiError(f"{label}: must be a whole number (got {v})")
            v = int(float(v))
        args += [f"--{name}", str(v).strip()]
    return args


def _extra(text: str | None) -> list[str]:
    try:
        return shlex.split(text or "")
    except ValueError as e:
        raise UiError(f"extra flags: {e}") from None


def _check_recipe_paths(recipe: Any, roots: Roots) -> None:
    """The recipe fields that read or write the user's files stay inside the roots too, whatever "more flags"
    said. (A model folder may lie anywhere: it is only read, and usually sits in the hub cache.)"""
    from ..sources import resolve_sources

    roots.resolve(recipe.output.dir, "output.dir", must_exist=False)
    for src in resolve_sources(recipe.data):  # data.dataset, or each of data.datasets, and its mask folder
        where = src.field if src.field == "data.dataset" else f"{src.field}.path"
        roots.resolve(src.path, where, must_exist=False, allow_builtin=True)
        if src.mask_dir:
            roots.resolve(src.mask_dir, "data.mask_dir" if src.field == "data.dataset" else f"{src.field}.mask_dir")
    for field, value in (("lora.init_from", recipe.lora.init_from),
                         ("validation.clip_weights", getattr(recipe.validation, "clip_weights", None))):  # fmt: skip
        if value:
            roots.resolve(value, field)


def _job_state(job: Job | None) -> str:
    if job is None:
        return "no job yet"
    word = STATE_WORDS.get(job.state, job.state)
    if job.state == "failed":
        word += f" (exit {job.returncode}): {job.error_line()}"
    return f"{job.kind} job {job.id}: {word}"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _data_facts(root: Path, mask_dir: Path | None = None) -> str:
    """What training reads from a dataset folder: its items, and how many carry reference images."""
    if root.is_file() or (root / "index.json").is_file():
        return f"`{root.name}`: {'a shard' if root.is_file() else 'a cache folder'}, read as it is"
    entries, refused = dataset_entries(root, mask_dir)
    if refused:
        return f"**Training would refuse this folder:** {refused}"
    text = f"training reads {reference_summary(entries)}"
    if any(e.references for e in entries):
        text += ": an editing dataset (each caption is the instruction, the image the result)"
    return text


def _progress_html(fraction: float, text: str) -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div id="train-progress-box"><progress id="train-progress" value="{pct:.0f}" max="100" '
        f'style="width:100%;height:18px"></progress><div id="train-progress-text">{text}</div></div>'
    )


def build_app(roots: Roots, state_dir: Path) -> Any:
    import gradio as gr

    jobs = JobManager(state_dir, cwd=str(roots.folders[0]))
    work = state_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    image_folders = roots.folders_with("images")  # walked once for the three dataset pickers
    train_data = [*DATASETS, *image_folders]  # the trainer reads a folder's references itself

    def picker(choices: list[str], label: str, elem_id: str, scale: int | None = None) -> Any:
        """A folder picker: the folders found under the roots, any other path typed (checked when used)."""
        value = choices[0] if choices and choices[0].startswith("builtin:") else None
        return gr.Dropdown(choices, value=value, label=label, allow_custom_value=True, scale=scale, elem_id=elem_id)

    with gr.Blocks(title="flux2-lora") as app:
        gr.Markdown(f"## flux2-lora\nFolders this app may use: `{roots.describe()}`")
        train_job = gr.State(None)
        eval_job = gr.State(None)
        tune_job = gr.State(None)
        timer = gr.Timer(1.0)

        # ------------------------------------------------------------------------------------------- Dataset
        with gr.Tab("Dataset", id="dataset"):
            with gr.Row():
                ds_path = picker([*image_folders, *DATASETS], "Dataset folder", "ds-path", scale=4)
                ds_mask_dir = gr.Textbox(label="Mask folder (optional)", elem_id="ds-mask-dir", scale=2)
                ds_min_res = gr.Number(value=256, label="Smallest short side (px)", elem_id="ds-min-res", min_width=140)
                ds_check = gr.Button("Check", variant="primary", elem_id="ds-check")
            with gr.Row():
                ds_preset = gr.Dropdown(["", *presets()], value="", label="Preset (blank: none)", elem_id="ds-preset")
                ds_recipe = gr.Textbox(label="Recipe file: show its sources", elem_id="ds-recipe", scale=4)
                ds_sources = gr.Button("Show sources", elem_id="ds-sources")
            with gr.Row():
                ds_fix_out = gr.Textbox(label="Write a fixed copy to", elem_id="ds-fix-out", scale=4)
                ds_fix = gr.Button("Fix", elem_id="ds-fix")
            ds_status = gr.Markdown(elem_id="ds-status")
            ds_table = gr.Dataframe(headers=HEADERS, label="Sources", interactive=False, elem_id="ds-sources-table",
                                    visible=False)  # fmt: skip
            ds_problems = gr.Dataframe(
                headers=["severity", "file", "code", "reason"], label="Problems", interactive=False,
                elem_id="ds-problems",
            )  # fmt: skip
            with gr.Row():
                ds_hist = gr.Image(
                    label="Histograms", show_label=False, type="filepath", elem_id="ds-hist", interactive=False
                )
                ds_stats = gr.Textbox(label="Statistics", lines=16, elem_id="ds-stats")
            ds_gallery = gr.Gallery(
                label="Images and captions (an item with references: references -> target; red: left out by its "
                "loss mask)", columns=6, height=420,
                object_fit="contain", elem_id="ds-gallery",
            )  # fmt: skip

            def mask_folder(text: str | None) -> Path | None:
                return Path(roots.resolve(text, "mask folder")) if (text or "").strip() else None

            def check(path: str, mask_dir: str, min_res: Any) -> tuple[Any, ...]:
                from ..data.analyze import analyze_dataset, format_analysis, plot_analysis
                from ..data.validate import validate_dataset

                hidden = gr.update(visible=False)
                try:
                    root, builtin = roots.dataset(path)
                    masks = mask_folder(mask_dir)
                    report = validate_dataset(root, min_resolution=int(min_res or 0), mask_dir=masks)
                    stats = analyze_dataset(root)
                except (UiError, DataError) as e:
                    return _error(e), hidden, [], None, "", []
                hist = plot_analysis(stats, work / f"analysis-{stamp()}.png")
                summary = (
                    f"**{path.strip() if builtin else root}**: {report.n_images} images, {report.n_ok} ok, "
                    f"{report.n_errors} errors, {report.n_warnings} warnings"
                    + (f", {len(report.masks)} with a loss mask" if report.masks else "")
                    + (" — fix them or write a fixed copy below" if report.problems else " — ready to train")
                    + "\n\n"
                    + _data_facts(root, masks)
                )
                gallery = thumbnails(root, tile_dir=work / "tiles", copy_plain=builtin, mask_dir=masks)
                return summary, hidden, problem_rows(report), str(hist), format_analysis(stats), gallery

            def show_sources(preset: str, config: str) -> tuple[Any, ...]:
                try:
                    argv = recipe_argv(preset, config, roots)
                    recipe, _ = parse_recipe(argv, need_data=True)
                    views = read_sources(recipe, roots)
                except (UiError, UsageError, RecipeError, DataError) as e:
                    return _error(e), gr.update(visible=False), [], None, "", []
                headers, rows = sources_table(views)
                name = Path(argv[-1]).name if (config or "").strip() else f"preset {preset}"
                table = gr.update(value={"headers": headers, "data": rows}, visible=True)
                return sources_summary(views, name), table, [], None, "", sources_gallery(views, work / "tiles")

            def fix(path: str, mask_dir: str, min_res: Any, out: str) -> str:
                from ..data.fix import fix_dataset
                from ..data.validate import validate_dataset

                try:
                    root, masks = str(roots.dataset(path)[0]), mask_folder(mask_dir)
                    target = roots.resolve(out, "fixed copy", must_exist=False)
                    report = validate_dataset(root, min_resolution=int(min_res or 0), mask_dir=masks)
                    lines = fix_dataset(root, target, report)
                except (UiError, DataError) as e:
                    return _error(e)
                return f"wrote **{target}** ({len(lines)} changes, listed in its FIXES.txt)"

            ds_views = [ds_status, ds_table, ds_problems, ds_hist, ds_stats, ds_gallery]
            ds_check.click(check, [ds_path, ds_mask_dir, ds_min_res], ds_views)
            ds_sources.click(show_sources, [ds_preset, ds_recipe], ds_views)
            ds_recipe.submit(show_sources, [ds_preset, ds_recipe], ds_views)
            ds_fix.click(fix, [ds_path, ds_mask_dir, ds_min_res, ds_fix_out], [ds_status])

        # ------------------------------------------------------------------------------------------ Training
        with gr.Tab("Training", id="training"):
            with gr.Row():
                tr_preset = gr.Dropdown(presets(), value="tiny", label="Preset", elem_id="tr-preset")
                tr_config = gr.Textbox(label="Recipe file (instead of the preset)", elem_id="tr-config")
            with gr.Row():
                tr_dataset = picker(train_data, "Dataset", "tr-dataset")
                tr_output = gr.Textbox(
                    value=str(roots.folders[0] / "runs" / "ui"), label="Output folder", elem_id="tr-output"
                )
            tr_data = gr.Markdown(elem_id="tr-data")
            fields = []
            with gr.Row():
                for label, name, kind in TRAIN_FIELDS:
                    elem = "tr-" + name.split(".")[-1].replace("_", "-")
                    comp = (
                        gr.Textbox(label=label, elem_id=elem, min_width=140)
                        if kind == "str"
                        else gr.Number(label=label, elem_id=elem, min_width=140)
                    )
                    fields.append(comp)
            tr_extra = gr.Textbox(label="More recipe flags (e.g. --model.dtype bf16)", elem_id="tr-extra")
            with gr.Row():
                tr_start = gr.Button("Start training", variant="primary", elem_id="tr-start")
                tr_stop = gr.Button("Stop", variant="stop", elem_id="tr-stop")
            tr_message = gr.Markdown(elem_id="tr-message")
            tr_status = gr.Markdown(elem_id="tr-status")
            tr_progress = gr.HTML(_progress_html(0, ""), elem_id="tr-progress-html")
            with gr.Row():
                tr_plot = gr.Image(label="Loss", type="filepath", elem_id="tr-plot", interactive=False)
                tr_samples = gr.Gallery(
                    label="Latest samples", columns=2, height=360, object_fit="contain", elem_id="tr-samples"
                )
            tr_lora = gr.File(label="LoRA (download)", elem_id="tr-lora", interactive=False)
            tr_log = gr.Textbox(label="Log", lines=8, max_lines=8, elem_id="tr-log", autoscroll=True)

            def fill(preset: str, config: str) -> list[Any]:
                try:
                    return _recipe_values(preset, config, roots)
                except (UiError, UsageError, RecipeError):
                    return [gr.skip()] * len(TRAIN_FIELDS)

            def start_training(preset: str, config: str, dataset: str, output: str, extra: str, *values: Any) -> Any:
                try:
                    argv = (
                        ["--config", roots.resolve(config, "recipe file")]
                        if (config or "").strip()
                        else ["--preset", preset]
                    )
                    argv += ["--data.dataset", roots.resolve(dataset, "dataset", allow_builtin=True)]
                    out = roots.resolve(output, "output", must_exist=False)
                    argv += ["--output.dir", out, *_overrides(list(values)), *_extra(extra)]
                    recipe, _ = parse_recipe(argv)  # the same one-line recipe errors as the CLI, before anything starts
                    _check_recipe_paths(recipe, roots)
                    if Path(out, "checkpoints", "latest").exists():
                        argv += ["--resume", "latest"]
                    job = jobs.start("train", argv, out, label=Path(out).name)
                except (UiError, UsageError, RecipeError) as e:
                    return gr.skip(), _error(e)
                return job.id, f"started {job.kind} job {job.id}: writes to `{job.output}`"

            def stop(job_id: str | None) -> str:
                job = jobs.stop(job_id) if job_id else None
                if job is None:
                    return "no job to stop"
                return _job_state(job) + (" — asked to stop" if job.running else "")

            def train_tick(job_id: str | None) -> tuple[Any, ...]:
                job = jobs.get(job_id)
                if job is None:
                    return "no training job yet", _progress_html(0, ""), None, [], None, ""
                v = run_view(Path(job.output), work)
                lora = v.lora if not job.running else None
                text = v.progress_text(job.state)
                return _job_state(job), _progress_html(v.fraction, text), v.loss_png, v.samples, lora, job.log_tail()

            def fill_from_job(job_id: str | None, preset: str, config: str) -> list[Any]:
                """After a reload: the attached run's own output folder, dataset and values, else the preset's."""
                job = jobs.get(job_id)
                recipe = Path(job.output) / "recipe.yaml" if job is not None else None
                if job is None or recipe is None or not recipe.exists():
                    return [gr.skip(), gr.skip(), *fill(preset, config)]
                dataset = recipe_value(recipe.parent, "data.dataset") or gr.skip()
                try:
                    return [job.output, dataset, *_recipe_values(None, str(recipe), Roots((recipe.parent,)))]
                except (UiError, UsageError, RecipeError):
                    return [job.output, dataset] + [gr.skip()] * len(TRAIN_FIELDS)

            def data_facts(dataset: str | None) -> str:
                if not (dataset or "").strip():
                    return ""
                try:
                    root, _ = roots.dataset(dataset)
                except (UiError, DataError) as e:
                    return _error(e)
                return _data_facts(root)

            gr.on([tr_preset.change, tr_config.submit], fill, [tr_preset, tr_config], fields)
            tr_dataset.change(data_facts, [tr_dataset], [tr_data])
            tr_start.click(
                start_training,
                [tr_preset, tr_config, tr_dataset, tr_output, tr_extra, *fields],
                [train_job, tr_message],
            )
            tr_stop.click(stop, [train_job], [tr_message])
            timer.tick(train_tick, [train_job], [tr_status, tr_progress, tr_plot, tr_samples, tr_lora, tr_log])

        # ---------------------------------------------------------------------------------------- Evaluation
        with gr.Tab("Evaluation", id="evaluation"):
            with gr.Row():
                ev_run = picker(roots.folders_with("run"), "Training run", "ev-run", scale=4)
                ev_refresh = gr.Button("Refresh", elem_id="ev-refresh")
            ev_ckpts = gr.CheckboxGroup([], label="Checkpoints", elem_id="ev-ckpts")
            with gr.Row():
                ev_prompts = gr.Textbox(label="Prompts, one per line (blank: the run's sample prompts)", lines=3,
                                        elem_id="ev-prompts")  # fmt: skip
                ev_seeds = gr.Textbox(value="0", label="Seeds", elem_id="ev-seeds")
                ev_steps = gr.Number(value=28, label="Denoising steps", elem_id="ev-steps")
            with gr.Row():
                ev_clip_model = gr.Textbox(value="ViT-B-32", label="CLIP model (quality)", elem_id="ev-clip-model")
                ev_clip_weights = gr.Textbox(label="CLIP weights .safetensors (quality)", elem_id="ev-clip-weights")
            with gr.Row():
                ev_compare = gr.Button("Compare as a grid", variant="primary", elem_id="ev-compare")
                ev_quality = gr.Button("Quality scores", elem_id="ev-quality")
                ev_best = gr.Button("Select best", elem_id="ev-best")
                ev_stop = gr.Button("Stop", variant="stop", elem_id="ev-stop")
            ev_message = gr.Markdown(elem_id="ev-message")
            ev_status = gr.Markdown(elem_id="ev-status")
            ev_grid = gr.Image(label="Grid", type="filepath", elem_id="ev-grid", interactive=False)
            ev_table = gr.Dataframe(label="Scores", interactive=False, elem_id="ev-table", visible=False)
            ev_log = gr.Textbox(label="Log", lines=6, max_lines=6, elem_id="ev-log")

            def list_checkpoints(run: str) -> Any:
                try:
                    found = checkpoints(Path(roots.resolve(run, "training run")))
                except UiError:
                    return gr.update(choices=[], value=[])
                choices = [(checkpoint_label(p), p) for p in found]
                return gr.update(choices=choices, value=[p for _, p in choices[-2:]])

            def refresh_runs(run: str) -> Any:
                return gr.update(choices=roots.folders_with("run")), list_checkpoints(run)

            def start_eval(sub: str, run: str, ckpts: list[str], prompts: str, seeds: str, steps: Any,
                           clip_model: str, clip_weights: str) -> Any:  # fmt: skip
                try:
                    run_dir = roots.resolve(run, "training run")
                    order = {p: i for i, p in enumerate(checkpoints(Path(run_dir)))}  # rows in step order
                    picked = sorted(
                        (roots.resolve(c, "checkpoint") for c in ckpts or []), key=lambda p: order.get(p, 0)
                    )
                    if not picked:
                        raise UiError("checkpoints: pick at least one")
                    out = str(Path(run_dir) / "eval" / f"{sub}-{stamp()}")
                    weights = (clip_weights or "").strip()
                    if sub == "assess-quality" and not weights:
                        raise UiError("CLIP weights: quality scores need an open_clip weights file (.safetensors)")
                    args = [sub, *(["--checkpoint"] if sub == "assess-quality" else []), *picked, "--output", out]
                    if sub == "select-best" and not weights:  # validation loss alone: no images to generate
                        args += ["--weight-clip", "0", "--weight-diversity", "0", "--weight-overfit", "0"]
                    else:
                        args += ["--seeds", *(seeds or "0").split(), "--steps", str(int(steps or 28))]
                        lines = [ln.strip() for ln in (prompts or "").splitlines() if ln.strip()]
                        if lines:
                            args += ["--prompt", *lines]
                        if weights:
                            args += [
                                "--clip-model",
                                clip_model,
                                "--clip-weights",
                                roots.resolve(weights, "CLIP weights"),
                            ]
                    job = jobs.start("eval", args, out, label=sub, sub=sub)
                except (UiError, UsageError) as e:
                    return gr.skip(), _error(e)
                return job.id, f"started {job.kind} job {job.id}: writes to `{job.output}`"

            def eval_tick(job_id: str | None) -> tuple[Any, ...]:
                import json

                job = jobs.get(job_id)
                if job is None:
                    return "no evaluation yet", None, None, ""
                out = Path(job.output)
                grid = out / "grid.png"
                table = None
                for name, key in (("quality.json", "checkpoints"), ("ranking.json", "ranking")):
                    if (out / name).exists():
                        rows = json.loads((out / name).read_text()).get(key) or []
                        if rows and isinstance(rows[0], dict):
                            cols = [k for k, v in rows[0].items() if not isinstance(v, dict | list)]
                            table = {"headers": cols, "data": [[r.get(c) for c in cols] for r in rows]}
                status = _job_state(job)
                if (out / "ranking.md").exists() and not job.running:
                    best = [ln for ln in (out / "ranking.md").read_text().splitlines() if ln.startswith("**Best")]
                    status += "\n\n" + "".join(best)
                shown = gr.update(value=table, visible=table is not None)
                return status, str(grid) if grid.exists() else None, shown, job.log_tail(8)

            ev_run.change(list_checkpoints, [ev_run], [ev_ckpts])
            ev_refresh.click(refresh_runs, [ev_run], [ev_run, ev_ckpts])
            eval_inputs = [ev_run, ev_ckpts, ev_prompts, ev_seeds, ev_steps, ev_clip_model, ev_clip_weights]
            for button, sub in ((ev_compare, "compare"), (ev_quality, "assess-quality"), (ev_best, "select-best")):
                button.click(
                    lambda *a, sub=sub: start_eval(sub, *a), eval_inputs, [eval_job, ev_message]
                )  # fmt: skip
            ev_stop.click(stop, [eval_job], [ev_message])
            timer.tick(eval_tick, [eval_job], [ev_status, ev_grid, ev_table, ev_log])

        # -------------------------------------------------------------------------------------- Optimization
        with gr.Tab("Optimization", id="optimization"):
            with gr.Row():
                op_preset = gr.Dropdown(presets(), value="tiny", label="Preset", elem_id="op-preset")
                op_dataset = picker(train_data, "Dataset", "op-dataset")
                op_output = gr.Textbox(value=str(roots.folders[0] / "sweeps" / "ui"), label="Output folder",
                                       elem_id="op-output")  # fmt: skip
            with gr.Row():
                op_trials = gr.Number(value=8, label="Trials", elem_id="op-trials")
                op_steps = gr.Number(value=200, label="Max steps per trial", elem_id="op-steps")
                op_concurrent = gr.Number(value=1, label="Trials at a time", elem_id="op-concurrent")
                op_gpus = gr.Number(
                    value=1 if _has_gpu() else 0, label="GPUs per trial (0: CPU only)", elem_id="op-gpus"
                )
                op_space = gr.Textbox(label="Search space YAML (blank: the default)", elem_id="op-space")
            op_extra = gr.Textbox(label="More recipe flags", elem_id="op-extra")
            with gr.Row():
                op_start = gr.Button("Start sweep", variant="primary", elem_id="op-start")
                op_resume = gr.Button("Resume sweep", elem_id="op-resume")
                op_stop = gr.Button("Stop", variant="stop", elem_id="op-stop")
            op_message = gr.Markdown(elem_id="op-message")
            op_status = gr.Markdown(elem_id="op-status")
            op_table = gr.Dataframe(label="Trials", interactive=False, elem_id="op-table", visible=False)
            op_plots = gr.Gallery(label="Plots", columns=2, height=420, object_fit="contain", elem_id="op-plots")
            op_best = gr.File(label="best_config.yaml (download)", elem_id="op-best", interactive=False)
            op_log = gr.Textbox(label="Log", lines=8, max_lines=8, elem_id="op-log")

            def start_sweep(resume: bool, preset: str, dataset: str, output: str, trials: Any, steps: Any,
                            concurrent: Any, gpus: Any, space: str, extra: str) -> Any:  # fmt: skip
                try:
                    out = roots.resolve(output, "output", must_exist=False)
                    args = ["--output", out]
                    if resume:
                        args.append("--resume")
                    else:
                        args += ["--preset", preset, "--dataset", roots.resolve(dataset, "dataset", allow_builtin=True)]
                        args += ["--trials", str(int(trials or 1)), "--max-steps", str(int(steps or 1))]
                        args += ["--concurrent", str(int(concurrent or 1)), "--gpus-per-trial", str(gpus or 0)]
                        if (space or "").strip():
                            args += ["--space", roots.resolve(space, "search space")]
                        from ..tune import split_argv

                        ours, rest = split_argv(_extra(extra))
                        for flag in ("--output", "--space", "--storage"):
                            if any(a.partition("=")[0] == flag for a in ours):
                                raise UiError(f"more flags: {flag} is set by the form's fields here")
                        recipe, _ = parse_recipe(
                            ["--preset", preset, "--dataset", args[args.index("--dataset") + 1], *rest]
                        )
                        _check_recipe_paths(
                            dataclasses.replace(recipe, output=dataclasses.replace(recipe.output, dir=out)), roots
                        )
                        args += [*ours, *rest]
                        if Path(out, "sweep.json").exists():
                            raise UiError(f"output: {out} already holds a sweep; press Resume or choose another")
                    job = jobs.start("tune", args, out, label=Path(out).name)
                except (UiError, UsageError, RecipeError, ValueError) as e:
                    return gr.skip(), _error(e)
                return job.id, f"started {job.kind} job {job.id}: writes to `{job.output}`"

            def tune_tick(job_id: str | None) -> tuple[Any, ...]:
                job = jobs.get(job_id)
                if job is None:
                    return "no sweep yet", None, [], None, ""
                v = sweep_view(Path(job.output))
                table = {"headers": v.headers, "data": v.rows} if v.rows else None
                shown = gr.update(value=table, visible=table is not None)
                return f"{_job_state(job)}\n\n{v.summary()}", shown, v.plots, v.best_config, job.log_tail()

            sweep_inputs = [op_preset, op_dataset, op_output, op_trials, op_steps, op_concurrent, op_gpus, op_space,
                            op_extra]  # fmt: skip
            op_start.click(lambda *a: start_sweep(False, *a), sweep_inputs, [tune_job, op_message])
            op_resume.click(lambda *a: start_sweep(True, *a), sweep_inputs, [tune_job, op_message])
            op_stop.click(stop, [tune_job], [op_message])
            timer.tick(tune_tick, [tune_job], [op_status, op_table, op_plots, op_best, op_log])

        def reattach() -> tuple[Any, ...]:
            """A new page (or a reload) shows the running job of each kind, else the latest one."""
            found = [jobs.latest(kind) for kind in ("train", "eval", "tune")]
            return tuple(j.id if j else None for j in found)

        app.load(reattach, None, [train_job, eval_job, tune_job]).then(
            fill_from_job, [train_job, tr_preset, tr_config], [tr_output, tr_dataset, *fields]
        ).then(data_facts, [tr_dataset], [tr_data])
    return app


# ------------------------------------------------------------------------------------------------------ serving

LOOPBACK = {"localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_auth(auth: str | None, auth_file: str | None) -> list[tuple[str, str]]:
    """USER:PASS pairs from --auth, --auth-file (one per line) or FLUX2_LORA_UI_AUTH."""
    entries: list[str] = []
    if auth_file:
        path = Path(auth_file)
        if not path.is_file():
            raise UsageError(f"--auth-file: {auth_file} does not exist")
        entries += [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if auth:
        entries.append(auth)
    if not entries and os.environ.get("FLUX2_LORA_UI_AUTH"):
        entries.append(os.environ["FLUX2_LORA_UI_AUTH"])
    pairs = []
    for e in entries:
        user, sep, password = e.partition(":")
        if not sep or not user or not password:
            raise UsageError("--auth: expected USER:PASSWORD with both parts non-empty")
        pairs.append((user, password))
    return pairs


def serve(roots: Roots, state_dir: Path, host: str, port: int, share: bool, auth: list[tuple[str, str]]) -> None:
    """Build the app over `roots` and serve it until Ctrl-C (jobs and pictures recorded in state_dir)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("FLUX2_LORA_RECIPES", str(recipes_dir()))
    app = build_app(roots, state_dir.resolve())
    print(f"flux2-lora ui: http://{host}:{port} (folders: {roots.describe()}; Ctrl-C to quit)", flush=True)
    app.queue(default_concurrency_limit=4).launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth or None,
        allowed_paths=[str(f) for f in roots.folders] + [str(state_dir)],
        quiet=True,
        footer_links=[],
    )
