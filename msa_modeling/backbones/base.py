"""What an MSA model needs to know about a backbone family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class BackboneAdapter:
    """One decoder family: its config and causal-LM classes and the modules MSA reuses.

    Attributes:
        model_type: the backbone's Hugging Face `model_type`.
        mlp: `mlp(config)` builds a decoder layer's feed-forward block.
        rms_norm: `rms_norm(dim, eps=...)` builds the family's RMSNorm.
        rotary_embedding: `rotary_embedding(config)`; called as `(x, position_ids) -> (cos, sin)`.
        has_qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
        check_supported: raises `ValueError` for config features MSA cannot honour.
    """

    model_type: str
    config_class: type[PreTrainedConfig]
    causal_lm_class: type[PreTrainedModel]
    mlp: Callable[[PreTrainedConfig], nn.Module]
    rms_norm: Callable[..., nn.Module]
    rotary_embedding: Callable[[PreTrainedConfig], nn.Module]
    has_qk_norm: bool
    check_supported: Callable[[PreTrainedConfig], None]
