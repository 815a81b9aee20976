"""FLUX.2 components: find the model, load each part when a stage needs it, add the LoRA, build tiny models.

Loading is per component so that the text encoder (24 B for FLUX.2-dev) and the VAE are loaded for
the cache stage and freed before the transformer is loaded for training.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import FAMILY_TEXT_LAYERS, ModelArgs, RecipeError, build_once, cache_root
from .errors import ModelError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def encoder_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Dtype for the text encoder and VAE in the cache stage: the recipe's on a GPU, fp32 on the CPU."""
    return DTYPES[dtype] if device.type == "cuda" else torch.float32


# LoRA target presets (module-name suffixes matched by PEFT).
ATTENTION_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def lora_target_modules(preset: str, num_single_layers: int) -> list[str]:
    """PEFT target_modules for a preset name (see LoraArgs.targets)."""
    if preset == "attention":
        return list(ATTENTION_TARGETS)
    if preset == "attention+single":
        return (
            ATTENTION_TARGETS
            + ["to_qkv_mlp_proj"]
            + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers)]
        )
    if preset == "all-linear":
        return (
            ATTENTION_TARGETS
            + [
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "to_add_out",
                "ff.linear_in",
                "ff.linear_out",
                "ff_context.linear_in",
                "ff_context.linear_out",
                "to_qkv_mlp_proj",
            ]
            + [f"single_transformer_blocks.{i}.attn.to_out" for i in range(num_single_layers)]
        )
    raise RecipeError(f"lora.targets: unknown preset {preset!r}")


@dataclass
class ModelSource:
    """A resolved model folder in diffusers layout and its family."""

    path: Path
    family: str  # "dev" | "klein"
    text_layers: tuple[int, ...]
    pipeline_class: str

    @property
    def name(self) -> str:
        return str(self.path)


def resolve_model(args: ModelArgs) -> ModelSource:
    """Find the model folder (building a builtin tiny model, or finding a hub snapshot) and its family."""
    name = args.name_or_path
    if name.startswith("builtin:"):
        kind = name.split(":", 1)[1]
        if kind not in ("tiny-dev", "tiny-klein"):
            raise ModelError(
                f"model.name_or_path: unknown builtin {name!r} (use builtin:tiny-dev or builtin:tiny-klein)"
            )
        family = kind.split("-", 1)[1]
        path = build_once(
            cache_root() / "models" / kind, lambda p: make_tiny_pipeline(p, family=family), "model_index.json"
        )
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
    else:
        path = _snapshot_from_hub(name, args.revision)
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ModelError(f"model.name_or_path: {path} has no model_index.json (expected a diffusers FLUX.2 folder)")
    index = json.loads(index_file.read_text())
    cls = index.get("_class_name", "")
    detected = "klein" if "Klein" in cls else "dev" if cls.startswith("Flux2") else None
    if detected is None:
        raise ModelError(f"model.name_or_path: {path} holds {cls or 'an unknown pipeline'}, not a FLUX.2 pipeline")
    family = detected if args.family == "auto" else args.family
    if args.family != "auto" and args.family != detected:
        log.warning("model.family=%s overrides the detected family %s", args.family, detected)
    layers = tuple(args.text_encoder_layers) if args.text_encoder_layers else FAMILY_TEXT_LAYERS[family]
    return ModelSource(path=path, family=family, text_layers=layers, pipeline_class=cls)


def _snapshot_from_hub(repo_id: str, revision: str | None) -> Path:
    """Local snapshot of a hub repo; offline or unreachable hubs give one clear error, not retries."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        # Try the local cache first: no network at all when the snapshot is there.
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        if offline:
            raise ModelError(
                f"model.name_or_path: {repo_id} is not a local folder and not in the hub cache, and HF_HUB_OFFLINE=1; "
                "download it first or pass a local diffusers folder"
            ) from None
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=None))
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"model.name_or_path: cannot fetch {repo_id} from the hub ({first}); "
            "check the id, your network and `hf auth login`, or pass a local folder"
        ) from None


# ---------------------------------------------------------------------------------------------
# Component loading
# ---------------------------------------------------------------------------------------------


def safetensors_only(folder: Path) -> Path:
    """A component folder, after checking that its weights are safetensors: pickle-based weights (.bin, .pt, .ckpt)
    are refused, never loaded, because unpickling can run arbitrary code."""
    from .safety import LoraFileError, require_safetensors_folder

    try:
        require_safetensors_folder(folder, "model.name_or_path")
    except LoraFileError as e:
        raise ModelError(str(e)) from None
    return folder


def _device_map(device: torch.device | str | None) -> dict[str, torch.device] | None:
    """Load straight onto `device` (no full copy in host memory first); None loads on the CPU."""
    return None if device is None else {"": torch.device(device)}


def load_text_encoder(
    src: ModelSource, dtype: torch.dtype, device: torch.device | str | None = None, quantize: str = "none"
) -> tuple[Any, Any]:
    """Text encoder (on `device`, or the CPU when None) and its tokenizer/processor.

    `quantize` (int8, nf4) quantizes its linear layers weight by weight while loading (quant.text_encoder_quant_config);
    nf4 needs `device` to be a CUDA GPU, and the loaded model cannot be moved afterwards."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if quantize != "none":
        from .quant import check_quantize, text_encoder_quant_config

        check_quantize(quantize, torch.device(device if device is not None else "cpu"), "model.text_encoder_quantize")
        kwargs["quantization_config"] = text_encoder_quant_config(quantize, dtype)
    text_encoder: Any
    if src.family == "klein":
        from transformers import Qwen3ForCausalLM

        text_encoder = Qwen3ForCausalLM.from_pretrained(
            safetensors_only(src.path / "text_encoder"), torch_dtype=dtype, device_map=_device_map(device), **kwargs
        )
    else:
        from transformers import Mistral3ForConditionalGeneration

        text_encoder = Mistral3ForConditionalGeneration.from_pretrained(
            safetensors_only(src.path / "text_encoder"), torch_dtype=dtype, device_map=_device_map(device), **kwargs
        )
    tokenizer = _load_tokenizer(src)
    text_encoder.requires_grad_(False).eval()
    return text_encoder, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(src.path / "tokenizer")


def _load_tokenizer(src: ModelSource) -> Any:
    index = json.loads((src.path / "model_index.json").read_text())
    library, cls_name = index.get("tokenizer", ["transformers", "AutoTokenizer"])
    import transformers

    cls = getattr(transformers, cls_name, None) or transformers.AutoTokenizer
    return cls.from_pretrained(src.path / "tokenizer")


def load_vae(src: ModelSource, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Any:
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2.from_pretrained(
        safetensors_only(src.path / "vae"), torch_dtype=dtype, device_map=_device_map(device), use_safetensors=True
    )
    vae.requires_grad_(False).eval()
    return vae


def load_transformer(
    src: ModelSource,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    quantize: str = "none",
    keep_on_host: int = 0,
) -> Any:
    """The frozen transformer on `device` (None: the CPU), its block linears quantized when `quantize` is not none.

    int8/fp8 (torchao) read the weights into host memory and quantize block by block on the device; nf4 quantizes
    each weight as diffusers loads it onto the GPU (see quant.py). With `keep_on_host` (block swapping) the model
    is read into host memory and the last `keep_on_host` blocks stay there; `swap.attach_block_swap` moves the rest.
    """
    from diffusers import Flux2Transformer2DModel

    kwargs: dict[str, Any] = {}
    if quantize != "none":
        from .quant import bnb_config, check_quantize

        check_quantize(quantize, torch.device(device if device is not None else "cpu"))
        if quantize == "nf4":
            kwargs["quantization_config"] = bnb_config(quantize, dtype)
    host_first = quantize in ("int8", "fp8") or keep_on_host > 0
    transformer = Flux2Transformer2DModel.from_pretrained(
        safetensors_only(src.path / "transformer"),
        torch_dtype=dtype,
        device_map=_device_map(None if host_first else device),
        use_safetensors=True,
        **kwargs,
    )
    transformer.requires_grad_(False)
    if quantize in ("int8", "fp8"):
        from .quant import quantize_blocks

        n = quantize_blocks(transformer, quantize, device if device is not None else "cpu", keep_on_host)
        log.info("quantized %d block linears to %s", n, quantize)
    return transformer


def load_scheduler(src: ModelSource) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(src.path / "scheduler")


def pipeline_class(src: ModelSource) -> Any:
    import diffusers

    return diffusers.Flux2KleinPipeline if src.family == "klein" else diffusers.Flux2Pipeline


def free(*modules: Any) -> None:
    """Drop modules and return their memory (host and device)."""
    for m in modules:
        if hasattr(m, "to"):
            try:
                m.to("meta")
            except Exception:  # noqa: BLE001 - best effort; the reference drop below still frees it
                pass
    del modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


ADAPTER_KINDS = ("lora", "dora", "lokr", "loha")


def adapter_kind(lora: Any) -> str:
    """The adapter a recipe's `lora` group trains: lora.type, with the older lora.use_dora meaning `dora`."""
    return "dora" if getattr(lora, "use_dora", False) else str(lora.type)


def add_adapter(transformer: Any, lora: Any) -> dict[str, Any]:
    """add_lora with a recipe's `lora` group (config.LoraArgs)."""
    return add_lora(transformer, lora.rank, lora.alpha, lora.dropout, lora.targets, lora.init, adapter_kind(lora))


def add_lora(
    transformer: Any,
    rank: int,
    alpha: float | None,
    dropout: float,
    targets: str,
    init: str,
    kind: bool | str = "lora",
) -> dict[str, Any]:
    """Inject a PEFT adapter; its weights are kept in fp32. Returns the adapter's PEFT config as a dict.

    `kind`: `lora`, `dora` (LoraConfig(use_dora=True)), `lokr` (LoKrConfig) or `loha` (LoHaConfig); True/False
    are the older use_dora flag. For LoKr and LoHa, `dropout` is PEFT's rank_dropout and `init` does not apply:
    PEFT's own init makes the update zero at step 0 (LoKr: w1 = 0; LoHa: w2_b = 0)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if isinstance(kind, bool):
        kind = "dora" if kind else "lora"
    if kind not in ADAPTER_KINDS:
        raise RecipeError(f"lora.type: must be one of {', '.join(ADAPTER_KINDS)}, got {kind!r}")
    target_modules = lora_target_modules(targets, transformer.config.num_single_layers)
    a = alpha if alpha is not None else rank
    config: Any
    if kind in ("lokr", "loha"):
        cls = LoKrConfig if kind == "lokr" else LoHaConfig
        config = cls(r=rank, alpha=a, rank_dropout=dropout, init_weights=True, target_modules=target_modules)  # type: ignore[arg-type]
    else:
        config = LoraConfig(
            r=rank,
            lora_alpha=a,  # type: ignore[arg-type]  # PEFT accepts floats
            lora_dropout=dropout,
            init_lora_weights="gaussian" if init == "gaussian" else True,
            target_modules=target_modules,
            use_dora=kind == "dora",
        )
    transformer.add_adapter(config)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return config.to_dict()


def enable_checkpointing(transformer: Any, every: int = 1) -> int:
    """Activation checkpointing on every `every`-th transformer block (double and single). Returns how many.

    every=1 uses diffusers' own switch; otherwise the chosen blocks' forward is wrapped in
    torch.utils.checkpoint at the instance level, so module names (and LoRA keys) do not change.
    """
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    if every == 1:
        transformer.enable_gradient_checkpointing()
        return len(blocks)
    import functools

    from torch.utils.checkpoint import checkpoint

    chosen = blocks[::every]
    for block in chosen:
        plain = block.forward

        @functools.wraps(plain)
        def forward(*args: Any, __plain: Any = plain, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(__plain, *args, use_reentrant=False, **kwargs)
            return __plain(*args, **kwargs)

        block.forward = forward
    return len(chosen)


def compile_blocks(transformer: Any) -> int:
    """torch.compile every transformer block in place (after LoRA and checkpointing are applied). Returns how many.

    Regional compilation: the double blocks share one compiled graph and the single blocks another, so
    compile time does not grow with depth. Module names, and with them LoRA keys and checkpoints, are unchanged.
    """
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for block in blocks:
        block.compile()
    return len(blocks)


def count_parameters(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a ZeRO-3 partitioned parameter counts whole (`ds_numel`)."""

    def numel(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    trainable = sum(numel(p) for p in module.parameters() if p.requires_grad)
    total = sum(numel(p) for p in module.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------
# Tiny FLUX.2 pipelines (tests, the embedded default run)
# ---------------------------------------------------------------------------------------------

_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set t = m['content'] %}"
    "{% else %}{% set t = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ t }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ t }}[/INST]"
    "{% else %}{{ t }}{{ eos_token }}{% endif %}{% endfor %}"
)
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _tiny_tokenizer(family: str) -> Any:
    """A byte-level BPE tokenizer trained offline on the system message and common caption words."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "klein":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    else:
        specials = [
            "<unk>",
            "<s>",
            "</s>",
            "<pad>",
            "[INST]",
            "[/INST]",
            "[SYSTEM_PROMPT]",
            "[/SYSTEM_PROMPT]",
            "[IMG]",
        ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = (
        "a an the photo of in on with and style painting drawing red green blue yellow white black orange purple "
        "circle square triangle star background small large dog cat person portrait landscape sks ohwx"
    )
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SYSTEM_MESSAGE] * 4 + [words] * 4, trainer)
    if family == "klein":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=_QWEN_TEMPLATE
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=_MISTRAL_TEMPLATE,
    )
    fast.padding_side = "left"
    return _as_pixtral_processor(fast)


def _as_pixtral_processor(tokenizer: Any) -> Any:
    """Wrap the tokenizer in PixtralProcessor (FLUX.2-dev's real tokenizer class) when torchvision is present.

    Without torchvision, transformers cannot build PixtralProcessor; the plain tokenizer then takes its place
    (Flux2Pipeline only calls apply_chat_template on it). The wrapped processor is checked on a chat batch and
    the plain tokenizer kept if anything about it fails.
    """
    try:
        import torchvision  # noqa: F401
        from transformers import PixtralImageProcessor, PixtralProcessor

        processor = PixtralProcessor(
            image_processor=PixtralImageProcessor(patch_size=8),
            tokenizer=tokenizer,
            patch_size=8,
            spatial_merge_size=2,
            chat_template=_MISTRAL_TEMPLATE,
            image_token="[IMG]",
        )
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        processor.apply_chat_template(
            format_input(["a test"]),
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=32,
        )
        return processor
    except Exception:  # noqa: BLE001 - any failure means: keep the plain tokenizer
        return tokenizer


def make_tiny_pipeline(
    out: str | os.PathLike[str],
    family: str = "dev",
    seed: int = 0,
    double_blocks: int = 2,
    single_blocks: int = 2,
    heads: int = 2,
    head_dim: int = 16,
) -> Path:
    """Write a tiny random FLUX.2 pipeline in diffusers' save_pretrained layout.

    The transformer's size is configurable (benchmarks use a wider and deeper one than tests).

    The text encoder is narrow but deep enough (32 layers for dev, 28 for klein) that the family's real
    hidden-state layers apply, so tiny runs take the same code path as FLUX.2-dev and klein.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    hidden = 16
    torch.manual_seed(seed)
    text_encoder: Any
    if family == "klein":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=512,
                hidden_size=hidden,
                intermediate_size=32,
                num_hidden_layers=28,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
            )
        )
    elif family == "dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        config = Mistral3Config(
            text_config={
                "model_type": "mistral",
                "vocab_size": 512,
                "hidden_size": hidden,
                "intermediate_size": 32,
                "max_position_embeddings": 1024,
                "num_attention_heads": 2,
                "num_hidden_layers": 32,
                "num_key_value_heads": 1,
                "head_dim": 8,
                "rms_norm_eps": 1e-5,
                "sliding_window": None,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 3,
            },
            vision_config={
                "model_type": "pixtral",
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 32,
                "image_size": 32,
                "patch_size": 8,
                "num_channels": 3,
                "head_dim": 8,
            },
            image_token_index=8,
            spatial_merge_size=2,
        )
        text_encoder = Mistral3ForConditionalGeneration(config)
    else:
        raise ModelError(f"--family: unknown family {family!r} (dev or klein)")
    tokenizer = _tiny_tokenizer(family)
    if head_dim % 4:
        raise ModelError(f"head_dim: must be a multiple of 4 (rotary axes), got {head_dim}")
    torch.manual_seed(seed + 1)
    vae: Any = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Non-trivial batch-norm statistics so the latent normalisation is exercised.
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 1.5)
    torch.manual_seed(seed + 2)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=hidden * len(FAMILY_TEXT_LAYERS[family]),
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=family == "dev",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    if family == "klein":
        from diffusers import Flux2KleinPipeline

        pipe: Any = Flux2KleinPipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
    else:
        from diffusers import Flux2Pipeline

        pipe = Flux2Pipeline(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def quiet_libraries() -> None:
    """Our own progress bars are enough: silence the per-file bars of transformers and diffusers."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
