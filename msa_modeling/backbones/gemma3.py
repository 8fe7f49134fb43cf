"""Gemma 3 (text) backbone adapter.

Gemma 2's layer (see `gemma2.py`: (1 + w) RMSNorm, sandwich norms, scaled embeddings,
query_pre_attn_scalar) plus per-head q/k norms, and two RoPEs: local (sliding-window) layers
use `rope_parameters["sliding_attention"]` (base 10K), global layers
`rope_parameters["full_attention"]` (base 1M, linearly scaled in the 4B+ models). Five local
layers (window 1024 in the released models) alternate with one global layer; MSA checks every
batch against the window. Soft-capping is off in the released configs but honoured if set.

The adapter is for `model_type: gemma3_text` (`Gemma3ForCausalLM`). The multimodal
`gemma3` checkpoints (4B and up) nest the text model under `language_model`; export the
text model first (see docs/PORTING.md).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm, Gemma3RotaryEmbedding

from .base import FULL_ATTENTION, SLIDING_ATTENTION, BackboneAdapter, config_layer_types, set_if_uninitialised
from .gemma2 import init_unit_norms, reject_bidirectional_attention


class LayerTypeRotaryEmbedding(nn.Module):
    """Gemma 3's rotary embedding fixed to one layer type, with the `(x, position_ids)` convention."""

    def __init__(self, config: Gemma3TextConfig, layer_type: str) -> None:
        super().__init__()
        self.rotary = Gemma3RotaryEmbedding(config)
        self.layer_type = layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, self.layer_type)


def init_module(module: nn.Module) -> None:
    """Gemma's (1 + w) norms, and the per-layer-type RoPE buffers, which are not saved and which
    the generic Hugging Face init does not recognise (it knows one `inv_freq` per module)."""
    init_unit_norms(module)
    if isinstance(module, Gemma3RotaryEmbedding):
        for layer_type, rope_type in module.rope_type.items():
            compute = (
                module.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
            )
            inv_freq, _ = compute(module.config, layer_type=layer_type)
            set_if_uninitialised(getattr(module, f"{layer_type}_inv_freq"), inv_freq)
            set_if_uninitialised(getattr(module, f"{layer_type}_original_inv_freq"), inv_freq)


GEMMA3 = BackboneAdapter(
    model_type="gemma3_text",
    config_class=Gemma3TextConfig,
    causal_lm_class=Gemma3ForCausalLM,
    mlp=Gemma3MLP,
    rms_norm=Gemma3RMSNorm,
    rotary_embedding=lambda config: LayerTypeRotaryEmbedding(config, FULL_ATTENTION),
    local_rotary_embedding=lambda config: LayerTypeRotaryEmbedding(config, SLIDING_ATTENTION),
    has_qk_norm=True,
    query_scale=lambda config: config.query_pre_attn_scalar**-0.5,
    attn_logit_softcap=lambda config: config.attn_logit_softcapping,
    final_logit_softcap=lambda config: config.final_logit_softcapping,
    embedding_scale=lambda config: config.hidden_size**0.5,
    sandwich_norms=True,
    layer_types=config_layer_types,
    sliding_window=lambda config: config.sliding_window,
    check_supported=reject_bidirectional_attention,
    init_weights=init_module,
)
