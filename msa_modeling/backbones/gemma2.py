"""Gemma 2 backbone adapter.

What differs from Llama (read from Hugging Face's `modeling_gemma2.py`):
- RMSNorm scales by (1 + w), and every layer has four norms: the attention output is normed
  before its residual add, and the MLP is wrapped in pre/post norms (`sandwich_norms`);
- token embeddings are multiplied by sqrt(hidden_size), rounded to the embedding dtype;
- q.k is scaled by query_pre_attn_scalar**-0.5, not head_dim**-0.5;
- attention scores are soft-capped at `attn_logit_softcapping` (50), LM logits at
  `final_logit_softcapping` (30): c * tanh(x / c);
- layers alternate sliding-window (4096) and global attention; MSA checks every batch
  against the window.
"""

from __future__ import annotations

from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP, Gemma2RMSNorm, Gemma2RotaryEmbedding

from .base import BackboneAdapter, config_layer_types, set_if_uninitialised


def reject_bidirectional_attention(config: PreTrainedConfig) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(
            f"{config.model_type} config sets use_bidirectional_attention (an encoder variant); "
            "MSA needs a causal decoder"
        )


def init_unit_norms(module: nn.Module) -> None:
    """Gemma's RMSNorm scales by (1 + w): the identity is w = 0, not the generic init's w = 1."""
    if "RMSNorm" in type(module).__name__:
        set_if_uninitialised(module.weight, 0.0)


GEMMA2 = BackboneAdapter(
    model_type="gemma2",
    config_class=Gemma2Config,
    causal_lm_class=Gemma2ForCausalLM,
    mlp=Gemma2MLP,
    rms_norm=Gemma2RMSNorm,
    rotary_embedding=Gemma2RotaryEmbedding,
    query_scale=lambda config: config.query_pre_attn_scalar**-0.5,
    attn_logit_softcap=lambda config: config.attn_logit_softcapping,
    final_logit_softcap=lambda config: config.final_logit_softcapping,
    embedding_scale=lambda config: config.hidden_size**0.5,
    sandwich_norms=True,
    layer_types=config_layer_types,
    sliding_window=lambda config: config.sliding_window,
    check_supported=reject_bidirectional_attention,
    init_weights=init_unit_norms,
)
