"""Backbone adapters, one file per decoder family."""

from __future__ import annotations

from .base import BackboneAdapter
from .qwen3 import QWEN3

BACKBONES: dict[str, BackboneAdapter] = {QWEN3.model_type: QWEN3}


def get_backbone(model_type: str) -> BackboneAdapter:
    """The adapter for a backbone `model_type`, or a `ValueError` listing the supported ones."""
    if model_type not in BACKBONES:
        raise ValueError(f"no MSA adapter for backbone model_type {model_type!r}; supported: {sorted(BACKBONES)}")
    return BACKBONES[model_type]


__all__ = ["BACKBONES", "BackboneAdapter", "get_backbone"]
