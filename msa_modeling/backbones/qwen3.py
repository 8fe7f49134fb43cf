"""Qwen3 backbone adapter: which Hugging Face pieces an MSA layer reuses, and what it rejects."""

from __future__ import annotations

from transformers import PreTrainedConfig, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .base import BackboneAdapter


def reject_sliding_window(config: PreTrainedConfig) -> None:
    """Qwen2/Qwen3 windows start at `max_window_layers` and are off in every released model,
    so they are rejected outright rather than checked batch by batch."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError(
            f"{config.model_type} config enables sliding-window attention (use_sliding_window / layer_types); "
            "MSA's document and query attention is full causal, so a window would be silently dropped. "
            "Set use_sliding_window=False."
        )


QWEN3 = BackboneAdapter(
    model_type="qwen3",
    config_class=Qwen3Config,
    causal_lm_class=Qwen3ForCausalLM,
    mlp=Qwen3MLP,
    rms_norm=Qwen3RMSNorm,
    rotary_embedding=Qwen3RotaryEmbedding,
    has_qk_norm=True,
    check_supported=reject_sliding_window,
)
