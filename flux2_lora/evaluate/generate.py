"""Generate with a FLUX.2 base model and one LoRA at a time, loaded through diffusers' `load_lora_weights`.

The order keeps memory low, as training does: every prompt is encoded first (the text encoder is then
freed), then the transformer and VAE load once and each LoRA is swapped in and out of the same pipeline.
Seeds fix the noise: a column (prompt, seed) starts from the same noise for every checkpoint. A prompt with
reference images (an edit) is generated with `image=[...]`, at the evaluation size.

LoRA files are checked before diffusers sees them: only `.safetensors` is read (a pickle is never opened),
the header's `flux2_lora.family` must match the model, and every `transformer.*.lora_A/B` tensor must fit the
layer it adapts, so a LoRA for another model fails with one line that names the file and the tensor.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..checkpoint import LORA_FILE, METADATA_PREFIX, CheckpointError, list_checkpoints
from ..config import ModelArgs, Recipe
from ..data.cache import CacheIndex
from ..model import DTYPES, ModelError, ModelSource, resolve_model
from ..references import open_reference
from ..resources import LORA_EMA_FILE
from . import EvalError

log = logging.getLogger(__name__)

ADAPTER = "flux2_lora_eval"  # not a torch.nn.Module attribute name (e.g. "eval" clashes)


# ---------------------------------------------------------------------------------------------
# LoRA files
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraRef:
    """A LoRA file to evaluate, with its header and, when it came from a training run, that run's folder."""

    path: Path
    label: str
    metadata: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    step: int | None = None
    run: Path | None = None
    what: str = "CKPT"

    def meta(self, key: str) -> str | None:
        return self.metadata.get(METADATA_PREFIX + key) or None

    @property
    def family(self) -> str | None:
        return self.meta("family")

    @property
    def is_ema(self) -> bool:
        """The EMA of a run's LoRA (lora_ema.safetensors, training.ema_decay), not the LoRA itself."""
        return self.meta("weights") == "ema"

    @property
    def base_model(self) -> str | None:
        return self.meta("base_model")

    @property
    def trigger(self) -> str | None:
        return self.meta("trigger")


def resolve_lora(spec: str | Path, what: str = "CKPT") -> LoraRef:
    """A LoRA from a `.safetensors` file or a checkpoint folder holding `lora.safetensors`."""
    from ..interop.layouts import scan_lora_file
    from ..safety import require_safetensors

    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what}: {spec} does not exist")
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            path = path / LORA_FILE
        elif (path / "checkpoints").is_dir():
            raise CheckpointError(f"{what}: {spec} is a training run folder; pass --run {spec} to take its checkpoints")
        else:
            raise CheckpointError(f"{what}: {spec} is a folder without {LORA_FILE}")
    require_safetensors(path, what)  # by extension and first bytes, never unpickled
    # Through the interop reader: a damaged file, NaN/inf tensors or a non-finite alpha are refused in one line.
    metadata, _, shapes = scan_lora_file(path, what, keep=False)
    if not any("lora" in k or ".lokr_" in k or ".hada_" in k for k in shapes):
        raise CheckpointError(f"{what}: {path} holds no LoRA tensors (no lora_A/lora_B, LoKr or LoHa keys)")
    run: Path | None = None
    step: int | None = None
    if path.parent.parent.name == "checkpoints":
        run = path.parent.parent.parent
        try:
            step = int(path.parent.name.split("-", 1)[1])
        except (IndexError, ValueError):
            step = None
    elif (path.parent / "recipe.yaml").exists():
        run = path.parent
    if step is None and (METADATA_PREFIX + "steps") in metadata:
        try:
            step = int(metadata[METADATA_PREFIX + "steps"])
        except ValueError:
            step = None
    if path.parent.parent.name == "checkpoints":
        label = path.parent.name
    elif path.name in (LORA_FILE, LORA_EMA_FILE):
        label = path.parent.name
    else:
        label = path.stem
    ref = LoraRef(path, label, metadata, shapes, step, run, what)
    if ref.is_ema:
        ref.label += " (EMA)"
    return ref


def run_checkpoints(run: str | Path) -> list[LoraRef]:
    """Every `checkpoints/step-N/lora.safetensors` of a training run, oldest first, each followed by the checkpoint's
    `lora_ema.safetensors` where the run kept an EMA (training.ema_decay): ranked like any other LoRA."""
    root = Path(run).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"--run: {run} is not a folder")
    found = [c / name for c in list_checkpoints(root / "checkpoints") for name in (LORA_FILE, LORA_EMA_FILE)]
    found = [p for p in found if p.is_file()]
    if not found:
        raise CheckpointError(f"--run: {run} has no checkpoints/step-N/{LORA_FILE}")
    return [resolve_lora(p, "--run") for p in found]


def unique_labels(refs: list[LoraRef]) -> None:
    """Make labels unique (two runs' step-100 become run-a/step-100 and run-b/step-100)."""
    labels = [r.label for r in refs]
    if len(set(labels)) == len(labels):
        return
    for r in refs:
        parent = r.run.name if r.run is not None else r.path.parent.name
        r.label = f"{parent}/{r.label}"
    seen: dict[str, int] = {}
    for r in refs:
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label}#{seen[r.label]}"


def check_family(ref: LoraRef, src: ModelSource) -> None:
    if ref.family and ref.family != src.family:
        raise CheckpointError(
            f"{ref.what}: {ref.path} is a LoRA for FLUX.2 {ref.family} (header {METADATA_PREFIX}family), but the model "
            f"{src.name} is FLUX.2 {src.family}; pass the --model it was trained on"
        )


def check_fits(ref: LoraRef, transformer: Any, model_name: str) -> None:
    """Every diffusers-format LoRA tensor must name a layer of this transformer and fit its shape."""
    modules = dict(transformer.named_modules())
    for key, shape in ref.shapes.items():
        if not key.startswith("transformer.") or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue  # other key styles (BFL, kohya) are converted and checked by diffusers on load
        name, part = key[len("transformer.") :].rsplit(".lora_", 1)
        layer = modules.get(name)
        layer = getattr(layer, "base_layer", layer)
        if layer is None or not hasattr(layer, "in_features"):
            raise CheckpointError(
                f"{ref.what}: {ref.path} adapts transformer.{name}, which the model {model_name} does not have "
                "(a LoRA for a different model?)"
            )
        expected = layer.in_features if part.startswith("A") else layer.out_features
        got = shape[1] if part.startswith("A") else shape[0]
        if len(shape) != 2 or got != expected:
            side = "inputs" if part.startswith("A") else "outputs"
            raise CheckpointError(
                f"{ref.what}: {ref.path}: {key} has shape {tuple(shape)} but the layer of {model_name} has {expected} "
                f"{side}: a LoRA for a different model (pass the --model it was trained on)"
            )


# ---------------------------------------------------------------------------------------------
# The run a LoRA came from
# ---------------------------------------------------------------------------------------------


def run_recipe(run: Path | None) -> Recipe | None:
    """The resolved recipe of a training run (OUTPUT/recipe.yaml), or None."""
    if run is None or not (run / "recipe.yaml").exists():
        return None
    from ..errors import RecipeError, UsageError
    from ..recipe import parse_recipe

    try:
        recipe, _ = parse_recipe(["--config", str(run / "recipe.yaml")], need_data=False)
    except (UsageError, RecipeError) as e:
        log.warning("%s: not used (%s)", run / "recipe.yaml", e)
        return None
    return recipe


def logged_val_loss(ref: LoraRef) -> float | None:
    """The validation loss the training run logged at this checkpoint's step (metrics.jsonl), or None. A run with
    validation.use_ema logged its EMA's loss (`"val_ema": true`): that belongs to the EMA file, not the LoRA."""
    if ref.run is None or ref.step is None or not (ref.run / "metrics.jsonl").exists():
        return None
    value = None
    for line in (ref.run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step") == ref.step and "val_loss" in rec and bool(rec.get("val_ema")) == ref.is_ema:
            value = float(rec["val_loss"])
    return value


def strip_trigger(prompt: str, trigger: str | None) -> str:
    """The prompt without the trigger word (CLIP has never seen it): what the image is scored against."""
    if not trigger:
        return prompt
    words = [w for w in prompt.split() if w.strip(",.;:") != trigger]
    return " ".join(words)


# ---------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------


@dataclass
class GenSettings:
    size: int
    steps: int
    guidance: float
    max_sequence_length: int


class Evaluator:
    """One base model, LoRAs swapped in turn. Call `encode` (and `val_cache`) before `load`."""

    def __init__(
        self,
        refs: list[LoraRef],
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        size: int | None = None,
        steps: int = 28,
        guidance: float = 4.0,
        max_sequence_length: int | None = None,
    ):
        from ..model import quiet_libraries

        quiet_libraries()
        self.refs = refs
        unique_labels(refs)
        runs = [r.run for r in refs if r.run is not None]
        self.recipe = run_recipe(runs[0]) if runs else None
        base = model or self._base_model()
        self.src = resolve_model(ModelArgs(name_or_path=base))
        for r in refs:
            check_family(r, self.src)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.dtype = DTYPES[dtype]
        rec = self.recipe
        if size is None:
            size = (rec.validation.sample_resolution or rec.data.resolution) if rec else None
        if size is None:
            res = refs[0].meta("resolution") if refs else None
            size = int(res) if res and res.isdigit() else 1024
        if size % 16:
            raise EvalError(f"--size: must be a multiple of 16, got {size}")
        msl = max_sequence_length or (rec.model.max_sequence_length if rec else 512)
        self.gen = GenSettings(size=size, steps=steps, guidance=guidance, max_sequence_length=msl)
        self.pipe: Any = None
        self.current: LoraRef | None = None
        self.empty: torch.Tensor | None = None
        self._references: dict[str, Image.Image] = {}

    def _base_model(self) -> str:
        bases = {r.base_model for r in self.refs if r.base_model}
        if not bases:
            if self.recipe is not None:
                return self.recipe.model.name_or_path
            raise EvalError(
                f"--model: {self.refs[0].path} names no base model ({METADATA_PREFIX}base_model); pass --model"
            )
        if len(bases) > 1:
            raise EvalError(
                f"--model: the LoRAs were trained on different models ({', '.join(sorted(bases))}); pass --model"
            )
        return bases.pop()

    # -- text encoder stage ----------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Prompt embeddings for every distinct prompt (and the empty prompt), then the text encoder is freed."""
        from ..data.cache import open_text_encoder, place_text_encoder
        from ..flow import encode_prompts
        from ..model import encoder_dtype, free

        distinct = list(dict.fromkeys(["", *prompts]))
        # Placed and quantized as the run's recipe says (model.text_encoder_device / text_encoder_quantize), so an
        # evaluation fits wherever its training's cache stage did.
        model = self.recipe.model if self.recipe is not None else None
        where, quantize = getattr(model, "text_encoder_device", "auto"), getattr(model, "text_encoder_quantize", "none")
        dtype = encoder_dtype(_dtype_name(self.dtype), self.device)
        run_on = place_text_encoder(where, self.src, self.device, dtype, quantize, self.gen.max_sequence_length)
        text_encoder, tokenizer = open_text_encoder(self.src, dtype, run_on, quantize)
        out: dict[str, torch.Tensor] = {}
        for i in tqdm(range(0, len(distinct), 8), desc="eval: prompts", unit="batch", leave=False):
            batch = distinct[i : i + 8]
            emb = encode_prompts(
                self.src.family, text_encoder, tokenizer, batch, self.src.text_layers, self.gen.max_sequence_length
            )
            out.update({p: e.to("cpu") for p, e in zip(batch, emb, strict=True)})
        free(text_encoder)
        self.empty = out[""]
        return out

    def val_cache(self, data: str, out_dir: Path) -> CacheIndex:
        """The cached held-out items of `data` with the run's settings (the training run's own cache when it matches)."""
        from ..data.cache import build_cache, check_settings, dataset_source, read_index, settings_for
        from ..model import encoder_dtype

        recipe = self._cache_recipe()
        settings = settings_for(self.src, recipe)
        if (Path(data).expanduser() / "index.json").exists():
            index = read_index(Path(data).expanduser())
            check_settings(index, settings)
            return index
        source, source_id = dataset_source(data, recipe.data.instance_prompt, recipe.data.mask_dir)
        digest = settings.digest(source_id)
        run = next((r.run for r in self.refs if r.run is not None), None)
        if run is not None and (run / "cache" / digest / "index.json").exists():
            return read_index(run / "cache" / digest)
        text_dtype = encoder_dtype(_dtype_name(self.dtype), self.device)
        return build_cache(out_dir / "cache" / digest, settings, source, self.device, text_dtype)

    def _cache_recipe(self) -> Recipe:
        if self.recipe is not None:
            return self.recipe
        recipe = Recipe()
        recipe.model.name_or_path = self.src.name
        ref = self.refs[0] if self.refs else None
        if ref is not None:
            res = ref.meta("resolution")
            if res and res.isdigit():
                recipe.data.resolution = int(res)
            recipe.data.trigger = ref.trigger
        recipe.model.max_sequence_length = self.gen.max_sequence_length
        return recipe

    # -- transformer stage -----------------------------------------------------------------------
    def load(self) -> None:
        """Transformer, VAE and scheduler once; every LoRA is checked against the transformer before any runs."""
        from ..model import load_scheduler, load_transformer, load_vae, pipeline_class

        transformer = load_transformer(self.src, self.dtype, self.device)
        for r in self.refs:
            check_fits(r, transformer, self.src.name)
        vae = load_vae(self.src, dtype=self.dtype, device=self.device)
        cls = pipeline_class(self.src)
        self.pipe = cls(
            scheduler=load_scheduler(self.src), vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
        )
        self.pipe.set_progress_bar_config(disable=True)

    def use(self, ref: LoraRef | None) -> None:
        """Swap the pipeline's LoRA: `ref` loaded through diffusers (None: the base model alone)."""
        if self.current is ref:
            return
        if self.current is not None:
            self.pipe.delete_adapters(ADAPTER)
            self.current = None
        if ref is None:
            return
        try:
            if any(".hada_" in k for k in ref.shapes):  # LoHa: through PEFT (diffusers' loader reads LoRA and LoKr)
                from ..interop import load_lora
                from ..interop.lycoris import load_into

                load_into(self.pipe.transformer, load_lora(ref.path, ref.what).lycoris, ADAPTER, str(ref.path))
            else:
                self.pipe.load_lora_weights(str(ref.path), adapter_name=ADAPTER)
        except Exception as e:  # noqa: BLE001 - diffusers/PEFT raise many types; the user gets one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(
                f"{ref.what}: {ref.path}: diffusers cannot load it as a FLUX.2 LoRA ({first})"
            ) from None
        self.current = ref

    def references(self, paths: list[str], field_name: str = "--image") -> list[Image.Image]:
        """The reference images at `paths`, each read (and checked, see references.open_reference) once; a bad file
        is an EvalError naming `field_name` and the file."""
        for path in paths:
            if path not in self._references:
                self._references[path] = open_reference(path, field_name, EvalError)
        return [self._references[p] for p in paths]

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, seed: int, images: list[str] | None = None) -> Image.Image:
        """One image; the seed fixes the starting noise (the same for every LoRA). images: reference image files,
        given to the pipeline as `image=[...]` (an edit); the size stays the evaluation's."""
        g = self.gen
        kwargs: dict[str, Any] = dict(
            prompt_embeds=embeds.unsqueeze(0).to(self.device, self.dtype),
            height=g.size,
            width=g.size,
            num_inference_steps=g.steps,
            guidance_scale=g.guidance,
            generator=torch.Generator().manual_seed(seed),
            text_encoder_out_layers=self.src.text_layers,
        )
        if self.src.family == "klein" and self.empty is not None:
            kwargs["negative_prompt_embeds"] = self.empty.unsqueeze(0).to(self.device, self.dtype)
        if images:
            kwargs["image"] = self.references(images)
        return self.pipe(**kwargs).images[0]

    @torch.no_grad()
    def validation_loss(self, index: CacheIndex) -> float:
        """The fixed-seed validation loss of the current LoRA, computed exactly as training computes it."""
        from ..flow import flow_loss, latent_ids, text_ids

        recipe = self._cache_recipe()
        v = recipe.validation
        transformer = self.pipe.transformer
        guidance = (
            torch.full((1,), recipe.training.guidance_scale, device=self.device)
            if transformer.config.guidance_embeds
            else None
        )
        total, n = 0.0, 0
        for i, item in enumerate(index.val_samples()):
            g = torch.Generator().manual_seed(v.seed + i)
            x0 = item["latents"].unsqueeze(0)
            noise = torch.randn(x0.shape, generator=g)
            embeds = item["prompt_embeds"].unsqueeze(0)
            _, _, h, w = x0.shape
            img_ids, txt_ids = latent_ids(1, h, w, self.device), text_ids(1, embeds.shape[1], self.device)
            for s in v.sigmas:
                loss = flow_loss(
                    transformer, x0.to(self.device), embeds.to(self.device), torch.tensor([s], device=self.device),
                    noise.to(self.device), img_ids, txt_ids, guidance, recipe.training.loss_weighting,
                )  # fmt: skip
                total += float(loss)
                n += 1
        return total / max(n, 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def training_images(data: str, instance_prompt: str | None = None) -> tuple[list[str], list[str], list[Image.Image]]:
    """(keys, captions, images) of a dataset folder or raw shards, for the nearest-training-image check.

    Images without a caption are kept (captioned `instance_prompt`, or empty): the check only needs pixels."""
    from ..data.cache import dataset_source
    from ..data.folder import DataError
    from ..data.shards import open_image

    if (Path(data).expanduser() / "index.json").exists():
        raise EvalError(
            f"--training-data: {data} is a latent cache; the overfitting check needs the images (pass the image "
            "folder or raw shards it was made from)"
        )
    try:
        source, _ = dataset_source(data, instance_prompt or "\u200b")
        samples = list(source())
    except (DataError, OSError) as e:
        raise EvalError(f"--training-data: {e}") from None
    keys, captions, images = [], [], []
    for s in tqdm(samples, desc="eval: training images", unit="img", leave=False):
        keys.append(s.key)
        captions.append(s.caption.strip("\u200b").strip())
        images.append(open_image(s.image, s.key))
    if not images:
        raise EvalError(f"--training-data: {data} holds no images")
    return keys, captions, images


__all__ = [
    "Evaluator",
    "LoraRef",
    "ModelError",
    "check_fits",
    "resolve_lora",
    "run_checkpoints",
    "training_images",
]
