"""The recipe: a dataclass tree that jsonargparse fills from `recipes/*.yaml` and the command line.

Every field is documented in `recipes/base.yaml`. `validate()` checks the values that types alone
cannot (ranges, files that must exist) and raises `RecipeError` naming the dotted field, before any
model is loaded.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import RecipeError
from .references import SamplePrompt, check_prompts

# Hidden-state layers of the text encoder that FLUX.2 stacks into the prompt embedding, per family.
# diffusers: Flux2Pipeline uses (10, 20, 30) for Mistral-3; Flux2KleinPipeline (9, 18, 27) for Qwen3.
FAMILY_TEXT_LAYERS: dict[str, tuple[int, ...]] = {"dev": (10, 20, 30), "klein": (9, 18, 27)}

# Upper bounds that keep a typo from reaching an allocation. FLUX.2 renders up to 4 megapixels (2048 x 2048);
# its pipelines encode prompts of 512 tokens by default, and no FLUX.2 text encoder was trained on prompts beyond a few
# thousand tokens (each token also joins every transformer block's attention).
MAX_RESOLUTION = 2048
# FLUX.2 takes up to 10 reference images beside the prompt (Flux2Pipeline(image=[...])).
MAX_REFERENCES = 10
BUILTIN_DATASETS = ("builtin:sample", "builtin:edit")
MAX_SEQUENCE_LENGTH = 4096
MAX_SEED = 2**32 - 1  # numpy's limit (accelerate.set_seed seeds numpy too)
# FLUX.2-dev's transformer is 6144 wide (48 heads x 128): a LoRA of that rank is already full rank on its
# narrowest layers, and a larger one only allocates more.
MAX_LORA_RANK = 6144

Dtype = Literal["bf16", "fp16", "fp32"]
LoraTargets = Literal["attention", "attention+single", "all-linear"]


@dataclass
class ModelArgs:
    """Which FLUX.2 model to train and how to hold it."""

    name_or_path: str = "black-forest-labs/FLUX.2-dev"
    """Local diffusers folder, hub id, or `builtin:tiny-dev` / `builtin:tiny-klein` (built locally)."""
    family: Literal["auto", "dev", "klein"] = "auto"
    """Model family; `auto` reads it from model_index.json."""
    dtype: Dtype = "bf16"
    """Dtype of the frozen transformer weights."""
    text_encoder_layers: list[int] | None = None
    """Hidden-state layers stacked into prompt embeddings; None takes the family default."""
    max_sequence_length: int = 512
    """Prompt tokens (chat template included) given to the text encoder."""
    gradient_checkpointing: bool = True
    """Recompute block activations in backward to save memory."""
    gradient_checkpointing_every: int = 1
    """With gradient checkpointing: checkpoint every k-th transformer block (1: all; larger trades memory for speed)."""
    compile: bool = False
    """torch.compile each transformer block (regional: one compiled graph reused by every block of a kind).
    Off by default: it costs compile time up front, and scripts/bench_step.py measures whether it pays."""
    quantize: Literal["none", "nf4", "int8", "fp8"] = "none"
    """Store the frozen transformer's block linears quantized (LoRA trains on top in full precision; norms, embeddings,
    modulation and the final projection stay at `dtype`). `int8`: torchao weight-only int8 (CPU or GPU); `nf4`:
    bitsandbytes 4-bit (GPU); `fp8`: torchao fp8 weight-only (GPU with compute capability >= 8.9). Needs the `quant`
    extra. The saved LoRA is the same file as without quantization and loads on an unquantized pipeline."""
    blocks_to_swap: int = 0
    """Keep this many transformer blocks' frozen weights in (pinned) host memory and copy each to the GPU just before
    it runs, forward and backward recompute (needs gradient checkpointing on every block). 0: all on the device."""
    text_encoder_device: Literal["auto", "gpu", "cpu"] = "auto"
    """Where the cache stage runs the text encoder. `auto`: the GPU when its weights (at `dtype`, or quantized by
    text_encoder_quantize) plus a margin for activations fit in the GPU's free memory, computed from the safetensors
    headers before loading; else the CPU, with a warning saying why (without a GPU: the CPU). `gpu`: the training GPU
    (an error without one); `cpu`: the CPU (slow; at `dtype`, so FLUX.2-dev's 24 B encoder takes ~48 GB of RAM in bf16,
    ~25 GB with text_encoder_quantize: int8). Where it runs does not change the cache key."""
    text_encoder_quantize: Literal["none", "int8", "nf4"] = "none"
    """Quantize the text encoder's linear layers while it loads for the cache stage: `int8` (torchao weight-only, CPU or
    GPU, ~1 byte per weight) or `nf4` (bitsandbytes 4-bit, GPU only, ~0.5 byte). The prompt embeddings change slightly,
    so this is part of the cache settings: a cache made with another value is refused, not reused."""
    force_cpu_loading: bool = False
    """Load every component on the CPU first, then move only what a stage needs to the device."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when name_or_path is a hub id."""
    fp8_compute: bool = False
    """Run the frozen base's block linears as fp8 matmuls (torchao float8, dynamic scaling) under the LoRA; the weights
    stay at model.dtype. Needs torchao and a GPU of compute capability 8.9+ (Ada, Hopper); not with model.quantize;
    best with model.compile (docs/training.md)."""


@dataclass
class LoraArgs:
    """The LoRA adapter (PEFT)."""

    rank: int = 16
    """LoRA rank r."""
    alpha: float | None = None
    """LoRA alpha; None means alpha = rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the LoRA input (lokr/loha: PEFT's rank_dropout)."""
    targets: LoraTargets = "attention"
    """`attention`: to_q/k/v/out.0 (double blocks); `attention+single`: adds to_qkv_mlp_proj and
    single-block attn.to_out (the upstream default); `all-linear`: every linear layer in the blocks."""
    init: Literal["gaussian", "default"] = "gaussian"
    """PEFT init of lora_A (lora_B is always zero, so step 0 equals the base model); lokr/loha use PEFT's own init."""
    type: Literal["lora", "dora", "lokr", "loha"] = "lora"
    """The adapter: `lora`, `dora` (weight-decomposed LoRA), `lokr` (Kronecker product) or `loha` (Hadamard
    product), all through PEFT. diffusers loads lora, dora and lokr files; loha loads in ComfyUI, through PEFT or
    merged (docs/training.md)."""
    use_dora: bool = False
    """Alias of type: dora (kept for older recipes)."""
    init_from: str | None = None
    """Start from an existing LoRA file (diffusers, peft, comfyui, ai-toolkit or kohya layout; `train --init-lora F`):
    its rank must equal lora.rank and its modules must lie within lora.targets; the other adapted modules start at zero.
    lora.type: lora only."""


@dataclass
class SourceArgs:
    """One source of `data.datasets`: a folder, raw shards or a cache, with its own settings. A field left unset
    takes the `data.*` value of the same name (a regularisation source takes no trigger unless it names one)."""

    path: str = ""
    """Image folder, raw shards or cache folder, as `data.dataset`."""
    role: str = "train"
    """`train`, or `regularisation`: prior-preservation images trained at data.prior_loss_weight, never held out."""
    repeats: int | None = None
    """How many times each of its images appears per epoch (sources are drawn in proportion to repeats x size)."""
    trigger: str | None = None
    """Trigger word for this source's captions ("" for none)."""
    instance_prompt: str | None = None
    """Caption for this source's images that have no .txt file."""
    caption_dropout: float | None = None
    """Probability of training one of its samples on the empty prompt."""
    resolution: int | None = None
    """Its target side length."""
    resolutions: list[int] | None = None
    """Several side lengths: each image is cached and trained at every one of them."""
    mask_dir: str | None = None
    """A folder of loss masks named like the images (`name.png`, white = train); masks beside the images
    (`name.mask.png`) need none."""
    holdout: int | None = None
    """Images of this source held out for the validation loss (regularisation sources: always 0)."""


@dataclass
class DataArgs:
    """The training images and captions."""

    dataset: str | None = None
    """Image folder (.txt captions or metadata.jsonl), raw shards (folder of .tar, `data-{000..009}.tar`,
    `pipe:...`), a cache folder from `data cache`, or `builtin:sample`."""
    trigger: str | None = None
    """Trigger word prepended to every caption (e.g. `sks`)."""
    instance_prompt: str | None = None
    """Caption for images that have no .txt file; without it such images are an error."""
    caption_dropout: float = 0.0
    """Probability of training a sample on the empty prompt."""
    repeats: int = 1
    """How many times each image appears per epoch."""
    resolution: int = 1024
    """Target side length; buckets keep the area near resolution^2."""
    buckets: bool = True
    """Aspect-ratio buckets (sides multiples of 16); off: center-crop every image to a square."""
    bucket_aspects: list[float] = field(
        default_factory=lambda: [0.5, 0.5625, 0.6667, 0.75, 1.0, 1.3333, 1.5, 1.7778, 2.0]
    )
    """Bucket aspect ratios (width / height); each becomes a size of about resolution^2 pixels."""
    random_flip: bool = False
    """Also cache a horizontally flipped copy of each image and pick one per sample, seeded."""
    holdout: int = 1
    """Images held out from training for the fixed-seed validation loss (0: use training images)."""
    max_references: int = 10
    """Editing datasets (items with reference images): at most this many references per sample; an item with more
    trains on a seeded choice of them each pass (order kept). FLUX.2 takes up to 10."""
    reference_dropout: float = 0.0
    """Editing datasets: probability of training a sample without its references (seeded per sample), so the LoRA
    keeps working for text-to-image."""
    max_reference_pixels: int = 1024 * 1024
    """Editing datasets: a reference larger than this many pixels is scaled down to it, as Flux2Pipeline does with
    `image=` inputs (its default, 1024x1024); then its sides are floored to multiples of 16."""
    num_workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes reading cached shards. `auto`: none when training on the CPU (the step needs
    every core and a cached read is cheap), else up to 4 per GPU process. It does not change the data order."""
    shuffle_buffer: int = 256
    """Unused: an epoch is a full shuffle of the global batches (data/stream.py). Accepted so older recipes parse."""
    datasets: list[SourceArgs] = field(default_factory=list)
    """Several sources in one recipe (each: path, role, repeats, trigger, instance_prompt, caption_dropout,
    resolution(s), mask_dir, holdout); `data.dataset` is the short form of a list of one. Each source has its own
    cache, so adding one does not rebuild the others."""
    resolutions: list[int] | None = None
    """Several side lengths (e.g. [512, 768, 1024]): every image is cached and trained at each; a global batch
    stays one bucket of one resolution. Unset: data.resolution alone."""
    mask_dir: str | None = None
    """A folder of loss masks named like the images (`name.png`, white = train, black = ignore); masks beside the
    images (`name.mask.png`) are found without it. The loss of a masked sample is its mean over the mask."""
    prior_loss_weight: float = 1.0
    """Weight of the loss of `role: regularisation` samples against the training samples'."""
    prior_target: Literal["image", "base"] = "image"
    """What regularisation samples train towards: `image` (their own images, DreamBooth prior preservation) or
    `base` (the base model's prediction with the LoRA off, one extra forward per regularisation sample)."""
    caption_shuffle: bool = False
    """Shuffle the comma-separated tags of each caption (keeping the first data.keep_tokens), seeded per sample."""
    keep_tokens: int = 0
    """Tags at the front of a caption that caption_shuffle and tag_dropout leave in place (the trigger is kept
    in front anyway)."""
    tag_dropout: float = 0.0
    """Probability of dropping each tag (past keep_tokens), seeded per sample."""
    caption_variants: int = 0
    """Caption variants cached per image when captions are shuffled or tags dropped (embeddings are cached: each
    variant costs one prompt embedding per image, ~15.7 MB on FLUX.2-dev); 0: 1, or 8 with shuffle/dropout."""


@dataclass
class TrainingArgs:
    """Optimisation."""

    max_steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 1
    """Images per process per micro-batch."""
    gradient_accumulation: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate."""
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor"] = "adamw"
    """`adamw8bit` needs bitsandbytes (pip install 'flux2-lora[bitsandbytes]'); `prodigy` (pip install
    'flux2-lora[prodigy]') sets its own step size: use lr 1.0; `adafactor` is transformers' (factored second moments)
    at the lr given (1e-4..1e-3). prodigy and adafactor train with distributed.strategy ddp, not fsdp/zero2/zero3."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip gradients to this norm (0 disables clipping)."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    seed: int = 42
    """Seeds weights init, data order, noise and sigmas."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Autocast; `auto` follows model.dtype on a GPU and is `no` on the CPU."""
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "sigmoid"] = "uniform"
    """How sigma is drawn per sample (`sigmoid`: sigmoid of N(logit_mean, logit_std), the same density as logit_normal
    under the name other trainers use)."""
    timestep_shift: Literal["none", "auto"] | float = "none"
    """Shift the drawn sigmas: `auto` by FLUX.2's resolution-dependent mu (the pipeline's compute_empirical_mu, per
    bucket), a number s by sigma' = s*sigma / (1 + (s - 1)*sigma)."""
    ema_decay: float = 0.0
    """EMA of the LoRA weights (fp32; ema = d*ema + (1-d)*w after each update, from the starting weights, no
    warmup), saved as lora_ema.safetensors beside lora.safetensors; 0 = off, e.g. 0.999 (docs/training.md)."""
    logit_mean: float = 0.0
    """Mean for logit_normal and sigmoid sampling."""
    logit_std: float = 1.0
    """Std for logit_normal and sigmoid sampling (other trainers' sigmoid_scale)."""
    mode_scale: float = 1.29
    """Scale for mode sampling."""
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Per-sample loss weight as a function of sigma."""
    guidance_scale: float = 3.5
    """Constant distilled-guidance value fed to FLUX.2-dev (ignored by models without guidance)."""


@dataclass
class ValidationArgs:
    """Fixed-seed validation loss and sample images."""

    every_n_steps: int = 250
    """Validate (loss and samples) every N optimizer steps; 0 only at start and end."""
    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    """Sigmas at which each held-out item is scored (same noise every time)."""
    seed: int = 1234
    """Seed of the validation noise."""
    prompts: list[str | SamplePrompt] = field(default_factory=list)
    """Sample prompts rendered with the current LoRA: a prompt, or `{prompt: TEXT, images: [FILE, ...]}` to render an
    edit of up to 10 reference images (shown left of the sample in the grid)."""
    sample_steps: int = 28
    """Denoising steps per sample."""
    sample_guidance: float = 4.0
    """Guidance scale for samples."""
    sample_resolution: int | None = None
    """Sample size in pixels; None takes data.resolution."""
    clip_score: bool = False
    """At each validation, log the CLIP score of each sample against its prompt (trigger word left out). Needs
    open_clip (pip install 'flux2-lora[eval]') and CLIP weights (clip_weights, or the hub cache)."""
    overfit_check: bool = False
    """At each validation, log the CLIP similarity of the samples to their nearest training image and the share at or
    above overfit_threshold (memorised). Needs the training images (a folder or raw shards, not a latent cache)."""
    clip_model: str = "ViT-B-32"
    """open_clip architecture for clip_score and overfit_check (or an open_clip model config .json)."""
    clip_weights: str | None = None
    """open_clip weights as a local .safetensors file; None looks for open_clip safetensors weights in the hub cache."""
    overfit_threshold: float = 0.95
    """CLIP similarity to the nearest training image at or above which a sample counts as memorised."""
    use_ema: bool = False
    """Render the samples and compute the validation loss with the EMA weights (needs training.ema_decay)."""

    def prompt_texts(self) -> list[str]:
        """The sample prompts' texts, in order (what the text encoder embeds)."""
        return [p if isinstance(p, str) else p.prompt for p in self.prompts]

    def prompt_images(self) -> list[list[str]]:
        """Each sample prompt's reference image files, in order ([] for a plain prompt)."""
        return [[] if isinstance(p, str) else list(p.images) for p in self.prompts]


@dataclass
class OutputArgs:
    """Where results go."""

    dir: str = "runs/flux2-lora"
    """Output folder: recipe, metrics, samples, logs, checkpoints, lora.safetensors."""
    checkpoint_every: int = 250
    """Resumable checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted."""


@dataclass
class LoggingArgs:
    """Metrics sinks."""

    log_every: int = 10
    """Log loss/lr every N optimizer steps (the only host sync in the step)."""
    tensorboard: bool = True
    """Write TensorBoard events under OUTPUT/logs."""
    wandb: bool = False
    """Also log to Weights & Biases (pip install 'flux2-lora[wandb]')."""
    wandb_project: str = "flux2-lora"
    """W&B project."""
    wandb_mode: Literal["online", "offline"] = "online"
    """`offline` writes runs locally for `wandb sync`."""


@dataclass
class CallbackArgs:
    """Stop and guard conditions."""

    early_stopping_patience: int = 0
    """Stop after this many validations without improvement of the validation loss (0: off)."""
    early_stopping_min_delta: float = 0.0
    """Improvement smaller than this does not count."""
    max_wall_time_minutes: float = 0.0
    """Checkpoint and stop after this much wall time (0: off)."""
    nan_max_consecutive: int = 5
    """Skip steps with a NaN/inf loss; stop after this many in a row."""


@dataclass
class DistributedArgs:
    """How several processes share one run (with one process these do nothing).

    Start the processes with `flux2-lora launch MANIFEST` or `accelerate launch -m flux2_lora train ...`.
    """

    strategy: Literal["auto", "ddp", "fsdp", "zero2", "zero3"] = "auto"
    """`auto`: what the launcher's accelerate config says (DeepSpeed or FSDP), else DDP. `ddp` replicates the
    model; `fsdp` is FSDP2 (parameters sharded as DTensors); `zero2`/`zero3` are DeepSpeed ZeRO stages."""
    shard_base: bool = True
    """fsdp and zero3: shard the frozen transformer across processes (false: every process holds it whole)."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """zero2/zero3: CPU offload of the optimizer state (`optimizer`), and with zero3 of the parameters too (`all`)."""


@dataclass
class Recipe:
    """A whole training recipe."""

    model: ModelArgs = field(default_factory=ModelArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    data: DataArgs = field(default_factory=DataArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    validation: ValidationArgs = field(default_factory=ValidationArgs)
    output: OutputArgs = field(default_factory=OutputArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    callbacks: CallbackArgs = field(default_factory=CallbackArgs)
    distributed: DistributedArgs = field(default_factory=DistributedArgs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise RecipeError(f"{field_name}: {message}")


# Each recipe group's name and dataclass (its default factory).
GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}  # type: ignore[misc]


def _nonfinite(obj: Any, prefix: str) -> tuple[str, float] | None:
    """The first float field (or list item) of a dataclass tree that is NaN or infinite, with its value."""
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found = _nonfinite(value, name + ".")
            if found:
                return found
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for x in items:
            if isinstance(x, float) and not math.isfinite(x):
                return name, x
    return None


def user_path(value: str, field_name: str) -> Path:
    """`value` with `~` expanded; an unknown `~user` is a RecipeError naming the field, not a RuntimeError."""
    try:
        return Path(value).expanduser()
    except RuntimeError as e:
        raise RecipeError(f"{field_name}: {value}: {e}") from None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def validate(recipe: Recipe, need_data: bool = True) -> None:
    """Check values types cannot express. Raises RecipeError('<field>: <reason>').

    need_data=False skips the dataset checks (commands that plan a run without reading data)."""
    m, lo, d, t, v, o, lg, c = (
        recipe.model,
        recipe.lora,
        recipe.data,
        recipe.training,
        recipe.validation,
        recipe.output,
        recipe.logging,
        recipe.callbacks,
    )
    for name, cls in GROUPS.items():
        value = getattr(recipe, name)
        _require(isinstance(value, cls), name, f"must be a mapping of {name}.* fields, got {value!r}")
    bad = _nonfinite(recipe, "")
    if bad is not None:
        raise RecipeError(f"{bad[0]}: must be a finite number, got {bad[1]}")
    _require(bool(m.name_or_path), "model.name_or_path", "must name a model folder, hub id or builtin:tiny-dev")
    _require(m.gradient_checkpointing_every >= 1, "model.gradient_checkpointing_every", "must be >= 1")
    _require(
        0 < m.max_sequence_length <= MAX_SEQUENCE_LENGTH,
        "model.max_sequence_length",
        f"must be in 1..{MAX_SEQUENCE_LENGTH} prompt tokens (FLUX.2's pipelines use 512), got {m.max_sequence_length}",
    )
    _require(m.blocks_to_swap >= 0, "model.blocks_to_swap", f"must be >= 0, got {m.blocks_to_swap}")
    if m.blocks_to_swap:
        _require(
            m.gradient_checkpointing and m.gradient_checkpointing_every == 1,
            "model.blocks_to_swap",
            "needs model.gradient_checkpointing: true and gradient_checkpointing_every: 1 (backward recomputes "
            "each swapped block after copying it back)",
        )
        _require(not m.compile, "model.blocks_to_swap", "cannot be combined with model.compile: true")
        _require(
            m.quantize != "nf4", "model.blocks_to_swap", "cannot be combined with model.quantize: nf4 (use int8 or fp8)"
        )
    _require(
        not (m.text_encoder_quantize == "nf4" and m.text_encoder_device == "cpu"),
        "model.text_encoder_quantize",
        "nf4 (bitsandbytes) needs the text encoder on a GPU; with model.text_encoder_device: cpu use int8 or none",
    )
    if m.text_encoder_layers is not None:
        _require(len(m.text_encoder_layers) > 0, "model.text_encoder_layers", "must list at least one layer")
    _require(
        1 <= lo.rank <= MAX_LORA_RANK,
        "lora.rank",
        f"must be in 1..{MAX_LORA_RANK} (FLUX.2-dev's transformer width; a higher rank adds nothing), got {lo.rank}",
    )
    _require(lo.alpha is None or lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    _require(
        lo.alpha is None or lo.alpha <= 1000 * lo.rank,
        "lora.alpha",
        f"must be at most 1000 x lora.rank (the update is scaled by alpha / rank; usual values are rank to 2 x rank), "
        f"got {lo.alpha}",
    )
    _require(0.0 <= lo.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    _require(
        not (lo.use_dora and lo.type not in ("lora", "dora")),
        "lora.use_dora",
        f"is the old name of lora.type: dora, but lora.type is {lo.type}; keep one of them",
    )
    if lo.init_from is not None:
        _require(user_path(lo.init_from, "lora.init_from").exists(), "lora.init_from", f"{lo.init_from} does not exist")
        kind = "dora" if lo.use_dora else lo.type
        _require(kind == "lora", "lora.init_from", f"seeds a plain LoRA only, not lora.type: {kind}")
    from .sources import check_data, dataset_dirs

    check_data(recipe, need_data)
    _require(t.max_steps >= 1, "training.max_steps", f"must be >= 1, got {t.max_steps}")
    _require(t.batch_size >= 1, "training.batch_size", f"must be >= 1, got {t.batch_size}")
    _require(
        t.gradient_accumulation >= 1, "training.gradient_accumulation", f"must be >= 1, got {t.gradient_accumulation}"
    )
    _require(t.lr > 0, "training.lr", f"must be > 0, got {t.lr}")
    _require(
        t.optimizer != "prodigy" or t.lr >= 0.1,
        "training.lr",
        f"with training.optimizer: prodigy is a multiplier of the step size Prodigy finds: use 1.0, got {t.lr:g}",
    )
    _require(t.weight_decay >= 0, "training.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(
        len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas),
        "training.betas",
        f"must be two numbers in [0, 1) (AdamW's moment decays, e.g. [0.9, 0.999]), got {list(t.betas)}",
    )
    _require(t.eps > 0, "training.eps", f"must be > 0 (AdamW's denominator guard, e.g. 1e-8), got {t.eps}")
    _require(0 <= t.seed <= MAX_SEED, "training.seed", f"must be in 0..{MAX_SEED}, got {t.seed}")
    _require(t.guidance_scale >= 0, "training.guidance_scale", f"must be >= 0, got {t.guidance_scale}")
    _require(t.max_grad_norm >= 0, "training.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
    _require(t.warmup_steps >= 0, "training.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _require(t.logit_std > 0, "training.logit_std", f"must be > 0, got {t.logit_std}")
    _require(
        0.0 <= t.ema_decay < 1.0, "training.ema_decay", f"must be in [0, 1) (0 = off, e.g. 0.999), got {t.ema_decay}"
    )
    _require(not v.use_ema or t.ema_decay > 0, "validation.use_ema", "needs training.ema_decay > 0 (e.g. 0.999)")
    shift = t.timestep_shift
    _require(
        shift in ("none", "auto") or (isinstance(shift, (int, float)) and 0 < shift <= 100),
        "training.timestep_shift",
        f"must be none, auto or a shift in (0, 100] (1 = no shift; 3 is common), got {shift!r}",
    )
    _require(
        not (m.fp8_compute and m.quantize != "none"),
        "model.fp8_compute",
        f"cannot be combined with model.quantize: {m.quantize} (pick one: fp8 matmuls or a quantized base)",
    )
    _require(
        len(v.sigmas) > 0 and all(0.0 < s < 1.0 for s in v.sigmas), "validation.sigmas", "must be values in (0, 1)"
    )
    _require(v.every_n_steps >= 0, "validation.every_n_steps", f"must be >= 0, got {v.every_n_steps}")
    _require(0 <= v.seed <= MAX_SEED, "validation.seed", f"must be in 0..{MAX_SEED}, got {v.seed}")
    _require(v.sample_steps >= 1, "validation.sample_steps", f"must be >= 1, got {v.sample_steps}")
    if v.sample_resolution is not None:
        _require(
            16 <= v.sample_resolution <= MAX_RESOLUTION and v.sample_resolution % 16 == 0,
            "validation.sample_resolution",
            f"must be a multiple of 16 in 16..{MAX_RESOLUTION} (FLUX.2 renders up to 4 megapixels), "
            f"got {v.sample_resolution}",
        )
    check_prompts(v.prompts, MAX_REFERENCES, open_files=need_data)
    for name in ("clip_score", "overfit_check"):
        _require(
            not getattr(v, name) or bool(v.prompts), f"validation.{name}", "needs validation.prompts (the samples)"
        )
    _require(0.0 < v.overfit_threshold <= 1.0, "validation.overfit_threshold", "must be in (0, 1]")
    if v.clip_weights is not None and (v.clip_score or v.overfit_check):
        path = user_path(v.clip_weights, "validation.clip_weights")
        _require(path.is_file(), "validation.clip_weights", f"{v.clip_weights} does not exist")
        _require(
            path.suffix == ".safetensors", "validation.clip_weights", f"{v.clip_weights} is not a .safetensors file"
        )
    _require(bool(o.dir), "output.dir", "must not be empty")
    out = user_path(o.dir, "output.dir")
    _require(not out.exists() or out.is_dir(), "output.dir", f"{o.dir} is a file, not a folder; choose a folder")
    for name, data_dir in dataset_dirs(d):
        _require(
            not _inside(out.resolve(), data_dir),
            "output.dir",
            f"{o.dir} is inside {name} {data_dir}: the next run would train on this run's samples and plots; "
            "choose an output folder outside the dataset",
        )
    _require(o.checkpoint_every >= 0, "output.checkpoint_every", f"must be >= 0, got {o.checkpoint_every}")
    _require(o.keep_last >= 1, "output.keep_last", f"must be >= 1, got {o.keep_last}")
    _require(lg.log_every >= 1, "logging.log_every", f"must be >= 1, got {lg.log_every}")
    _require(c.early_stopping_patience >= 0, "callbacks.early_stopping_patience", "must be >= 0")
    _require(c.max_wall_time_minutes >= 0, "callbacks.max_wall_time_minutes", "must be >= 0")
    _require(c.nan_max_consecutive >= 1, "callbacks.nan_max_consecutive", "must be >= 1")
    dist = recipe.distributed
    _require(
        dist.offload == "none" or dist.strategy in ("zero2", "zero3"),
        "distributed.offload",
        f"CPU offload is a DeepSpeed option; use strategy zero2 or zero3 (got {dist.strategy})",
    )
    _require(
        dist.offload != "all" or dist.strategy == "zero3",
        "distributed.offload",
        "`all` (parameters too) needs strategy zero3; zero2 offloads the optimizer only",
    )
    needs = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigy")}  # module, extra
    if t.optimizer in needs:
        module, extra = needs[t.optimizer]
        try:
            importlib.import_module(module)
        except ImportError:
            raise RecipeError(
                f"training.optimizer: {t.optimizer} needs {module}; pip install 'flux2-lora[{extra}]' or use adamw"
            ) from None
    if lg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise RecipeError("logging.wandb: needs wandb; pip install 'flux2-lora[wandb]'") from None


def cache_root() -> Path:
    """Where built-in models and the sample dataset are built (FLUX2_LORA_HOME or ~/.cache/flux2-lora)."""
    return Path(os.environ.get("FLUX2_LORA_HOME", Path.home() / ".cache" / "flux2-lora")).expanduser()


def build_once(path: Path, build: Callable[[Path], object], marker: str) -> Path:
    """Build a builtin artefact at `path` once, even when several processes start together (file lock).

    `marker` is a file inside `path` that exists only when a build finished (builds write to a temporary
    folder and rename it into place).
    """
    import fcntl

    if (path / marker).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (path / marker).exists():
                build(path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
