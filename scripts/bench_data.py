"""Data-path throughput: samples/s reading raw image shards vs cached (latent + embedding) shards.

    python scripts/bench_data.py [--images 256] [--size 512] [--resolution 256] [--repeats 5]

Raw shards are decoded and resized to their bucket as the cache stage does (PIL decode + resize +
to_tensor); cached shards are read as training reads them (positioned reads through a DataLoader, with 0
and 2 workers). The model is the tiny FLUX.2-dev so the cache is cheap to build; the cached tensors have
the tiny model's shapes, so the cached figures measure the I/O and decode path, not FLUX.2-dev's sizes.
Prints the median of --repeats runs and the ratio to the raw path.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from flux2_lora.config import Recipe
from flux2_lora.data.buckets import bucket_sizes, nearest_bucket, resize_to_bucket, to_tensor
from flux2_lora.data.cache import build_cache, read_index, settings_for
from flux2_lora.data.folder import scan_folder
from flux2_lora.data.shards import iter_folder_samples, iter_raw_samples, open_image, write_raw_shards
from flux2_lora.data.stream import CachedSamples, GlobalBatches, RankBatchSampler, collate
from flux2_lora.model import make_tiny_pipeline, resolve_model


def make_images(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        w, h = (size, size) if i % 3 else (size * 3 // 2, size)
        arr = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR).save(root / f"{i:05d}.jpg", quality=90)
        (root / f"{i:05d}.txt").write_text(f"picture number {i}")


def time_raw(spec: str, resolution: int) -> tuple[int, float]:
    sizes = bucket_sizes(resolution)
    t = time.perf_counter()
    n = 0
    for s in iter_raw_samples(spec):
        img = open_image(s.image, s.key)
        to_tensor(resize_to_bucket(img, nearest_bucket(img.width, img.height, sizes)))
        n += 1
    return n, time.perf_counter() - t


def time_cached(root: Path, workers: int) -> tuple[int, float]:
    """One epoch read as training reads it: one process's global batches, positioned reads into the shards."""
    index = read_index(root)
    plan = GlobalBatches(index, 1, seed=0)
    loader = DataLoader(
        CachedSamples(index), batch_sampler=RankBatchSampler(plan, 0, 1, 1), collate_fn=collate, num_workers=workers
    )
    t = time.perf_counter()
    n = sum(len(b["keys"]) for b in itertools.islice(iter(loader), plan.steps_per_epoch))
    return n, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        make_images(tmpd / "images", args.images, args.size)
        items = scan_folder(tmpd / "images")
        write_raw_shards(items, tmpd / "images", tmpd / "raw", shard_size=64)
        model = make_tiny_pipeline(tmpd / "tiny", "dev")
        recipe = Recipe()
        recipe.model.name_or_path = str(model)
        recipe.model.max_sequence_length = 64
        recipe.data.resolution = args.resolution
        recipe.data.holdout = 0
        src = resolve_model(recipe.model)
        build_cache(
            tmpd / "cache", settings_for(src, recipe), lambda: iter_folder_samples(items, tmpd / "images"),
            torch.device("cpu"), torch.float32, shard_size=64,
        )  # fmt: skip
        rows = {
            "raw shards (decode+resize)": lambda: time_raw(str(tmpd / "raw"), args.resolution),
            "cached shards, 0 workers": lambda: time_cached(tmpd / "cache", 0),
            "cached shards, 2 workers": lambda: time_cached(tmpd / "cache", 2),
        }
        results: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # alternate the paths so drift hits all of them alike
            for name, fn in rows.items():
                n, dt = fn()
                results.setdefault(name, [])
                results[name].append(n / dt)
        base = statistics.median(results["raw shards (decode+resize)"])
        print(f"{args.images} images of {args.size}px, resolution {args.resolution}, median of {args.repeats} runs")
        print(f"{'path':32s} {'samples/s':>10s} {'vs raw':>8s}")
        for name, vals in results.items():
            med = statistics.median(vals)
            print(f"{name:32s} {med:10.1f} {med / base:7.2f}x")


if __name__ == "__main__":
    main()
