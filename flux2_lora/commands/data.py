"""`flux2-lora data validate | analyze | augment | shard | cache | make-sample`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..recipe import parse_recipe
from .args import RecipeArgs


def validate(
    folder: str | None = None,
    /,
    *,
    dataset: str | None = None,
    fix: str | None = None,
    max_file_mb: float = 50.0,
    min_resolution: int = 256,
    max_aspect: float = 4.0,
    model: str | None = None,
    max_tokens: int = 512,
    instance_prompt: str | None = None,
    mask_dir: str | None = None,
    config: str | None = None,
) -> int:
    """Check a dataset folder, raw shards or a cache folder (or every source of a recipe): every problem on one line;
    exit code 1 when there is an error.

    Args:
        folder: The folder (or give it as --dataset).
        dataset: Dataset folder (images with .txt captions, reference images of an editing dataset), raw shards
            (`data shard`'s: a folder of .tar files, a .tar, a brace pattern), or a cache folder (index.json +
            shards) to check in full.
        fix: Write a cleaned copy into this new folder.
        max_file_mb: Largest image file accepted, in MB.
        min_resolution: Smallest short side accepted, in pixels.
        max_aspect: Long side / short side above this is a warning.
        model: FLUX.2 folder whose tokenizer checks captions.
        max_tokens: Text encoder prompt length.
        instance_prompt: Caption for images without one.
        mask_dir: Folder of loss masks named like the images (`sub/name.png` for `sub/name.jpg`; white = train):
            each must be readable, of its image's size and not all black. Masks beside the images (`name.mask.png`)
            are checked without it.
        config: A recipe file: check each of its sources (`data.datasets`, or `data.dataset`) with the source's own
            instance prompt and mask folder, and report per source.
    """
    if config is not None:
        if folder is not None or dataset is not None or fix:
            raise UsageError("data validate: give a folder, or --config RECIPE to check every source of a recipe")
        limits = dict(max_file_mb=max_file_mb, min_resolution=min_resolution, max_aspect=max_aspect)
        bad = 0
        sources = _recipe_sources(config)
        for src in sources:
            print(f"== {_source_title(src)}")
            bad += _validate_one(src.path, None, model, max_tokens, src.instance_prompt, src.mask_dir, **limits) != 0
            print()
        print(f"{len(sources)} source(s): " + (f"{bad} with errors" if bad else "no errors"))
        return 1 if bad else 0
    if (folder is None) == (dataset is None):
        raise UsageError("data validate: give the folder to check (`data validate FOLDER` or --dataset FOLDER), once")
    return _validate_one(
        folder or dataset or "", fix, model, max_tokens, instance_prompt, mask_dir,
        max_file_mb=max_file_mb, min_resolution=min_resolution, max_aspect=max_aspect,
    )  # fmt: skip


def _recipe_sources(config: str) -> list[Any]:
    """The resolved sources of a recipe file (checked as `train` checks it)."""
    from ..sources import resolve_sources

    recipe, _ = parse_recipe(["--config", config])
    return resolve_sources(recipe.data)


def _source_title(src: Any) -> str:
    """One line naming a source and its settings, for per-source reports."""
    res = ", ".join(map(str, src.resolutions))
    masks = f", masks in {src.mask_dir}" if src.mask_dir else ""
    return f"{src.field}: {src.path} ({src.role}, repeats {src.repeats}, resolution {res}{masks})"


def _validate_one(
    spec: str,
    fix: str | None,
    model: str | None,
    max_tokens: int,
    instance_prompt: str | None,
    mask_dir: str | None,
    **limits: Any,
) -> int:
    """`data validate` of one folder, raw shards or cache; prints the report and returns the exit code."""
    from ..data.fix import fix_dataset
    from ..data.shards import is_shard_spec
    from ..data.tokens import load_tokenizer
    from ..data.validate import (
        FIXES_FILE,
        dataset_root,
        format_report,
        is_cache,
        plural,
        validate_cache,
        validate_dataset,
    )
    from ..data.validate_shards import validate_shards

    shards = not is_cache(spec) and is_shard_spec(spec)
    root = None if shards else dataset_root(spec)
    if root is not None and is_cache(root):
        if fix:
            raise UsageError(f"--fix: {root} is a cache folder, which cannot be fixed (rebuild it instead)")
        report = validate_cache(root)
        print(format_report(report))
        return 1 if report.has_errors else 0
    if shards and mask_dir is not None:
        raise UsageError(f"--mask-dir: {spec} is raw shards, whose masks are members of their samples (`data shard`)")
    if shards and fix:
        raise UsageError(f"--fix: {spec} is raw shards, which cannot be fixed (fix the folder, then `data shard` it)")
    tokenizer, overhead = load_tokenizer(model) if model else (None, 0)
    options: dict[str, Any] = dict(
        **limits,
        max_caption_tokens=max(max_tokens - overhead, 1),
        tokenizer=tokenizer,
        instance_prompt=instance_prompt,
    )
    report = validate_shards(spec, **options) if root is None else validate_dataset(root, **options, mask_dir=mask_dir)
    print(format_report(report))
    if fix and root is not None:
        lines = fix_dataset(root, fix, report, instance_prompt=instance_prompt)
        print(f"\ncleaned copy written to {fix} ({plural(len(lines), 'change')}, listed in {FIXES_FILE}):")
        print("\n".join(f"  {line}" for line in lines))
        again = validate_dataset(fix, **options)
        print("cleaned copy: " + format_report(again).splitlines()[-1])
    return 1 if report.has_errors else 0


def analyze(
    *, dataset: str | None = None, output: str = "analysis.png", model: str | None = None, config: str | None = None
) -> None:
    """Dataset statistics (sizes, aspect ratios, caption lengths) and a histogram PNG (per source of a recipe).

    Args:
        dataset: Dataset folder.
        output: Histogram PNG to write (with --config: one per source, OUTPUT-<n>.png).
        model: FLUX.2 folder whose tokenizer counts tokens.
        config: A recipe file: analyze each of its sources (`data.datasets`, or `data.dataset`), with the share of
            an epoch each one takes (images x repeats x resolutions).
    """
    from ..data.analyze import analyze_dataset, format_analysis, plot_analysis
    from ..data.tokens import load_tokenizer
    from ..data.validate import dataset_root

    if (dataset is None) == (config is None):
        raise UsageError("data analyze: give --dataset FOLDER, or --config RECIPE to analyze every source of a recipe")
    tokenizer = load_tokenizer(model)[0] if model else None
    if dataset is not None:
        stats = analyze_dataset(str(dataset_root(dataset)), tokenizer=tokenizer)
        print(format_analysis(stats))
        print(f"\nhistograms written to {plot_analysis(stats, output)}")
        return
    sources = _recipe_sources(config or "")
    found = [(src, analyze_dataset(str(dataset_root(src.path)), tokenizer=tokenizer)) for src in sources]
    shares = [src.repeats * len(src.resolutions) * (stats["n_images"] - stats["n_unreadable"]) for src, stats in found]
    out = Path(output)
    for n, ((src, stats), share) in enumerate(zip(found, shares, strict=True)):
        print(f"== {_source_title(src)}: {share} samples per epoch ({100 * share / max(sum(shares), 1):.0f}%)")
        print(format_analysis(stats))
        path = plot_analysis(stats, str(out.with_name(f"{out.stem}-{n}{out.suffix}")))
        print(f"histograms written to {path}\n")


def augment(*, dataset: str, output: str, samples: int, seed: int = 0, instance_prompt: str | None = None) -> None:
    """Write flipped, cropped and colour-jittered copies of each image, with its caption, to a new folder (the
    originals are not copied). An editing item's reference images get the same flip, crop and colours.

    Args:
        dataset: Dataset folder.
        output: New folder to write (must be empty or absent).
        samples: Augmented copies per image.
        seed: Random seed (the same seed gives the same files).
        instance_prompt: Caption for images without one.
    """
    from ..data.augment import augment_folder

    if samples < 1:
        raise UsageError(f"--samples: must be >= 1 (got {samples})")
    written, skipped = augment_folder(dataset, output, samples, seed, instance_prompt)
    print("\n".join(skipped + [f"wrote {written} augmented images with captions to {output}"]))


def shard(
    *,
    dataset: str,
    output: str,
    shard_size: int = 1000,
    instance_prompt: str | None = None,
    min_resolution: int = 256,
    mask_dir: str | None = None,
) -> None:
    """Write webdataset tar shards of a dataset folder (loss masks go in as <key>.mask.png members).

    Args:
        dataset: Image folder (validated first).
        output: Folder for data-NNNNNN.tar shards.
        shard_size: Samples per shard.
        instance_prompt: Caption for images without one.
        min_resolution: Smallest short side accepted by validation.
        mask_dir: Folder of loss masks named like the images (masks beside them, `name.mask.png`, need none).
    """
    from ..data.folder import scan_folder
    from ..data.shards import write_raw_shards
    from ..data.validate import format_report, validate_dataset

    report = validate_dataset(
        Path(dataset), min_resolution=min_resolution, instance_prompt=instance_prompt, mask_dir=mask_dir
    )
    if report.has_errors:
        print(format_report(report))
        raise UsageError(f"--dataset: {dataset} has errors (listed above); fix them or run `data validate --fix OUT`")
    items = scan_folder(dataset, instance_prompt, mask_dir)
    paths = write_raw_shards(items, Path(dataset), Path(output), shard_size)
    print(f"wrote {len(items)} samples in {len(paths)} shards to {output}")


def cache(recipe_flags: RecipeArgs, *, output: str, shards: str | None = None, shard_size: int = 1000) -> None:
    """Run the text encoder and VAE once into cached shards that `train --dataset OUTPUT` reads. Every other flag is
    a recipe flag, as for `train` (--preset, --config, --dataset, dotted fields).

    Write at least (processes x workers) shards so that every process and worker gets some.

    Args:
        output: The cache folder to write.
        shards: Raw webdataset shards to cache (instead of --dataset FOLDER).
        shard_size: Samples per cached shard.
    """
    import torch
    import yaml

    from ..data.cache import build_cache, dataset_source, settings_for
    from ..data.mix import prepare_mix
    from ..model import encoder_dtype, resolve_model

    if shard_size < 1:
        raise UsageError(f"--shard-size: must be a whole number >= 1 (got {shard_size})")
    recipe, _ = parse_recipe([*recipe_flags, *(["--data.dataset", shards] if shards is not None else [])])
    src = resolve_model(recipe.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if recipe.data.datasets or len(recipe.data.resolutions or []) > 1:  # one cache per source and resolution
        mix = prepare_mix(
            recipe, src, Path(output), device, encoder_dtype(recipe.model.dtype, device), shard_size=shard_size
        )
        print("\n".join(f"cache {line}" for line in mix.describe()))
        print("train from them with this data group in a recipe (--config), beside the same other settings:")
        data = {"dataset": None, "resolutions": None, "datasets": mix.cached_sources()}
        print(yaml.safe_dump({"data": data}, sort_keys=False))
        return
    source, _ = dataset_source(recipe.data.dataset or "", recipe.data.instance_prompt, recipe.data.mask_dir)
    index = build_cache(
        Path(output), settings_for(src, recipe), source, device, encoder_dtype(recipe.model.dtype, device),
        shard_size=shard_size, force_cpu_loading=recipe.model.force_cpu_loading,
        text_encoder_device=recipe.model.text_encoder_device,
    )  # fmt: skip
    print(
        f"cache {index.root}: {index.num_train} training samples in {len(index.train)} shards, {len(index.val)} val shard(s)"
    )
    print(f"train from it with: flux2-lora train --dataset {index.root} [same recipe flags]")


def make_sample(*, out: str, count: int = 12) -> None:
    """Write the sample dataset.

    Args:
        out: Folder to write.
        count: Number of images.
    """
    from ..data.sample import make_sample_dataset

    print(make_sample_dataset(out, count=count))
