"""The cache stage: the text encoder and the VAE run once over the dataset, then are freed.

Output is a folder of webdataset shards that training reads as its one data path:

  index.json              settings the cache was made with + every shard's samples (key, bucket, and the byte
                          offset and size of the sample's tensors in its shard: training reads by position)
  train-NNNNNN.tar        samples: <key>.safetensors (latents, [latents_flip], prompt_embeds) + <key>.json
  val-NNNNNN.tar          the held-out samples for the fixed-seed validation loss
  extra.safetensors       the empty-prompt embedding (caption dropout, negative prompt)
  prompts-<hash>.safetensors  sample-prompt embeddings for one list of validation prompts

The settings (model, text layers, sequence length, resolution, buckets, flips, holdout, text encoder quantization)
are stored and checked: a cache made with other settings is refused with the difference named, never silently reused.
Pass 1 runs the text encoder over the distinct captions (embeddings spill to a temp folder, so memory
stays flat); pass 2 runs the VAE over the images and writes the shards.

The text encoder (24 B for FLUX.2-dev) runs where `model.text_encoder_device` says: `auto` takes the GPU when its
weights and a margin fit in the free memory (sizes read from the safetensors headers, nothing loaded), else the CPU.
Where it ran is not part of the cache settings (the same weights at the same dtype give the same embeddings up to
kernel rounding); `model.text_encoder_quantize` is, because int8/nf4 weights change the embeddings (by ~1% here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save, save_file
from tqdm.auto import tqdm

from ..flow import encode_images, encode_prompts
from ..memory import TEXT_BATCH, GiB, text_encoder_bytes
from ..model import ModelError, ModelSource, free, load_text_encoder, load_vae
from ..quant import check_quantize
from .buckets import bucket_sizes, nearest_bucket, resize_to_bucket, to_tensor
from .folder import DataError
from .shards import CACHE_MEMBERS, RawSample, iter_tar, open_image

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Settings added after version 1, with the value that caches made before them were made with. A setting at its
# default is left out of index.json, so those caches keep their digest and stay valid.
SETTING_DEFAULTS: dict[str, Any] = {"text_encoder_quantize": "none"}


def full_caption(caption: str, trigger: str | None) -> str:
    """Caption with the trigger word in front (once)."""
    if not trigger or caption.split(" ", 1)[0] == trigger:
        return caption
    return f"{trigger} {caption}".strip()


@dataclass(frozen=True)
class CacheSettings:
    """Everything that changes what is in the cache. Stored in index.json and compared on use."""

    model: str
    family: str
    text_layers: tuple[int, ...]
    max_sequence_length: int
    resolution: int
    buckets: tuple[tuple[int, int], ...]
    random_flip: bool
    trigger: str
    holdout: int
    seed: int
    text_encoder_quantize: str = "none"  # none | int8 | nf4: quantized weights change the embeddings

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["text_layers"] = list(self.text_layers)
        d["buckets"] = [list(b) for b in self.buckets]
        return {k: v for k, v in d.items() if k not in SETTING_DEFAULTS or v != SETTING_DEFAULTS[k]}

    def digest(self, source: str) -> str:
        return hashlib.sha256(json.dumps([self.to_json(), source], sort_keys=True).encode()).hexdigest()[:16]


def settings_for(src: ModelSource, recipe: Any) -> CacheSettings:
    d = recipe.data
    return CacheSettings(
        model=str(src.path.resolve()),
        family=src.family,
        text_layers=tuple(src.text_layers),
        max_sequence_length=recipe.model.max_sequence_length,
        resolution=d.resolution,
        buckets=tuple(bucket_sizes(d.resolution, d.buckets, d.bucket_aspects)),
        random_flip=d.random_flip,
        trigger=d.trigger or "",
        holdout=d.holdout,
        seed=recipe.training.seed,
        text_encoder_quantize=getattr(recipe.model, "text_encoder_quantize", "none"),
    )


@dataclass
class ShardInfo:
    url: str
    samples: list[tuple[str, int, int]]  # key, bucket width, bucket height
    # Where each sample's <key>.safetensors member lies in the tar: (byte offset of its data, size in bytes).
    offsets: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class SampleEntry:
    """One cached training sample, addressable without reading its shard: `size` bytes at `offset` of `url`."""

    url: str
    key: str
    bucket: tuple[int, int]
    offset: int
    size: int


class SampleTable:
    """Every training sample of a cache as compact arrays (a million samples take tens of MB, not a list of
    objects per sample); `table[i]` is sample i's SampleEntry."""

    def __init__(self, shards: list[ShardInfo], root: Path):
        self.urls = [s.url for s in shards]
        self.keys: list[str] = []
        self.buckets: list[tuple[int, int]] = []  # distinct bucket sizes; `bucket` indexes them
        shard, bucket, offset, size = [], [], [], []
        ids: dict[tuple[int, int], int] = {}
        for j, info in enumerate(shards):
            offsets = info.offsets if info.offsets is not None else member_offsets(root / info.url, info.samples)
            for (key, w, h), (o, n) in zip(info.samples, offsets, strict=True):
                if (w, h) not in ids:
                    ids[(w, h)] = len(self.buckets)
                    self.buckets.append((w, h))
                self.keys.append(key)
                shard.append(j)
                bucket.append(ids[(w, h)])
                offset.append(o)
                size.append(n)
        self.shard = np.asarray(shard, dtype=np.int32)
        self.bucket = np.asarray(bucket, dtype=np.int32)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> SampleEntry:
        return SampleEntry(
            self.urls[self.shard[i]], self.keys[i], self.buckets[self.bucket[i]], int(self.offset[i]), int(self.size[i])
        )

    def __iter__(self) -> Iterator[SampleEntry]:
        return (self[i] for i in range(len(self)))


@dataclass
class CacheIndex:
    root: Path
    settings: dict[str, Any]
    train: list[ShardInfo]
    val: list[ShardInfo]
    _table: SampleTable | None = field(default=None, repr=False, compare=False)

    @property
    def num_train(self) -> int:
        return sum(len(s.samples) for s in self.train)

    def samples(self) -> SampleTable:
        """Every training sample in index order, with its member offset (found from the tar headers for caches
        made before offsets were recorded). Built once per index."""
        if self._table is None:
            self._table = SampleTable(self.train, self.root)
        return self._table

    def extra(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / "extra.safetensors"))

    def val_samples(self) -> list[dict[str, Any]]:
        return [s for info in self.val for s in read_cached_shard(str(self.root / info.url))]


def read_index(root: Path) -> CacheIndex:
    path = root / "index.json"
    if not path.exists():
        raise DataError(f"{root}: not a flux2-lora cache (no index.json); make one with `flux2-lora data cache`")
    d = json.loads(path.read_text())
    if d.get("version") != CACHE_VERSION:
        raise DataError(f"{path}: cache version {d.get('version')} is not {CACHE_VERSION}; rebuild it")

    def infos(key: str) -> list[ShardInfo]:
        return [
            ShardInfo(
                s["url"],
                [(str(x[0]), int(x[1]), int(x[2])) for x in s["samples"]],
                [(int(x[3]), int(x[4])) for x in s["samples"]] if all(len(x) == 5 for x in s["samples"]) else None,
            )
            for s in d[key]
        ]

    return CacheIndex(root=root, settings=d["settings"], train=infos("train"), val=infos("val"))


def check_settings(index: CacheIndex, expected: CacheSettings) -> None:
    """Refuse a cache made with other settings, naming what differs."""
    want, have = SETTING_DEFAULTS | expected.to_json(), SETTING_DEFAULTS | index.settings
    diff = [f"{k}: cache has {have.get(k)!r}, recipe wants {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise DataError(f"{index.root}: stale cache ({'; '.join(diff)}); rebuild it with `flux2-lora data cache`")


def member_offsets(path: Path, samples: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """(data offset, size) of each sample's `<key>.safetensors` member, read from the tar headers only."""
    import tarfile

    found: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".safetensors"):
                    found[m.name[: -len(".safetensors")]] = (m.offset_data, m.size)
    except (OSError, tarfile.TarError) as e:
        raise DataError(
            f"{path}: cannot read cached shard ({e}); rebuild the cache with `flux2-lora data cache`"
        ) from None
    missing = [k for k, _, _ in samples if k not in found]
    if missing:
        raise DataError(
            f"{path}: sample {missing[0]!r} of the index is not in the shard; rebuild the cache with `flux2-lora data cache`"
        )
    return [found[k] for k, _, _ in samples]


def decode_cached(sample: dict[str, Any]) -> dict[str, Any]:
    """A cached-shard sample -> {'key', 'bucket', 'caption', 'latents', 'prompt_embeds', ['latents_flip']}."""
    from safetensors.torch import load

    tensors = load(sample["safetensors"])
    meta = json.loads(sample["json"])
    return {"key": sample["__key__"], "bucket": tuple(meta["bucket"]), "caption": meta["caption"], **tensors}


def read_cached_shard(url: str) -> Iterator[dict[str, Any]]:
    for s in iter_tar(url, CACHE_MEMBERS):
        yield decode_cached(s)


def dataset_source(spec: str, instance_prompt: str | None) -> tuple[Callable[[], Iterator[RawSample]], str]:
    """(samples, source id) for a folder or raw-shard spec; the id changes when any file does."""
    from .folder import scan_folder
    from .sample import resolve_dataset
    from .shards import expand_spec, is_shard_spec, iter_folder_samples, iter_raw_samples

    if is_shard_spec(spec):
        stats = []
        for u in expand_spec(spec):  # local shards by size and mtime, remote ones by URL
            p = Path(u)
            stats.append(f"{u}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else u)
        return (lambda: iter_raw_samples(spec, instance_prompt)), json.dumps([spec, stats])
    root = resolve_dataset(spec)
    items = scan_folder(root, instance_prompt)
    ident = json.dumps([[str(i.image), i.image.stat().st_size, i.image.stat().st_mtime_ns, i.caption] for i in items])
    return (lambda: iter_folder_samples(items, root)), ident


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

    # Pass 1: keys and captions; the text encoder embeds each distinct caption once (spilled to disk).
    keys: list[str] = []
    captions: dict[str, str] = {}
    for s in tqdm(samples(), desc="cache: scan", unit="img", leave=False):
        if s.key in captions:
            raise DataError(f"{s.key}: duplicate sample key in the dataset")
        keys.append(s.key)
        captions[s.key] = full_caption(s.caption, settings.trigger or None)
    if not keys:
        raise DataError("dataset: no samples")
    unique = sorted(set(captions.values()) | {""})
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
            "prompt_embeds": load_file(str(tmp / "embeds" / f"{_h(captions[s.key])}.safetensors"))["prompt_embeds"],
        }
        if settings.random_flip:
            tensors["latents_flip"] = encode_images(vae, pixels.flip(-1))[0].to("cpu").contiguous()
        meta = {"bucket": list(bucket), "caption": captions[s.key]}
        writers["val" if s.key in holdout else "train"].write(s.key, tensors, meta, bucket)
    free(vae)
    del vae
    shards = {k: w.close() for k, w in writers.items()}
    if not shards["val"]:  # no holdout: validate on (up to 4 of) the training samples
        first = shards["train"][0]
        _copy_first(tmp / first.url, tmp / "val-000000.tar", 4)
        shards["val"] = [ShardInfo("val-000000.tar", first.samples[:4])]
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
    t = load_file(str(path))
    return [t[f"prompt.{j}"] for j in range(len(prompts))]


def _index_entry(root: Path, info: ShardInfo) -> dict[str, Any]:
    """A shard's entry in index.json: each sample as [key, bucket w, bucket h, data offset, size]."""
    offsets = member_offsets(root / info.url, info.samples)
    return {"url": info.url, "samples": [[*x, *o] for x, o in zip(info.samples, offsets, strict=True)]}


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

    def write(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], bucket: tuple[int, int]) -> None:
        import webdataset as wds

        if self.writer is None or len(self.infos[-1].samples) >= self.size:
            if self.writer is not None:
                self.writer.close()
            name = f"{self.prefix}-{len(self.infos):06d}.tar"
            self.infos.append(ShardInfo(name, []))
            self.writer = wds.TarWriter(str(self.root / name))
        self.writer.write({"__key__": key, "safetensors": save(tensors), "json": json.dumps(meta).encode()})
        self.infos[-1].samples.append((key, bucket[0], bucket[1]))

    def close(self) -> list[ShardInfo]:
        if self.writer is not None:
            self.writer.close()
        return self.infos
