"""The cache stage: prompt embeddings and VAE latents computed once, then the encoders are freed.

Each item becomes `OUTPUT/cache/<fingerprint>/<i>.safetensors` (latents, optionally the flipped
latents, and the prompt embedding); `extra.safetensors` holds the empty-prompt embedding (caption
dropout, negative prompt) and the sample prompts' embeddings. The fingerprint covers the model, the
text layers, the resolution and every image's path, size, mtime and caption, so a resumed run reuses
the cache and a changed dataset rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..flow import encode_images, encode_prompts
from ..model import ModelSource, free, load_text_encoder, load_vae
from .buckets import bucket_sizes, nearest_bucket, resize_to_bucket, to_tensor
from .folder import Item, load_image

TEXT_BATCH = 8


def full_caption(caption: str, trigger: str | None) -> str:
    """Caption with the trigger word in front (once)."""
    if not trigger or caption.split(" ", 1)[0] == trigger:
        return caption
    return f"{trigger} {caption}".strip()


@dataclass
class Cache:
    """Cached training items on disk, loaded per batch (memory stays flat for large datasets)."""

    dir: Path
    sizes: list[tuple[int, int]]  # (width, height) per item
    captions: list[str]
    has_flip: bool
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sizes)

    def item(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / f"{i}.safetensors"))

    @property
    def empty_embeds(self) -> torch.Tensor:
        return self.extra["empty"]

    def sample_embeds(self) -> list[torch.Tensor]:
        n = sum(1 for k in self.extra if k.startswith("prompt."))
        return [self.extra[f"prompt.{j}"] for j in range(n)]


def fingerprint(
    src: ModelSource,
    items: list[Item],
    captions: list[str],
    resolution: int,
    buckets: bool,
    flip: bool,
    max_len: int,
    prompts: list[str],
) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [str(src.path.resolve()), src.family, list(src.text_layers), resolution, buckets, flip, max_len, prompts]
        ).encode()
    )
    for it, cap in zip(items, captions, strict=True):
        st = it.image.stat()
        h.update(json.dumps([str(it.image.resolve()), st.st_size, st.st_mtime_ns, cap]).encode())
    return h.hexdigest()[:16]


def build_cache(
    root: Path,
    src: ModelSource,
    items: list[Item],
    trigger: str | None,
    resolution: int,
    buckets: bool,
    random_flip: bool,
    max_sequence_length: int,
    sample_prompts: list[str],
    device: torch.device,
    text_dtype: torch.dtype,
    is_main: bool = True,
    wait: Any = None,
    force_cpu_loading: bool = False,
) -> Cache:
    """Encode every item once (main process), reuse an existing complete cache, free the encoders."""
    captions = [full_caption(it.caption, trigger) for it in items]
    prompts = [full_caption(p, None) for p in sample_prompts]
    fp = fingerprint(src, items, captions, resolution, buckets, random_flip, max_sequence_length, prompts)
    cache_dir = root / fp
    sizes_all = bucket_sizes(resolution, buckets)
    done = cache_dir / "index.json"
    if is_main and not done.exists():
        _encode(
            cache_dir, src, items, captions, prompts, sizes_all, random_flip, max_sequence_length, device, text_dtype
        )
    if wait is not None:
        wait()
    index = json.loads(done.read_text())
    return Cache(
        dir=cache_dir,
        sizes=[tuple(s) for s in index["sizes"]],  # type: ignore[misc]
        captions=index["captions"],
        has_flip=index["flip"],
        extra=load_file(str(cache_dir / "extra.safetensors")),
    )


def _encode(
    cache_dir: Path,
    src: ModelSource,
    items: list[Item],
    captions: list[str],
    prompts: list[str],
    sizes_all: list[tuple[int, int]],
    random_flip: bool,
    max_len: int,
    device: torch.device,
    text_dtype: torch.dtype,
    force_cpu_loading: bool = False,
) -> None:
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    # 1. Text encoder: every distinct caption, the empty prompt, the sample prompts. Then free it.
    load_on = None if force_cpu_loading else device
    text_encoder, tokenizer = load_text_encoder(src, text_dtype, load_on)
    text_encoder.to(device)
    unique = sorted(set(captions) | set(prompts) | {""})
    embeds: dict[str, torch.Tensor] = {}
    for j in tqdm(range(0, len(unique), TEXT_BATCH), desc="cache: prompts", unit="batch", leave=False):
        chunk = unique[j : j + TEXT_BATCH]
        out = encode_prompts(src.family, text_encoder, tokenizer, chunk, src.text_layers, max_len)
        for text, e in zip(chunk, out, strict=True):
            embeds[text] = e.to("cpu").contiguous()
    free(text_encoder)
    del text_encoder, tokenizer

    # 2. VAE: each image at its bucket size (and flipped when asked). Then free it.
    vae = load_vae(src, device=load_on).to(device)
    sizes: list[tuple[int, int]] = []
    for i, (it, cap) in enumerate(
        tqdm(list(zip(items, captions, strict=True)), desc="cache: latents", unit="img", leave=False)
    ):
        image = load_image(it.image)
        size = nearest_bucket(image.width, image.height, sizes_all)
        pixels = to_tensor(resize_to_bucket(image, size)).unsqueeze(0)
        tensors = {"latents": encode_images(vae, pixels)[0].to("cpu").contiguous(), "prompt_embeds": embeds[cap]}
        if random_flip:
            tensors["latents_flip"] = encode_images(vae, pixels.flip(-1))[0].to("cpu").contiguous()
        save_file(tensors, str(tmp / f"{i}.safetensors"))
        sizes.append(size)
    free(vae)
    del vae

    extra = {"empty": embeds[""]}
    extra.update({f"prompt.{j}": embeds[p] for j, p in enumerate(prompts)})
    save_file(extra, str(tmp / "extra.safetensors"))
    (tmp / "index.json").write_text(json.dumps({"sizes": sizes, "captions": captions, "flip": random_flip}))
    shutil.rmtree(cache_dir, ignore_errors=True)
    os.replace(tmp, cache_dir)
