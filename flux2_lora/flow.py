"""The FLUX.2 flow-matching objective, piece by piece.

Prompts and latents are encoded exactly as diffusers' Flux2Pipeline / Flux2KleinPipeline encode them
(tests compare each function with the pipeline's own on the same inputs):

  prompt  -> chat template -> text encoder -> hidden states of the family's layers, stacked (B, L, 3*D)
  image   -> VAE latent_dist.mode() -> 2x2 patchify -> batch-norm normalise -> pack (B, H*W, C)
  ids     -> text (0, 0, 0, l), image (0, h, w, 0)
  noise   -> x_t = (1 - sigma) * x0 + sigma * eps,  target = eps - x0,  transformer timestep = sigma
  sigma   -> drawn per sample (`sample_sigmas`), optionally shifted towards noise (`shift_sigmas`: a fixed shift, or
             FLUX.2's resolution-dependent one, the pipeline's compute_empirical_mu and the scheduler's time shift)
  loss    -> squared error, mean over channels and tokens; with a loss mask (data/masks.py) the tokens' mean
             weighted by it (`flow_loss`)

Editing (reference images, `Flux2Pipeline(image=[...])`): each reference is scaled down to the pixel limit if larger,
its sides floored to multiples of 16 and center-cropped (`reference_pixels`), encoded like an image, packed, and its
tokens concatenated after the noisy target tokens, without noise, with ids (10 + 10 i, h, w, 0) for reference i
(`reference_ids`). The prediction is cut back to the target tokens; the loss is taken on those only.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .config import RecipeError


def encode_prompts(
    family: str,
    text_encoder: Any,
    tokenizer: Any,
    prompts: list[str],
    layers: tuple[int, ...],
    max_sequence_length: int,
) -> torch.Tensor:
    """Prompt embeddings (B, L, len(layers) * hidden) as the family's pipeline computes them."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    n_layers = _text_encoder_layers(text_encoder)
    if max(layers) > n_layers:
        raise RecipeError(
            f"model.text_encoder_layers: layer {max(layers)} requested but the text encoder has {n_layers} layers"
        )
    with torch.no_grad():
        if family == "klein":
            return Flux2KleinPipeline._get_qwen3_prompt_embeds(
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                prompt=prompts,
                max_sequence_length=max_sequence_length,
                hidden_states_layers=list(layers),
            )
        return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            prompt=prompts,
            max_sequence_length=max_sequence_length,
            hidden_states_layers=list(layers),
        )


def _text_encoder_layers(text_encoder: Any) -> int:
    cfg = text_encoder.config
    cfg = getattr(cfg, "text_config", cfg)
    return int(cfg.num_hidden_layers)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), 2x2 patches in FLUX.2's channel order."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def normalize_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Patchified latents normalised by the VAE's batch-norm running statistics."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    return (latents - mean) / std


def encode_images(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1], (B, 3, H, W) -> normalised patchified latents (B, 4C, H/16, W/16)."""
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return normalize_latents(vae, patchify(latents))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def latent_ids(batch: int, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """4-D position ids (T, H, W, L) = (0, h, w, 0) for an (H, W) latent grid, shape (B, H*W, 4)."""
    t, l = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    ids = torch.cartesian_prod(t, torch.arange(height), torch.arange(width), l)
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


def text_ids(batch: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """4-D position ids (0, 0, 0, l) for L text tokens, shape (B, L, 4)."""
    z = torch.zeros(1, dtype=torch.long)
    ids = torch.cartesian_prod(z, z, z, torch.arange(length))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


# The pipeline's default pixel limit for a reference image (Flux2Pipeline scales larger `image=` inputs down to it).
REFERENCE_PIXELS = 1024 * 1024
_MULTIPLE = 16  # VAE downsampling x patch: reference sides are floored to it, as the pipeline does


def reference_pixels(image: Any, max_pixels: int = REFERENCE_PIXELS) -> torch.Tensor:
    """A reference image (PIL) as the FLUX.2 pipelines prepare an `image=` input: (1, 3, H, W) in [-1, 1].

    Larger than max_pixels: scaled to that area (the pipeline's `_resize_to_target_area`); then the sides are
    floored to multiples of 16 and the image is center-crop resized to them (`preprocess(resize_mode="crop")`)."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    if image.width * image.height > max_pixels:
        image = Flux2ImageProcessor._resize_to_target_area(image, max_pixels)
    width, height = reference_size(image.width, image.height, max_pixels)
    processor = Flux2ImageProcessor(vae_scale_factor=_MULTIPLE)
    return processor.preprocess(image, height=height, width=width, resize_mode="crop")


def reference_size(width: int, height: int, max_pixels: int = REFERENCE_PIXELS) -> tuple[int, int]:
    """The pixel size (width, height) a reference of this size is encoded at (see reference_pixels)."""
    import math

    if width * height > max_pixels:  # the pipeline's _resize_to_target_area
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width // _MULTIPLE * _MULTIPLE, height // _MULTIPLE * _MULTIPLE


def reference_ids(shapes: list[tuple[int, int]], batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Position ids (10 + 10 i, h, w, 0) of the references' tokens, from the pipeline's own `_prepare_image_ids`.

    shapes: each reference's latent grid (H, W), in order. Returns (B, sum of H*W, 4)."""
    from diffusers import Flux2Pipeline

    grids = [torch.empty(1, 1, h, w) for h, w in shapes]
    return Flux2Pipeline._prepare_image_ids(grids).expand(batch, -1, -1).to(device)


def pack_references(references: list[torch.Tensor]) -> torch.Tensor:
    """References' latents [(B, C, H_i, W_i), ...] -> their tokens one after another, (B, sum H_i*W_i, C)."""
    return torch.cat([pack(r) for r in references], dim=1)


def sample_sigmas(
    batch: int,
    scheme: str,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Sigma in (0, 1) per sample from diffusers' SD3 densities (uniform, logit_normal, mode).

    `sigmoid` (the name musubi-tuner, ai-toolkit and SimpleTuner use) is sigmoid(N(logit_mean, logit_std)): the same
    density as logit_normal, drawn by the same diffusers function, so the same generator gives the same sigmas."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if scheme not in ("uniform", "logit_normal", "mode", "sigmoid"):
        raise ValueError(f"training.timestep_sampling: unknown scheme {scheme!r}")
    u = compute_density_for_timestep_sampling(
        weighting_scheme="logit_normal" if scheme == "sigmoid" else scheme,
        batch_size=batch,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
    )
    # Keep away from the exact ends, where x_t is pure data or pure noise.
    return u.clamp(1e-4, 1.0 - 1e-4)


# `timestep_shift: auto` evaluates compute_empirical_mu at the FLUX.2 pipelines' default number of inference steps
# (Flux2Pipeline and Flux2KleinPipeline both default num_inference_steps to 50): training then sees sigmas shifted as
# the default sampling schedule is at that resolution. Above 4300 tokens (~1050 x 1050 px) mu does not depend on it.
AUTO_SHIFT_STEPS = 50


def auto_shift_mu(image_seq_len: int, num_steps: int = AUTO_SHIFT_STEPS) -> float:
    """FLUX.2's resolution-dependent mu for a latent grid of `image_seq_len` tokens ((H/16) * (W/16) of the image):
    the pipeline's own `compute_empirical_mu`, the value Flux2Pipeline passes to the scheduler at inference."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def shift_sigmas(sigmas: torch.Tensor, shift: str | float, image_seq_len: int) -> torch.Tensor:
    """Sigmas moved towards noise by training.timestep_shift: `none` returns them unchanged (the same tensor); a number
    s gives sigma' = s*sigma / (1 + (s - 1)*sigma) (the scheduler's static `shift`); `auto` uses s = exp(mu) with mu =
    auto_shift_mu(image_seq_len), which is the scheduler's exponential time shift exp(mu) / (exp(mu) + 1/sigma - 1)
    (numerator and denominator times sigma), as FlowMatchEulerDiscreteScheduler applies it for the pipeline's mu."""
    if shift == "none":
        return sigmas
    s = math.exp(auto_shift_mu(image_seq_len)) if shift == "auto" else float(shift)
    return (s * sigmas / (1.0 + (s - 1.0) * sigmas)).clamp(1e-4, 1.0 - 1e-4)


def loss_weights(sigmas: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-sample loss weights (diffusers' SD3 weightings: none, sigma_sqrt, cosmap)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation x_t = (1 - sigma) x0 + sigma * noise (sigma broadcast per sample)."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def frozen_dtype(model: torch.nn.Module) -> torch.dtype:
    """Dtype of the frozen base weights (LoRA weights are kept in fp32 and may differ)."""
    return next(p for p in model.parameters() if not p.requires_grad).dtype


def predict(
    transformer: Any,
    noisy: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None,
    references: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer's prediction (B, H*W, C) for the noisy target latents (B, C, H, W), as the pipeline calls
    it: clean reference tokens (B, N, C) after the target's, the prediction cut back to the target's tokens."""
    model_dtype = frozen_dtype(transformer)
    hidden = pack(noisy)
    tokens = hidden.shape[1]
    if references is not None:  # clean reference tokens after the noisy target's, as the pipeline's denoising loop
        hidden = torch.cat([hidden, references.to(hidden.dtype)], dim=1)
    return transformer(
        hidden_states=hidden.to(model_dtype),
        encoder_hidden_states=prompt_embeds.to(model_dtype),
        timestep=sigmas.to(model_dtype),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0][:, :tokens]


MASK_AREA_MIN = 1e-6  # a mask's area (the sum of its weights, in tokens) is clamped to this: all zeros give 0


def flow_loss(
    transformer: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None,
    weighting: str = "none",
    reduce: bool = True,
    references: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss for one batch.

    latents: (B, C, H, W) normalised patchified latents, all of one size; noise like latents;
    sigmas: (B,). references: packed reference tokens (B, N, C) (`pack_references`) or None; img_ids then covers
    the target's tokens followed by the references' (`latent_ids` then `reference_ids`). target: packed target
    tokens (B, H*W, C) to regress to instead of noise - latents (a regularisation sample trained towards the base
    model's prediction). Returns the mean weighted MSE between the prediction on the target tokens and the target
    (or per-sample losses when reduce=False).
    mask: loss weights (B, H, W) in 0..1 on the latent grid (data/masks.py) or None: each token's squared error
    (mean over channels) is weighted by its mask value (`pack`'s token order: row by row) and a sample's sum is
    divided by its mask's sum (clamped to MASK_AREA_MIN), so a masked sample's loss is its mean over the masked area.
    """
    noisy = add_noise(latents, noise, sigmas)
    if target is None:
        target = pack(noise - latents)
    pred = predict(transformer, noisy, prompt_embeds, sigmas, img_ids, txt_ids, guidance, references)
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is None:
        per_sample = error.mean(dim=(1, 2))
    else:
        weights = mask.reshape(mask.shape[0], -1).to(error.device, error.dtype)  # (B, H*W) in token order
        per_sample = (error.mean(dim=2) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=MASK_AREA_MIN)
    per_sample = per_sample * loss_weights(sigmas, weighting).to(per_sample.device)
    return per_sample.mean() if reduce else per_sample


@torch.no_grad()
def base_target(
    transformer: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None,
    references: torch.Tensor | None,
    regularisation: torch.Tensor,
) -> torch.Tensor:
    """Packed targets (B, H*W, C) of a batch: for a regularisation sample the base model's own prediction (the
    LoRA's adapters disabled on the unwrapped `transformer`) for its noisy input, for the others noise - latents
    (data.prior_target: base, prior preservation towards what the model did before the LoRA)."""
    transformer.disable_adapters()
    try:
        noisy = add_noise(latents, noise, sigmas)
        base = predict(transformer, noisy, prompt_embeds, sigmas, img_ids, txt_ids, guidance, references)
    finally:
        transformer.enable_adapters()
    return torch.where(regularisation.view(-1, 1, 1), base.float(), pack(noise - latents).float())
