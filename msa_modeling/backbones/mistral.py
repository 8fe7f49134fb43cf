"""Mistral backbone adapter: Llama's layer, bias-free, with an optional window on every layer.

Mistral 7B v0.1 attends within a 4096-token window; v0.2 and later set `sliding_window: null`.
MSA accepts the window as long as no batch makes it bind (see `BackboneAdapter.sliding_window`).
"""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM, PreTrainedConfig
from transformers.models.mistral.modeling_mistral import MistralMLP, MistralRMSNorm, MistralRotaryEmbedding

from .base import SLIDING_ATTENTION, BackboneAdapter, all_full_attention


def _layer_types(config: PreTrainedConfig) -> list[str]:
    if getattr(config, "sliding_window", None) is None:
        return all_full_attention(config)
    return [SLIDING_ATTENTION] * config.num_hidden_layers


MISTRAL = BackboneAdapter(
    model_type="mistral",
    config_class=MistralConfig,
    causal_lm_class=MistralForCausalLM,
    mlp=MistralMLP,
    rms_norm=MistralRMSNorm,
    rotary_embedding=MistralRotaryEmbedding,
    qkv_bias=lambda config: False,
    o_proj_bias=lambda config: False,
    layer_types=_layer_types,
    sliding_window=lambda config: getattr(config, "sliding_window", None),
)
