"""LoRA files in the layouts other FLUX.2 tools use: read any, write ours in theirs, merge, start training from one.

  (flux2_lora/safety.py: only safetensors; pickle-based files are refused unopened)
  layouts.py   the in-memory form, each layout's names, reading any layout
  write.py     writing ours in theirs (diffusers, comfyui, kohya): the tensors, the header, the file
  lycoris.py   LoKr and LoHa files (lora.type: lokr | loha): reading their factors, loading them through PEFT
  fit.py       which model a LoRA fits, train --init-lora, lora inspect
  merge.py     export --merge

The `export` and `lora inspect` commands are flux2_lora/commands/interop.py (docs/interop.md).

Every LoRA is read into one form: a dict from diffusers module names (`transformer_blocks.0.attn.to_q`) to a
`LoraModule` (down = A of shape (r, in), up = B of shape (out, r), alpha; the update is alpha / r * B @ A).

Layouts (`FORMATS`):
  diffusers   `transformer.<module>.lora_A/B.weight` + `lora_adapter_metadata` (what training writes)
  peft        `base_model.model.<module>.lora_A/B.weight` (PEFT's save_pretrained) or bare PEFT names
  comfyui     `diffusion_model.<BFL name>.lora_A/B.weight`: FLUX.2's original block names, where the double
              blocks' q, k and v live in one fused `qkv` linear (what ComfyUI and BFL's code load)
  ai-toolkit  `diffusion_model.` keys as ai-toolkit writes them (BFL names, or diffusers names under that prefix)
  kohya       `lora_unet_<BFL name with _>.lora_down/lora_up.weight` + `.alpha` (sd-scripts, musubi-tuner)
  lycoris     `lycoris_<diffusers name with _>.lokr_w1`, ... (SimpleTuner's LoKr/LoHa); LoKr and LoHa factors are read
              under the other prefixes too, into `LoraFile.lycoris` (see lycoris.py)

Fused qkv: separate q, k, v factors (A_q, B_q), ... become one fused pair with A = [A_q; A_k; A_v] stacked
(rank 3r) and B block-diagonal (B_q, B_k, B_v on the diagonal, zeros elsewhere), so B @ A = [B_q A_q; B_k A_k;
B_v A_v]: exactly the three separate updates. The alpha goes with the larger rank (kohya: alpha x 3, so
alpha / rank is unchanged; comfyui files carry no alpha, the scale is multiplied into B). Reading a fused
file splits it back: block-diagonal B gives the three rank-r pairs again, any other B gives q, k, v that
share the fused A (also exact).

Only safetensors are read. A pickle-based file (.bin/.pt/.pth/.ckpt, or bytes that are not safetensors) is
refused before anything in it is loaded: unpickling can run arbitrary code. Every LoRA read in the product goes
through `layouts.scan_lora_file` (export, --merge, lora inspect, train --init-lora, the eval commands): a file
with a NaN/inf tensor or a non-finite alpha is refused in one line naming the file and the first bad tensor.

Writing (export, --merge) goes to a temporary file or folder beside the output, renamed into place when
complete: a failed write leaves nothing behind, and an existing output is replaced only with --overwrite.
"""

from ..safety import PICKLE_SUFFIXES, LoraFileError, require_safetensors, require_safetensors_folder, resolve_lora_path
from .fit import (
    TINY_TRANSFORMER,
    apply_init_lora,
    check_family,
    check_fits,
    check_init_lora,
    format_inspect,
    inspect_lora,
    known_models,
    linear_shapes,
    misfits,
    model_config,
)
from .layouts import (
    ADAPTER_METADATA_KEY,
    EXPORT_FORMATS,
    FORMATS,
    LoraFile,
    LoraModule,
    bfl_from_kohya,
    check_alpha_metadata,
    check_finite,
    describe_targets,
    detect_format,
    from_bfl,
    kohya_stem,
    load_lora,
    parse_lora,
    scan_lora_file,
    split_fused,
    to_bfl,
)
from .lycoris import LycorisModule, load_into
from .merge import MERGE_INFO, check_output_folder, merge_lora
from .write import (
    EXPORT_DTYPES,
    adapter_config,
    check_output_file,
    convert_tensors,
    export_lora,
    export_metadata,
    fuse,
    require_plain,
    write_lora,
)

__all__ = [
    "ADAPTER_METADATA_KEY",
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "FORMATS",
    "MERGE_INFO",
    "PICKLE_SUFFIXES",
    "TINY_TRANSFORMER",
    "LoraFile",
    "LoraFileError",
    "LoraModule",
    "LycorisModule",
    "adapter_config",
    "apply_init_lora",
    "bfl_from_kohya",
    "check_alpha_metadata",
    "check_family",
    "check_finite",
    "check_fits",
    "check_init_lora",
    "check_output_file",
    "check_output_folder",
    "convert_tensors",
    "describe_targets",
    "detect_format",
    "export_lora",
    "export_metadata",
    "format_inspect",
    "from_bfl",
    "fuse",
    "inspect_lora",
    "known_models",
    "kohya_stem",
    "linear_shapes",
    "load_into",
    "load_lora",
    "merge_lora",
    "misfits",
    "model_config",
    "parse_lora",
    "require_plain",
    "require_safetensors",
    "require_safetensors_folder",
    "resolve_lora_path",
    "scan_lora_file",
    "split_fused",
    "to_bfl",
    "write_lora",
]
