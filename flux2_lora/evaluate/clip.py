"""CLIP models for evaluation, built with open_clip and filled from safetensors only.

The architecture comes from open_clip (`pretrained=None`: no download, no pickle); the weights from
`--clip-weights FILE.safetensors` (an open_clip state dict) or, without it, from an open_clip safetensors
file already in the user's Hugging Face hub cache (looked up offline). A `.json` model config may stand
in for an architecture name (it is registered with open_clip under its file stem).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import EvalError

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-B-32"
# Preferred hub weights per architecture (any other open_clip tag found in the cache also works).
PREFERRED_TAGS = {"ViT-B-32": "laion2b_s34b_b79k", "ViT-B-16": "laion2b_s34b_b88k", "ViT-L-14": "laion2b_s32b_b82k"}
SAFE_NAMES = ("open_clip_model.safetensors", "model.safetensors")


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise EvalError("--clip-model: needs open_clip; pip install 'flux2-lora[eval]'") from None
    return open_clip


def _architecture(model: str) -> str:
    """An open_clip architecture name; a .json config file is registered under its stem first."""
    open_clip = _open_clip()
    if model.endswith(".json"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise EvalError(f"--clip-model: {model} does not exist (an open_clip name or a model config .json)")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise EvalError(
            f"--clip-model: {model!r} is not an open_clip architecture (e.g. ViT-B-32, ViT-L-14; "
            "`python -c 'import open_clip; print(open_clip.list_models())'` lists them)"
        )
    return model


def hub_cached_weights(arch: str, tag: str | None = None) -> Path | None:
    """An open_clip safetensors file for `arch` in the local hub cache (no network), or None."""
    open_clip = _open_clip()
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg

    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(arch)
    if not tag and arch in PREFERRED_TAGS:
        tags = [PREFERRED_TAGS[arch]] + [t for t in tags if t != PREFERRED_TAGS[arch]]
    for t in tags:
        repo = (get_pretrained_cfg(arch, t) or {}).get("hf_hub", "").strip("/")
        for name in SAFE_NAMES if repo else ():
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return Path(found)
    return None


def _no_weights_message(arch: str, tag: str | None) -> str:
    from open_clip.pretrained import get_pretrained_cfg

    tag = tag or PREFERRED_TAGS.get(arch)
    repo = (get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").strip("/") if tag else ""
    fetch = f"; or put them in the hub cache: `hf download {repo} open_clip_model.safetensors`" if repo else ""
    return (
        f"--clip-weights: no CLIP weights for {arch}: pass --clip-weights FILE.safetensors "
        f"(an open_clip state dict){fetch}"
    )


def load_state(path: Path, what: str = "--clip-weights") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle) is refused without being opened."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise EvalError(f"{what}: {path} does not exist")
    if path.suffix != ".safetensors":
        raise EvalError(
            f"{what}: {path} is not a .safetensors file; only safetensors weights are read (pickle files such as "
            ".bin/.pt/.ckpt are never loaded; convert it with safetensors.torch.save_file)"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise EvalError(f"{what}: {path} is not a readable safetensors file ({e})") from None


@dataclass
class ClipModel:
    """An open_clip model with its image preprocessing and tokenizer; embeddings are L2-normalised."""

    name: str
    weights: str
    model: Any
    preprocess: Any
    tokenizer: Any
    device: torch.device
    batch_size: int = 32

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + self.batch_size]])
            out.append(F.normalize(self.model.encode_image(x.to(self.device)).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 1)


def build_clip(model: str = DEFAULT_CLIP_MODEL) -> tuple[Any, Any, Any, str]:
    """(model, preprocess, tokenizer, architecture name) with open_clip's `pretrained=None`: random weights."""
    open_clip = _open_clip()
    arch = _architecture(model)
    logging.disable(logging.WARNING)  # open_clip warns on the root logger that no weights were loaded: by design
    try:
        net, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    return net, preprocess, open_clip.get_tokenizer(arch), arch


def load_clip(
    model: str = DEFAULT_CLIP_MODEL,
    weights: str | None = None,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
) -> ClipModel:
    """Build `model` and fill it from `weights` (a .safetensors file) or the hub cache; EvalError when neither."""
    if weights is not None:  # a wrong path fails at once, before open_clip is even imported
        path = Path(weights).expanduser()
        if not path.exists() or path.suffix != ".safetensors":
            load_state(path)
    arch = _architecture(model)
    if weights is None:
        found = hub_cached_weights(arch, pretrained)
        if found is None:
            raise EvalError(_no_weights_message(arch, pretrained))
        path = found
    state = load_state(path)  # checked and read before the (possibly large) model is built
    net, preprocess, tokenizer, arch = build_clip(model)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unknown = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unknown or wrong:
        example = (wrong or missing or unknown)[0]
        raise EvalError(
            f"--clip-weights: {path} does not fit open_clip {arch} ({len(missing)} missing, {len(unknown)} unexpected, "
            f"{len(wrong)} wrongly shaped tensors, e.g. {example}); pass the --clip-model these weights were made for"
        )
    net.load_state_dict(state)
    net.eval().requires_grad_(False).to(device)
    return ClipModel(arch, str(path), net, preprocess, tokenizer, torch.device(device))
