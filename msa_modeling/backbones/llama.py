"""Llama (2, 3.x) backbone adapter: the plain pre-norm layout every default of the adapter describes.

Llama 3.x's frequency-scaled RoPE (`rope_type: llama3`) lives in `LlamaRotaryEmbedding`.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .base import BackboneAdapter

LLAMA = BackboneAdapter(
    model_type="llama",
    config_class=LlamaConfig,
    causal_lm_class=LlamaForCausalLM,
    mlp=LlamaMLP,
    rms_norm=LlamaRMSNorm,
    rotary_embedding=LlamaRotaryEmbedding,
)
