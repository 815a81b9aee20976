"""Prompt suites for `eval test-prompts`: the built-in templates and user YAML files.

A template holds `{concept}` (the trained concept with its trigger, e.g. "sks dog") or `{cls}` (the concept
without the trigger, e.g. "dog"). The `leakage` category uses only `{cls}`: a LoRA whose concept shows up
without its trigger has leaked into the class, which the report flags by comparing each such image with the
base model's image for the same prompt and seed.

A user suite is YAML, either a list of prompts or

    prompts:
      - {category: style, prompt: "a mosaic of {concept}"}
      - "a photo of {concept} at the beach"          # category: custom
      - {category: edit, prompt: "put {concept} in the room", images: [room.png]}

An entry's `images` are reference images (an edit, up to 10; a relative path is read from the suite file's folder);
`--image FILE` gives references to every entry that names none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import MAX_REFERENCES
from ..references import open_reference
from . import EvalError

LEAKAGE = "leakage"

BUILTIN: list[tuple[str, str]] = [
    ("recontextualisation", "a photo of {concept} on a sandy beach"),
    ("recontextualisation", "a photo of {concept} in a snowy forest"),
    ("recontextualisation", "{concept} on a kitchen table, morning light"),
    ("style", "a watercolour painting of {concept}"),
    ("style", "a pencil sketch of {concept}"),
    ("style", "{concept} as a low-poly 3D render"),
    ("attribute", "a photo of a purple {concept}"),
    ("attribute", "a photo of a tiny {concept}"),
    ("attribute", "a photo of {concept} wearing a red scarf"),
    ("composition", "a photo of {concept} next to a wooden chair"),
    ("composition", "{concept} and a cat sitting side by side"),
    (LEAKAGE, "a photo of {cls}"),
    (LEAKAGE, "a painting of {cls}"),
]


@dataclass
class SuitePrompt:
    category: str
    template: str
    prompt: str
    images: list[str] = field(default_factory=list)  # reference image files (an edit)


def split_concept(concept: str, trigger: str | None) -> tuple[str, str]:
    """(trigger, class phrase): the trigger is the given one when it is in the concept, else its first word."""
    words = concept.split()
    if not words:
        raise EvalError('--concept: must not be empty (e.g. "sks dog")')
    if trigger and trigger in words:
        rest = [w for w in words if w != trigger]
    else:
        trigger, rest = words[0], words[1:]
    return trigger, " ".join(rest) or "an object"


def fill(category: str, template: str, concept: str, cls: str, images: list[str] | None = None) -> SuitePrompt:
    try:
        prompt = template.format(concept=concept, cls=cls)
    except (KeyError, IndexError, ValueError) as e:
        raise EvalError(
            f"--suite: template {template!r} has an unknown placeholder ({e}); use {{concept}} or {{cls}}"
        ) from None
    return SuitePrompt(category, template, " ".join(prompt.split()), list(images or []))


def load_suite(path: str) -> list[tuple[str, str, list[str]]]:
    """(category, template, reference images) of each entry of a user YAML suite; every image is checked here (a
    relative path is read from the suite's folder)."""
    from ..recipe import read_yaml

    data = read_yaml(Path(path).expanduser(), "--suite")
    items = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise EvalError(f"--suite: {path} must hold a list of prompts (or `prompts:` with one)")
    folder = Path(path).expanduser().parent
    out: list[tuple[str, str, list[str]]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(("custom", item, []))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise EvalError(f"--suite: {path}: item {i} must be a prompt string or {{category, prompt, images}}")
        images = item.get("images", [])
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise EvalError(f"--suite: {path}: item {i} images: must be a list of image files, got {images!r}")
        if len(images) > MAX_REFERENCES:
            raise EvalError(
                f"--suite: {path}: item {i} images: at most {MAX_REFERENCES} reference images (FLUX.2 takes up to "
                f"{MAX_REFERENCES}), got {len(images)}"
            )
        paths = [str(folder / os.path.expanduser(x)) for x in images]  # an absolute path stays as it is
        for j, image in enumerate(paths):
            open_reference(image, f"--suite: {path}: item {i} images[{j}]", EvalError)
        out.append((str(item.get("category", "custom")), item["prompt"], paths))
    return out


def build_suite(
    concept: str, trigger: str | None, suite: str | None, builtin: bool, images: list[str] | None = None
) -> tuple[list[SuitePrompt], str]:
    """The prompts to run (built-in templates and/or a user suite) and the trigger they use. images (--image): the
    reference images of every prompt whose suite entry names none."""
    trig, cls = split_concept(concept, trigger)
    templates: list[tuple[str, str, list[str]]] = [(c, t, []) for c, t in BUILTIN] if builtin else []
    templates += load_suite(suite) if suite else []
    if not templates:
        raise EvalError("--suite: --no-builtin needs a --suite FILE")
    return [fill(c, t, concept, cls, refs or images) for c, t, refs in templates], trig
