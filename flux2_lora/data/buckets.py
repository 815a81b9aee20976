"""Aspect-ratio buckets: every batch holds images of one size (the transformer reads one id grid)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

MULTIPLE = 16  # VAE downsampling (8) x FLUX.2 patch (2)
ASPECTS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)


def bucket_sizes(
    resolution: int, enabled: bool = True, aspects: tuple[float, ...] | list[float] | None = None
) -> list[tuple[int, int]]:
    """(width, height) per bucket (aspect = width / height), area close to resolution^2, sides multiples of 16."""
    if not enabled:
        return [(resolution, resolution)]
    sizes = []
    for a in aspects or ASPECTS:
        w = max(MULTIPLE, round(resolution * math.sqrt(a) / MULTIPLE) * MULTIPLE)
        h = max(MULTIPLE, round(resolution / math.sqrt(a) / MULTIPLE) * MULTIPLE)
        if (w, h) not in sizes:
            sizes.append((w, h))
    return sizes


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - aspect))


def resize_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover the bucket, then center-crop to it."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(new, Image.Resampling.LANCZOS)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return image.crop((left, top, left + w, top + h))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
