"""Qwen2 / Qwen2.5 backbone adapter: Llama's layer with biased q/k/v (but not o) projections."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding

from .base import BackboneAdapter
from .qwen3 import reject_sliding_window

QWEN2 = BackboneAdapter(
    model_type="qwen2",
    config_class=Qwen2Config,
    causal_lm_class=Qwen2ForCausalLM,
    mlp=Qwen2MLP,
    rms_norm=Qwen2RMSNorm,
    rotary_embedding=Qwen2RotaryEmbedding,
    qkv_bias=lambda config: True,
    o_proj_bias=lambda config: False,
    check_supported=reject_sliding_window,
)
