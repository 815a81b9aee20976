"""Only safetensors: pickle-based files are refused by extension and by their first bytes, never opened with pickle."""

from __future__ import annotations

from pathlib import Path

from .errors import LoraFileError
from .resources import LORA_FILE

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(path: Path, field: str) -> None:
    """Raise unless `path` is a safetensors file, judged by its extension and its first bytes, never by loading it."""
    if not path.exists():
        raise LoraFileError(f"{field}: {path} does not exist")
    if not path.is_file():
        raise LoraFileError(f"{field}: {path} is not a file")
    why = "only safetensors files are read: pickle-based files can run arbitrary code when they are loaded"
    hint = "convert it to .safetensors first, in an environment you trust"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(
            f"{field}: {path} is a pickle-based {path.suffix} file, refused without opening it; {why}; {hint}"
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 9 or header_len < 2 or header_len > size - 8 or head[8:9] != b"{":
        if head[:1] == b"\x80":
            kind = "it holds a pickle"
        elif head[:4] == b"PK\x03\x04":
            kind = "it is a torch.save zip archive (pickle inside)"
        else:
            kind = "its first bytes are not a safetensors header"
        raise LoraFileError(f"{field}: {path} is not a safetensors file ({kind}), refused without unpickling; {why}")


def require_safetensors_folder(folder: Path, field: str) -> None:
    """A diffusers component folder must hold its weights as safetensors (diffusers falls back to pickle otherwise)."""
    weights = list(folder.glob("*.safetensors"))
    pickles = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES] if folder.is_dir() else []
    if not weights:
        found = f" (only {pickles[0].name})" if pickles else ""
        raise LoraFileError(
            f"{field}: {folder} has no .safetensors weights{found}; pickle-based weights are never loaded "
            "because unpickling can run arbitrary code; convert them to safetensors first"
        )
    for p in weights:
        require_safetensors(p, field)


def resolve_lora_path(spec: str | Path, field: str = "--lora") -> Path:
    """A LoRA file, or a run / checkpoint folder holding lora.safetensors."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / LORA_FILE).exists():
            return path / LORA_FILE
        raise LoraFileError(f"{field}: {path} is a folder without {LORA_FILE}; pass the LoRA file")
    require_safetensors(path, field)
    return path
