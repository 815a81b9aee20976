"""The built-in sample datasets, drawn deterministically: coloured shapes with captions (`builtin:sample`), and an
editing task (`builtin:edit`) whose targets are their reference images with one shape recoloured."""

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


def _draw_shape(img: Image.Image, shape: str, cx: int, cy: int, r: int, colour: str) -> None:
    d = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[colour])


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
        r = min(w, h) // 3
        cx, cy = w // 2 + rng.randint(-r // 3, r // 3), h // 2 + rng.randint(-r // 3, r // 3)
        _draw_shape(img, shape, cx, cy, r, fg)
        img.save(tmp / f"{i:03d}.png")
        (tmp / f"{i:03d}.txt").write_text(f"a {fg} {shape} on a {bg} background\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def make_edit_dataset(out: str | os.PathLike[str], count: int = 12, size: int = 96, seed: int = 0) -> Path:
    """Write an editing dataset of `count` items into `out`: `NNN_ref0.png` is a scene (a shape and a distractor
    on a background), `NNN.png` the same scene with the shape recoloured, `NNN.txt` the instruction. Every third
    item has a second reference, a colour swatch, and its instruction names no colour: the target then depends
    on both references, so a LoRA that ignores them cannot learn the task."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = random.Random(seed)
    names = list(COLORS)
    for i in range(count):
        w, h = (size, size) if i % 4 else ((size * 3) // 2, size)
        shape = SHAPES[i % len(SHAPES)]
        bg, old, new, other = rng.sample(names, 4)
        r = min(w, h) // 4
        cx, cy = rng.randint(r, w // 2), rng.randint(r, h - r)
        ox, oy = rng.randint(w // 2 + r // 2, w - r // 2), rng.randint(r // 2, h - r // 2)

        scenes = {}
        for colour in (old, new):
            img = scenes[colour] = Image.new("RGB", (w, h), COLORS[bg])
            _draw_shape(img, "square", ox, oy, r // 2, other)
            _draw_shape(img, shape, cx, cy, r, colour)
        scenes[old].save(tmp / f"{i:03d}_ref0.png")
        scenes[new].save(tmp / f"{i:03d}.png")
        if i % 3 == 2:
            Image.new("RGB", (w, h), COLORS[new]).save(tmp / f"{i:03d}_ref1.png")
            caption = f"paint the {shape} in the colour of the second image"
        else:
            caption = f"make the {shape} {new}"
        (tmp / f"{i:03d}.txt").write_text(caption + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_dataset(spec: str) -> Path:
    """A dataset folder for a spec: `builtin:sample` and `builtin:edit` are generated once under FLUX2_LORA_HOME."""
    if spec in ("builtin:sample", "builtin:edit"):
        from ..config import build_once, cache_root

        name = spec.split(":", 1)[1]
        make = make_sample_dataset if name == "sample" else make_edit_dataset
        return build_once(cache_root() / "data" / name, make, "000.txt")
    return Path(spec).expanduser()
