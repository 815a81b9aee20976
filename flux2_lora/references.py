"""Sample prompts with reference images (edits, `Flux2Pipeline(image=[...])`): what one is and how its files are checked.

A `validation.prompts` entry is a prompt string or a `SamplePrompt` (`{prompt: TEXT, images: [FILE, ...]}`); an
evaluation prompt carries its references the same way (`eval ... --image FILE`, a suite entry's `images:`). Every
reference is opened here before any model loads, so that a missing, unreadable or unusable file is one line naming
it (`open_reference`); sampling and evaluation then pass the images to the pipeline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RecipeError

# FLUX.2's pipelines refuse an `image=` input with a side under 64 pixels or sides further apart than 8:1
# (Flux2ImageProcessor.check_image_input).
MIN_SIDE = 64
MAX_ASPECT = 8
FORM = "a prompt string or {prompt: TEXT, images: [FILE, ...]}"


@dataclass
class SamplePrompt:
    """A sample prompt with reference images, rendered as an edit (`{prompt: "make the circle red", images: [a.png]}`)."""

    prompt: str
    """The prompt (an editing instruction)."""
    images: list[str] = field(default_factory=list)
    """Reference image files, up to 10, given to the pipeline as `image=[...]` in this order (a relative path is read
    from the working folder, as data.dataset is)."""


def open_reference(path: str, field_name: str, error: type[Exception] = RecipeError) -> Any:
    """A reference image as an RGB PIL image, checked as FLUX.2's pipelines check their `image=` inputs; a missing,
    unreadable or unusable file raises error('<field_name>: <path> ...')."""
    from PIL import Image, UnidentifiedImageError

    p = Path(os.path.expanduser(path))  # an unknown ~user stays as written: "does not exist"
    if not p.is_file():
        raise error(f"{field_name}: {path} {'is a folder, not an image' if p.is_dir() else 'does not exist'}")
    try:
        with Image.open(p) as im:
            image = im.convert("RGB")
    except UnidentifiedImageError:
        raise error(f"{field_name}: {path} is not an image file Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise error(f"{field_name}: {path} is not a readable image ({reason})") from None
    w, h = image.size
    if min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
        raise error(
            f"{field_name}: {path} is {w}x{h}; FLUX.2 takes reference images of at least {MIN_SIDE} pixels on each "
            f"side, with sides at most {MAX_ASPECT}:1"
        )
    return image


def check_prompts(prompts: list[str | SamplePrompt], max_references: int, open_files: bool = True) -> None:
    """The checks of a parsed `validation.prompts` that its type cannot make: at most `max_references` images an entry,
    each one an image the pipeline takes (with open_files). Raises RecipeError naming validation.prompts[i].images[j]."""
    import yaml

    for i, p in enumerate(prompts):
        if isinstance(p, str) and p.lstrip().startswith(("[", "{")):
            # jsonargparse keeps a command-line list it could not read (`'[5]'`, a misspelt key) as one prompt.
            try:
                structured = isinstance(yaml.safe_load(p), (list, dict))
            except yaml.YAMLError:
                structured = False
            if structured:
                raise RecipeError(f"validation.prompts: cannot read {p} as a list of prompts (each {FORM})")
        images = [] if isinstance(p, str) else p.images
        if len(images) > max_references:
            raise RecipeError(
                f"validation.prompts[{i}].images: at most {max_references} reference images (FLUX.2 takes up to "
                f"{max_references}), got {len(images)}"
            )
        for j, image in enumerate(images if open_files else []):
            open_reference(image, f"validation.prompts[{i}].images[{j}]")


def check_prompt_entries(values: dict[str, Any], where: str = "") -> None:
    """Each `validation.prompts` entry of a recipe file (as YAML read it) is a string or a {prompt, images} mapping,
    said in one line naming the entry (jsonargparse would name neither the entry nor the key)."""
    group = values.get("validation")
    prompts = group.get("prompts") if isinstance(group, dict) else None
    for i, p in enumerate(prompts if isinstance(prompts, list) else []):
        name = f"validation.prompts[{i}]"
        if isinstance(p, str):
            continue
        if not isinstance(p, dict):
            raise RecipeError(f"{name}: must be {FORM}, got {p!r}{where}")
        unknown = sorted(str(k) for k in p if k not in ("prompt", "images"))
        if unknown:
            raise RecipeError(f"{name}: unknown key {unknown[0]!r} (an entry is {FORM}){where}")
        if not isinstance(p.get("prompt"), str):
            raise RecipeError(f"{name}.prompt: must be a string, got {p.get('prompt')!r}{where}")
        images = p.get("images", [])
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise RecipeError(f"{name}.images: must be a list of image files, got {images!r}{where}")
