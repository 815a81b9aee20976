"""Caption tokens: counting them with any Hugging Face tokenizer, and a FLUX.2 folder's tokenizer with the tokens its
prompt template takes (what `data validate --model` and `data analyze --model` count against)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of text alone (no special tokens) with any Hugging Face tokenizer or processor."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    if callable(tok):
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok.encode(text, add_special_tokens=False)
    return len(ids)


def prompt_overhead(tokenizer: Any, family: str) -> int:
    """Tokens the family's prompt template (system message, chat markers) takes from max_sequence_length; 0 if unknown."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not getattr(tok, "chat_template", None):
        return 0
    try:
        if family == "klein":
            messages = [{"role": "user", "content": ""}]
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
            return len(tok(text)["input_ids"])
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        out = tok.apply_chat_template(format_input([""], SYSTEM_MESSAGE), tokenize=True, return_dict=True)
        ids = out["input_ids"]
        return len(ids[0] if ids and isinstance(ids[0], list) else ids)
    except Exception:  # any tokenizer without a usable chat template: count the caption alone
        return 0


def load_tokenizer(model: str | os.PathLike[str]) -> tuple[Any, int]:
    """The tokenizer of a diffusers FLUX.2 folder and the tokens its prompt template takes (UsageError on failure)."""
    from ..errors import UsageError

    path = Path(model)
    if not (path / "tokenizer").is_dir():
        raise UsageError(f"--model: {path / 'tokenizer'} does not exist (expected a diffusers FLUX.2 folder)")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    except Exception as e:
        raise UsageError(f"--model: cannot load {path / 'tokenizer'} ({type(e).__name__}: {e})") from None
    family = "dev"
    try:
        if "klein" in json.loads((path / "model_index.json").read_text()).get("_class_name", "").lower():
            family = "klein"
    except (OSError, ValueError, AttributeError):
        pass
    return tokenizer, prompt_overhead(tokenizer, family)
