"""Model families by `model_type`: each builds its layer block on export/skeleton.py's shared graph."""
from __future__ import annotations

from .base import Family
from .gpt2 import GPT2
from .llama import LLAMA, MISTRAL, QWEN2

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2, LLAMA, MISTRAL, QWEN2)}


def family_for(model_type: str | None, what: str) -> Family:
    """The family of `model_type`, or ValueError naming what was given and what is supported."""
    if model_type not in FAMILIES:
        raise ValueError(f"{what} has model_type {model_type!r}; this exporter builds {', '.join(FAMILIES)} only, "
                         "so it is refused (nothing was written)")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "family_for"]
