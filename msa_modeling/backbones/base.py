"""What an MSA model needs to know about a backbone family.

An adapter is data: the Hugging Face classes MSA reuses (MLP, RMSNorm, rotary embedding)
and small functions of the backbone config that say how the family's attention and
decoder layer differ from the plain pre-norm Llama layout. `docs/PORTING.md` walks
through writing one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def attention_bias(config: PreTrainedConfig) -> bool:
    """The usual `attention_bias` switch, shared by q/k/v/o (Llama, Qwen3, Gemma)."""
    return bool(getattr(config, "attention_bias", False))


def no_value(config: PreTrainedConfig) -> None:
    return None


def all_full_attention(config: PreTrainedConfig) -> list[str]:
    return [FULL_ATTENTION] * config.num_hidden_layers


def config_layer_types(config: PreTrainedConfig) -> list[str]:
    """The backbone config's own `layer_types` (Gemma 2/3, Qwen2/3), all full when it has none."""
    return list(getattr(config, "layer_types", None) or all_full_attention(config))


def accept_everything(config: PreTrainedConfig) -> None:
    return None


def no_extra_init(module: nn.Module) -> None:
    return None


def set_if_uninitialised(tensor: torch.Tensor, value: torch.Tensor | float) -> None:
    """Fill `tensor` unless Hugging Face's loader has already filled it from a checkpoint."""
    if not getattr(tensor, "_is_hf_initialized", False):
        with torch.no_grad():
            if isinstance(value, torch.Tensor):
                tensor.copy_(value)
            else:
                tensor.fill_(value)


@dataclass(frozen=True)
class BackboneAdapter:
    """One decoder family: its config and causal-LM classes and the modules MSA reuses.

    Attributes:
        model_type: the backbone's Hugging Face `model_type`.
        config_class / causal_lm_class: the backbone's Hugging Face classes.
        mlp: `mlp(config)` builds a decoder layer's feed-forward block.
        rms_norm: `rms_norm(dim, eps=...)` builds the family's RMSNorm (Gemma's scales by 1 + w).
        rotary_embedding: `rotary_embedding(config)`, called as `(x, position_ids) -> (cos, sin)`;
            the RoPE of full-attention layers (and of every layer without `local_rotary_embedding`).
        local_rotary_embedding: the RoPE of sliding-window layers when it differs (Gemma 3's
            local base frequency), same calling convention; `None`: layers share one RoPE.
        has_qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3).
        qkv_bias / o_proj_bias: whether q/k/v and o projections have a bias (Qwen2: q/k/v only).
        query_scale: softmax scale of q.k; `None` for head_dim**-0.5 (Gemma: query_pre_attn_scalar**-0.5).
        attn_logit_softcap: `c` of `c * tanh(scores / c)` on attention scores, or `None` (Gemma 2).
        final_logit_softcap: the same on the LM logits, or `None` (Gemma 2).
        embedding_scale: factor on the token embeddings, or `None` (Gemma: sqrt(hidden_size),
            rounded to the embedding dtype).
        sandwich_norms: Gemma 2/3 layers: the attention output goes through
            `post_attention_layernorm` before the residual add, and the MLP sits between
            `pre_feedforward_layernorm` and `post_feedforward_layernorm`.
        layer_types: `FULL_ATTENTION` or `SLIDING_ATTENTION` per layer.
        sliding_window: the window of sliding layers, in tokens (each token sees itself and
            the window - 1 tokens before it). MSA accepts it only where it never binds.
        check_supported: raises `ValueError` for config features MSA cannot honour.
        init_weights: runs on every module after the generic Hugging Face initialisation
            (random init, and non-persistent buffers after `from_pretrained`): for what that
            init gets wrong for the family, e.g. Gemma's (1 + w) norms start at w = 0.
    """

    model_type: str
    config_class: type[PreTrainedConfig]
    causal_lm_class: type[PreTrainedModel]
    mlp: Callable[[PreTrainedConfig], nn.Module]
    rms_norm: Callable[..., nn.Module]
    rotary_embedding: Callable[[PreTrainedConfig], nn.Module]
    local_rotary_embedding: Callable[[PreTrainedConfig], nn.Module] | None = None
    has_qk_norm: bool = False
    qkv_bias: Callable[[PreTrainedConfig], bool] = attention_bias
    o_proj_bias: Callable[[PreTrainedConfig], bool] = attention_bias
    query_scale: Callable[[PreTrainedConfig], float | None] = no_value
    attn_logit_softcap: Callable[[PreTrainedConfig], float | None] = no_value
    final_logit_softcap: Callable[[PreTrainedConfig], float | None] = no_value
    embedding_scale: Callable[[PreTrainedConfig], float | None] = no_value
    sandwich_norms: bool = False
    layer_types: Callable[[PreTrainedConfig], list[str]] = all_full_attention
    sliding_window: Callable[[PreTrainedConfig], int | None] = no_value
    check_supported: Callable[[PreTrainedConfig], None] = accept_everything
    init_weights: Callable[[nn.Module], None] = no_extra_init

    def sliding_windows(self, config: PreTrainedConfig) -> dict[int, int]:
        """{layer index: window} for the layers whose attention is windowed."""
        window = self.sliding_window(config)
        if window is None:
            return {}
        return {i: int(window) for i, kind in enumerate(self.layer_types(config)) if kind == SLIDING_ATTENTION}
