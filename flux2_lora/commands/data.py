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
) -> int:
    """Check a dataset folder, raw shards or a cache folder: every problem on one line; exit code 1 when there is an
    error.

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
    """
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

    if (folder is None) == (dataset is None):
        raise UsageError("data validate: give the folder to check (`data validate FOLDER` or --dataset FOLDER), once")
    spec = folder or dataset or ""
    shards = not is_cache(spec) and is_shard_spec(spec)
    root = None if shards else dataset_root(spec)
    if root is not None and is_cache(root):
        if fix:
            raise UsageError(f"--fix: {root} is a cache folder, which cannot be fixed (rebuild it instead)")
        report = validate_cache(root)
        print(format_report(report))
        return 1 if report.has_errors else 0
    if shards and fix:
        raise UsageError(f"--fix: {spec} is raw shards, which cannot be fixed (fix the folder, then `data shard` it)")
    tokenizer, overhead = load_tokenizer(model) if model else (None, 0)
    options: dict[str, Any] = dict(
        max_file_mb=max_file_mb,
        min_resolution=min_resolution,
        max_aspect=max_aspect,
        max_caption_tokens=max(max_tokens - overhead, 1),
        tokenizer=tokenizer,
        instance_prompt=instance_prompt,
    )
    report = validate_shards(spec, **options) if root is None else validate_dataset(root, **options)
    print(format_report(report))
    if fix and root is not None:
        lines = fix_dataset(root, fix, report, instance_prompt=instance_prompt)
        print(f"\ncleaned copy written to {fix} ({plural(len(lines), 'change')}, listed in {FIXES_FILE}):")
        print("\n".join(f"  {line}" for line in lines))
        again = validate_dataset(fix, **options)
        print("cleaned copy: " + format_report(again).splitlines()[-1])
    return 1 if report.has_errors else 0


def analyze(*, dataset: str, output: str = "analysis.png", model: str | None = None) -> None:
    """Dataset statistics (sizes, aspect ratios, caption lengths) and a histogram PNG.

    Args:
        dataset: Dataset folder.
        output: Histogram PNG to write.
        model: FLUX.2 folder whose tokenizer counts tokens.
    """
    from ..data.analyze import analyze_dataset, format_analysis, plot_analysis
    from ..data.tokens import load_tokenizer
    from ..data.validate import dataset_root

    dataset = str(dataset_root(dataset))
    tokenizer = load_tokenizer(model)[0] if model else None
    stats = analyze_dataset(dataset, tokenizer=tokenizer)
    print(format_analysis(stats))
    print(f"\nhistograms written to {plot_analysis(stats, output)}")


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
) -> None:
    """Write webdataset tar shards of a dataset folder.

    Args:
        dataset: Image folder (validated first).
        output: Folder for data-NNNNNN.tar shards.
        shard_size: Samples per shard.
        instance_prompt: Caption for images without one.
        min_resolution: Smallest short side accepted by validation.
    """
    from ..data.folder import scan_folder
    from ..data.shards import write_raw_shards
    from ..data.validate import format_report, validate_dataset

    report = validate_dataset(Path(dataset), min_resolution=min_resolution, instance_prompt=instance_prompt)
    if report.has_errors:
        print(format_report(report))
        raise UsageError(f"--dataset: {dataset} has errors (listed above); fix them or run `data validate --fix OUT`")
    items = scan_folder(dataset, instance_prompt)
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

    from ..data.cache import build_cache, dataset_source, settings_for
    from ..model import encoder_dtype, resolve_model

    if shard_size < 1:
        raise UsageError(f"--shard-size: must be a whole number >= 1 (got {shard_size})")
    recipe, _ = parse_recipe([*recipe_flags, *(["--data.dataset", shards] if shards is not None else [])])
    src = resolve_model(recipe.model)
    source, _ = dataset_source(recipe.data.dataset or "", recipe.data.instance_prompt)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
