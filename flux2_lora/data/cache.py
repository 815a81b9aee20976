"""The cache stage: the text encoder and the VAE run once over the dataset, then are freed.

Output is a cache folder of webdataset shards that training reads as its one data path (its layout and index.json:
`cache_index`; its checks against index.json on every open: `cache_check`). The settings (model, text layers,
sequence length, resolution, buckets, flips, holdout, text encoder quantization) are stored and checked: a cache made
with other settings is refused with the difference named, never silently reused. Pass 1 runs the text encoder over
the distinct captions (embeddings spill to a temp folder, so memory stays flat; with caption shuffle or tag dropout,
over the K caption variants of each caption: `captions`); pass 2 runs the VAE over the images and writes the shards.

The text encoder (24 B for FLUX.2-dev) runs where `model.text_encoder_device` says: `auto` takes the GPU when its
weights and a margin fit in the free memory (sizes read from the safetensors headers, nothing loaded), else the CPU.
Where it ran is not part of the cache settings (the same weights at the same dtype give the same embeddings up to
kernel rounding); `model.text_encoder_quantize` is, because int8/nf4 weights change the embeddings (by ~1% here).

The public names of `cache_index` and `cache_check` are re-exported here, so `from flux2_lora.data.cache import
read_index, CacheIndex, ...` keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save, save_file
from tqdm.auto import tqdm

from ..flow import encode_images, encode_prompts, reference_pixels
from ..memory import TEXT_BATCH, GiB, text_encoder_bytes
from ..model import ModelError, ModelSource, free, load_text_encoder, load_vae
from ..quant import check_quantize
from ..sources import Source, resolve_sources
from .buckets import MULTIPLE, bucket_sizes, nearest_bucket, resize_to_bucket, to_tensor
from .cache_check import CacheProblem, audit_cache, check_cache, read_index
from .cache_index import (
    CACHE_VERSION,
    SETTING_DEFAULTS,
    CacheCorrupt,
    CacheIndex,
    CacheSettings,
    SampleEntry,
    SampleTable,
    ShardInfo,
    _reason,
    check_settings,
    decode_cached,
    is_run_cache,
    member_offsets,
    read_cached_shard,
    read_index_json,
    rebuild_hint,
)
from .captions import TagRules, caption_settings, caption_variants, cost_line, embedding_width
from .folder import DataError
from .shards import CACHE_MEMBERS, RawSample, iter_tar, open_image

__all__ = [  # this module's names and those re-exported from cache_index and cache_check
    "CACHE_VERSION",
    "SETTING_DEFAULTS",
    "CacheCorrupt",
    "CacheIndex",
    "CacheProblem",
    "CacheSettings",
    "SampleEntry",
    "SampleTable",
    "ShardInfo",
    "audit_cache",
    "build_cache",
    "check_cache",
    "check_settings",
    "dataset_source",
    "decode_cached",
    "full_caption",
    "gpu_free_bytes",
    "is_run_cache",
    "member_offsets",
    "open_text_encoder",
    "place_text_encoder",
    "prompt_embeddings",
    "read_cached_shard",
    "read_index",
    "read_index_json",
    "rebuild_hint",
    "settings_for",
]

log = logging.getLogger(__name__)


def full_caption(caption: str, trigger: str | None) -> str:
    """Caption with the trigger word in front (once)."""
    if not trigger or caption.split(" ", 1)[0] == trigger:
        return caption
    return f"{trigger} {caption}".strip()


def settings_for(
    src: ModelSource, recipe: Any, source: Source | None = None, resolution: int | None = None
) -> CacheSettings:
    """The settings of one cache entry: `source` (default: the recipe's first) at `resolution` (its first)."""
    d = recipe.data
    if source is None:
        sources = resolve_sources(d)
        source = sources[0] if sources else None
    res = resolution or (source.resolutions[0] if source is not None else d.resolution)
    return CacheSettings(
        model=str(src.path.resolve()),
        family=src.family,
        text_layers=tuple(src.text_layers),
        max_sequence_length=recipe.model.max_sequence_length,
        resolution=res,
        buckets=tuple(bucket_sizes(res, d.buckets, d.bucket_aspects)),
        random_flip=d.random_flip,
        trigger=(source.trigger if source is not None else d.trigger) or "",
        holdout=source.holdout if source is not None else d.holdout,
        seed=recipe.training.seed,
        text_encoder_quantize=getattr(recipe.model, "text_encoder_quantize", "none"),
        max_reference_pixels=d.max_reference_pixels,
        **caption_settings(d),  # caption_shuffle, keep_tokens, tag_dropout, caption_variants (data/captions.py)
    )


def dataset_source(
    spec: str, instance_prompt: str | None, mask_dir: str | None = None
) -> tuple[Callable[[], Iterator[RawSample]], str]:
    """(samples, source id) for a folder or raw-shard spec; the id changes when any file does (a loss mask too:
    beside its image, or in mask_dir, data/masks.py)."""
    from .folder import scan_folder
    from .sample import resolve_dataset
    from .shards import expand_spec, is_shard_spec, iter_folder_samples, iter_raw_samples

    if is_shard_spec(spec):
        if mask_dir is not None:
            raise DataError(f"{mask_dir}: a mask folder for raw shards {spec}; their masks are <key>.mask.png members")
        stats = []
        for u in expand_spec(spec):  # local shards by size and mtime, remote ones by URL
            p = Path(u)
            stats.append(f"{u}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else u)
        return (lambda: iter_raw_samples(spec, instance_prompt)), json.dumps([spec, stats])
    root = resolve_dataset(spec)
    items = scan_folder(root, instance_prompt, mask_dir)
    ident = json.dumps(
        [[*_stat(i.image), i.caption, *map(_stat, i.references), *([["mask", *_stat(i.mask)]] if i.mask else [])]
         for i in items]
    )  # fmt: skip
    return (lambda: iter_folder_samples(items, root)), ident


def _stat(path: Path) -> list[Any]:
    """A file's identity for the cache key: path, size and modification time (a changed reference too)."""
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def gpu_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device in bytes, as the driver reports it (tests replace this)."""
    return int(torch.cuda.mem_get_info(device)[0])


def place_text_encoder(
    choice: str, src: ModelSource, device: torch.device, dtype: torch.dtype, quantize: str, tokens: int
) -> torch.device:
    """Where the cache stage runs the text encoder (`model.text_encoder_device`), decided before anything loads.

    `auto` on a GPU: the GPU when weights x 1.05 + activations of one batch (memory.text_encoder_bytes) + 1 GiB fit
    in its free memory, else the CPU (one warning line). nf4 runs only on a GPU. Without a GPU: the CPU."""
    if device.type != "cuda":
        if choice == "gpu":
            raise ModelError("model.text_encoder_device: gpu, but there is no CUDA GPU here; use auto or cpu")
        return device
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "gpu" and quantize != "nf4":
        return device
    weights, act = text_encoder_bytes(src.path / "text_encoder", dtype.itemsize, quantize, TEXT_BATCH, tokens)
    need, free_now = 1.05 * weights + act + GiB, gpu_free_bytes(device)
    if need <= free_now or choice == "gpu":
        return device
    kind = f"{quantize} linears" if quantize != "none" else str(dtype).removeprefix("torch.")
    why = (
        f"the text encoder needs ~{need / GiB:.1f} GiB ({weights / GiB:.1f} GiB of {kind} weights, activations and "
        f"a reserve), the GPU has {free_now / GiB:.1f} GiB free"
    )
    if quantize == "nf4":  # bitsandbytes 4-bit runs only on the GPU: try there
        log.warning("model.text_encoder_quantize: nf4 runs on the GPU although %s; it may run out of memory", why)
        return device
    hint = "model.text_encoder_quantize: int8 or nf4 may keep it on the GPU" if quantize == "none" else "nf4 is smaller"
    log.warning("model.text_encoder_device: auto: %s, so it runs on the CPU (slow; %s)", why, hint)
    return torch.device("cpu")


def open_text_encoder(
    src: ModelSource,
    dtype: torch.dtype,
    run_on: torch.device,
    quantize: str = "none",
    force_cpu_loading: bool = False,
) -> tuple[Any, Any]:
    """The text encoder and tokenizer on `run_on`, quantized while loading (nf4 loads straight onto the GPU)."""
    load_on = run_on if quantize == "nf4" or not force_cpu_loading else torch.device("cpu")
    text_encoder, tokenizer = load_text_encoder(src, dtype, None if load_on.type == "cpu" else load_on, quantize)
    if quantize != "nf4":  # bitsandbytes models cannot be moved, and are already there
        text_encoder.to(run_on)
    return text_encoder, tokenizer


def build_cache(
    out: Path,
    settings: CacheSettings,
    samples: Callable[[], Iterator[RawSample]],
    device: torch.device,
    text_dtype: torch.dtype,
    shard_size: int = 1000,
    force_cpu_loading: bool = False,
    text_encoder_device: str = "auto",
) -> CacheIndex:
    """Encode every sample once into cached shards under `out` (written to out.tmp, then renamed).

    `samples` is called twice (pass 1: captions, pass 2: images) and must yield the same order both times.
    The text encoder runs where `text_encoder_device` (auto | gpu | cpu) places it, quantized as the settings say.
    """
    if (out / "index.json").exists():
        index = read_index(out)
        check_settings(index, settings)
        return index
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "embeds").mkdir(parents=True)
    src = ModelSource(Path(settings.model), settings.family, settings.text_layers, "")
    load_on = None if force_cpu_loading else device
    # Placement and quantization are decided (and refused in one line) before anything is read or loaded.
    quantize = settings.text_encoder_quantize
    text_on = place_text_encoder(text_encoder_device, src, device, text_dtype, quantize, settings.max_sequence_length)
    check_quantize(quantize, text_on, "model.text_encoder_quantize")

    # Pass 1: keys and captions (K variants of each with caption shuffle / tag dropout: data/captions.py); the
    # text encoder embeds each distinct caption once (spilled to disk).
    keys: list[str] = []
    masked = False
    captions: dict[str, list[str]] = {}  # per sample: its caption variants, trigger first (one without shuffling)
    count, rules = settings.caption_variants, TagRules.of(settings)
    for s in tqdm(samples(), desc="cache: scan", unit="img", leave=False):
        if s.key in captions:
            raise DataError(f"{s.key}: duplicate sample key in the dataset")
        keys.append(s.key)
        masked = masked or s.mask is not None  # then every sample gets a loss mask (ones without a file)
        captions[s.key] = caption_variants(s.caption, settings.trigger or None, rules, settings.seed, s.key, count)
    if not keys:
        raise DataError("dataset: no samples")
    unique = sorted({c for variants in captions.values() for c in variants} | {""})
    width = embedding_width(src.path) if count > 1 else None
    if width:  # what the variants cost, before the (long) encoding starts
        layers = len(settings.text_layers)
        tqdm.write(cost_line(count, settings.max_sequence_length, width, layers, text_dtype.itemsize, len(keys)))
    same = sum(len(set(variants)) == 1 for variants in captions.values()) if count > 1 else 0
    if same:
        log.warning(
            "data.caption_shuffle / data.tag_dropout: %d of %d captions have a single variant (one tag, or all kept "
            "by data.keep_tokens: tags are separated by commas); their %d cached variants are the same caption",
            same, len(keys), count,
        )  # fmt: skip
    text_encoder, tokenizer = open_text_encoder(src, text_dtype, text_on, quantize, force_cpu_loading)
    for j in tqdm(range(0, len(unique), TEXT_BATCH), desc="cache: prompts", unit="batch", leave=False):
        chunk = unique[j : j + TEXT_BATCH]
        out_emb = encode_prompts(
            src.family, text_encoder, tokenizer, chunk, src.text_layers, settings.max_sequence_length
        )
        for text, e in zip(chunk, out_emb, strict=True):
            save_file({"prompt_embeds": e.to("cpu").contiguous()}, str(tmp / "embeds" / f"{_h(text)}.safetensors"))
    free(text_encoder)
    del text_encoder, tokenizer
    save_file(
        {"empty": load_file(str(tmp / "embeds" / f"{_h('')}.safetensors"))["prompt_embeds"]},
        str(tmp / "extra.safetensors"),
    )

    # Held-out keys: a seeded choice over the sorted keys (independent of source order).
    holdout = (
        set(random.Random(settings.seed).sample(sorted(keys), settings.holdout))
        if 0 < settings.holdout < len(keys)
        else set()
    )

    # Pass 2: the VAE encodes every image at its bucket; samples go to train or val shards.
    vae = load_vae(src, device=load_on).to(device)
    writers = {"train": _ShardWriter(tmp, "train", shard_size), "val": _ShardWriter(tmp, "val", shard_size)}
    sizes = list(settings.buckets)
    for s in tqdm(samples(), total=len(keys), desc="cache: latents", unit="img", leave=False):
        image = open_image(s.image, name=s.key)
        bucket = nearest_bucket(image.width, image.height, sizes)
        pixels = to_tensor(resize_to_bucket(image, bucket)).unsqueeze(0)
        tensors = {
            "latents": encode_images(vae, pixels)[0].to("cpu").contiguous(),
            **{  # one embedding, or variants prompt_embeds.0 .. prompt_embeds.{K-1}
                "prompt_embeds" if count == 1 else f"prompt_embeds.{k}": load_file(
                    str(tmp / "embeds" / f"{_h(text)}.safetensors")
                )["prompt_embeds"]
                for k, text in enumerate(captions[s.key])
            },
        }
        if settings.random_flip:
            tensors["latents_flip"] = encode_images(vae, pixels.flip(-1))[0].to("cpu").contiguous()
        if masked:
            tensors.update(_mask_tensors(s, bucket, image.size, settings.random_flip))
        meta: dict[str, Any] = {"bucket": list(bucket), "caption": captions[s.key][0]}
        if count > 1:  # every variant's text (the caption above is variant 0, validation's)
            meta["captions"] = captions[s.key]
        sizes_of_refs = []
        for n, ((data, _), name) in enumerate(zip(s.references, _names(s), strict=True)):
            # Encoded as the pipeline encodes an `image=` input; flipped with the target when it is flipped.
            ref = reference_pixels(open_image(data, name=name), settings.max_reference_pixels)
            tensors[f"ref.{n}"] = encode_images(vae, ref)[0].to("cpu").contiguous()
            if settings.random_flip:
                tensors[f"ref_flip.{n}"] = encode_images(vae, ref.flip(-1))[0].to("cpu").contiguous()
            sizes_of_refs.append((ref.shape[-1], ref.shape[-2]))
        if s.references:
            meta["references"] = [list(r) for r in sizes_of_refs]
        writers["val" if s.key in holdout else "train"].write(s.key, tensors, meta, bucket, tuple(sizes_of_refs))
    free(vae)
    del vae
    editing = any(any(w.refs) for w in writers.values())  # rows carry reference sizes only in an editing cache
    shards = {k: w.close(editing) for k, w in writers.items()}
    if not shards["val"]:  # no holdout: validate on (up to 4 of) the training samples
        first = shards["train"][0]
        _copy_first(tmp / first.url, tmp / "val-000000.tar", 4)
        refs = first.references[:4] if first.references is not None else None
        shards["val"] = [ShardInfo("val-000000.tar", first.samples[:4], None, refs)]
    shutil.rmtree(tmp / "embeds")
    index_json = {
        "version": CACHE_VERSION,
        "settings": settings.to_json(),
        "train": [_index_entry(tmp, i) for i in shards["train"]],
        "val": [_index_entry(tmp, i) for i in shards["val"]],
    }
    (tmp / "index.json").write_text(json.dumps(index_json))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return read_index(out)


def prompt_embeddings(
    index: CacheIndex,
    prompts: list[str],
    device: torch.device,
    text_dtype: torch.dtype,
    force_cpu_loading: bool = False,
    text_encoder_device: str = "auto",
) -> list[torch.Tensor]:
    """Embeddings of the sample prompts, computed once per prompt list and kept in the cache folder.

    The text encoder is quantized as the cache's settings say (the same encoder as the cached captions)."""
    if not prompts:
        return []
    path = index.root / f"prompts-{_h(json.dumps(prompts))[:16]}.safetensors"
    if not path.exists():
        st = index.settings
        src = ModelSource(Path(st["model"]), st["family"], tuple(st["text_layers"]), "")
        quantize = st.get("text_encoder_quantize", SETTING_DEFAULTS["text_encoder_quantize"])
        text_on = place_text_encoder(text_encoder_device, src, device, text_dtype, quantize, st["max_sequence_length"])
        check_quantize(quantize, text_on, "model.text_encoder_quantize")
        text_encoder, tokenizer = open_text_encoder(src, text_dtype, text_on, quantize, force_cpu_loading)
        emb = encode_prompts(src.family, text_encoder, tokenizer, prompts, src.text_layers, st["max_sequence_length"])
        free(text_encoder)
        tmp = path.with_name("." + path.name)
        save_file({f"prompt.{j}": e.to("cpu").contiguous() for j, e in enumerate(emb)}, str(tmp))
        os.replace(tmp, path)
    try:
        t = load_file(str(path))
        return [t[f"prompt.{j}"] for j in range(len(prompts))]
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, or another list's file: one line naming it
        why = f"has no tensor {e}" if isinstance(e, KeyError) else f"cannot be read ({_reason(e)})"
        raise DataError(
            f"{path}: corrupt sample-prompt embeddings: {why}; delete this file and the next run computes it again"
        ) from None


def _index_entry(root: Path, info: ShardInfo) -> dict[str, Any]:
    """A shard's entry in index.json: each sample as [key, bucket w, bucket h, data offset, size], and in an editing
    cache (any sample with references) also its reference sizes [[w, h], ...]."""
    offsets = member_offsets(root / info.url, info.samples)
    rows = [[*x, *o] for x, o in zip(info.samples, offsets, strict=True)]
    if info.references is not None:
        rows = [[*row, [list(r) for r in refs]] for row, refs in zip(rows, info.references, strict=True)]
    return {"url": info.url, "samples": rows}


def _mask_tensors(s: RawSample, bucket: tuple[int, int], size: tuple[int, int], flip: bool) -> dict[str, torch.Tensor]:
    """A sample's loss mask at the latent grid (data/masks.py): resized into the bucket as its image, then averaged
    per 16x16 block; `mask_flip` flipped as latents_flip is. Ones for a sample without a mask."""
    from .masks import is_black, latent_weights, open_mask

    if s.mask is None:
        weights = torch.ones(bucket[1] // MULTIPLE, bucket[0] // MULTIPLE)
    else:
        name = s.mask_name or f"{s.key} mask"
        mask = open_mask(s.mask, name)
        if mask.size != size:
            w, h = mask.size
            raise DataError(
                f"{name}: mask is {w}x{h}, its image {size[0]}x{size[1]} (a mask must have its image's size)"
            )
        if is_black(mask):
            raise DataError(f"{name}: mask is all black: nothing of its image would train (white = train)")
        weights = latent_weights(mask, bucket)
        if float(weights.max()) <= 0:
            log.warning("%s: its white part lies outside the %dx%d crop of its image: it trains nothing", name, *bucket)
    out = {"mask": weights.contiguous()}
    if flip:
        out["mask_flip"] = weights.flip(-1).contiguous()
    return out


def _names(s: RawSample) -> tuple[str, ...]:
    """Where each reference of a sample came from (for messages)."""
    return s.reference_names or tuple(f"{s.key} reference {n}" for n in range(len(s.references)))


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _copy_first(src: Path, dst: Path, n: int) -> None:
    import webdataset as wds

    with wds.TarWriter(str(dst)) as w:
        for k, s in enumerate(iter_tar(str(src), CACHE_MEMBERS)):
            if k >= n:
                break
            w.write({key: v for key, v in s.items() if key in ("__key__", "safetensors", "json")})


class _ShardWriter:
    """Writes `<prefix>-NNNNNN.tar` cached shards of `size` samples and remembers their index entries."""

    def __init__(self, root: Path, prefix: str, size: int):
        self.root, self.prefix, self.size = root, prefix, size
        self.infos: list[ShardInfo] = []
        self.writer: Any = None
        self.refs: list[tuple[tuple[int, int], ...]] = []  # every sample's reference sizes, in write order

    def write(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        bucket: tuple[int, int],
        references: tuple[tuple[int, int], ...] = (),
    ) -> None:
        import webdataset as wds

        if self.writer is None or len(self.infos[-1].samples) >= self.size:
            if self.writer is not None:
                self.writer.close()
            name = f"{self.prefix}-{len(self.infos):06d}.tar"
            self.infos.append(ShardInfo(name, []))
            self.writer = wds.TarWriter(str(self.root / name))
        self.writer.write({"__key__": key, "safetensors": save(tensors), "json": json.dumps(meta).encode()})
        self.infos[-1].samples.append((key, bucket[0], bucket[1]))
        self.refs.append(references)

    def close(self, editing: bool) -> list[ShardInfo]:
        """The shards written; in an editing cache each with its samples' reference sizes."""
        if self.writer is not None:
            self.writer.close()
        if editing:
            start = 0
            for info in self.infos:
                info.references = self.refs[start : start + len(info.samples)]
                start += len(info.samples)
        return self.infos
