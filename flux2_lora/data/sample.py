"""The built-in sample dataset: small pictures of coloured shapes with captions, drawn deterministically."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def make_sample_dataset(out: str | os.PathLike[str], count: int = 12, size: int = 96, seed: int = 0) -> Path:
    """Write `count` images (some landscape, some portrait) with .txt captions into `out`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(names, 2)
        w, h = (size, size) if i % 4 else ((size * 3) // 2, size) if i % 8 else (size, (size * 3) // 2)
        img = Image.new("RGB", (w, h), COLORS[bg])
        d = ImageDraw.Draw(img)
        r = min(w, h) // 3
        cx, cy = w // 2 + rng.randint(-r // 3, r // 3), h // 2 + rng.randint(-r // 3, r // 3)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=COLORS[fg])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[fg])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
        img.save(tmp / f"{i:03d}.png")
        (tmp / f"{i:03d}.txt").write_text(f"a {fg} {shape} on a {bg} background\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_dataset(spec: str) -> Path:
    """A dataset folder for a spec: `builtin:sample` is generated once under FLUX2_LORA_HOME."""
    if spec == "builtin:sample":
        from ..config import build_once, cache_root

        return build_once(cache_root() / "data" / "sample", make_sample_dataset, "000.txt")
    return Path(spec).expanduser()
