"""Backbone adapters, one file per decoder family."""

from __future__ import annotations

from .base import BackboneAdapter
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3

BACKBONES: dict[str, BackboneAdapter] = {
    adapter.model_type: adapter for adapter in (QWEN3, QWEN2, LLAMA, MISTRAL, GEMMA2, GEMMA3)
}


def get_backbone(model_type: str) -> BackboneAdapter:
    """The adapter for a backbone `model_type`, or a `ValueError` listing the supported ones."""
    if model_type not in BACKBONES:
        raise ValueError(f"no MSA adapter for backbone model_type {model_type!r}; supported: {sorted(BACKBONES)}")
    return BACKBONES[model_type]


__all__ = ["BACKBONES", "BackboneAdapter", "get_backbone"]
