"""The few per-layer steps inference composes, on top of the decoder layer's own seams.

Inference never re-implements layer math: it calls `input_layernorm`, `self_attn.project`,
the router projections, `self_attn.o_proj`, `feed_forward`, `model.model.norm` and
`lm_head`. What a backbone port changes about how these pieces combine (an extra norm on
the attention output, scaled embeddings) belongs in this file only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def embed_tokens(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of `input_ids` [B, L] -> [B, L, hidden]."""
    return model.model.embed_tokens(input_ids)


def attention_residual(layer: nn.Module, hidden_states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The layer's output given its input and the attention result [B, L, H, D] (before o_proj)."""
    batch, length = attended.shape[:2]
    return layer.feed_forward(hidden_states + layer.self_attn.o_proj(attended.reshape(batch, length, -1)))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Grouped-query attention on [B, L, heads, D] tensors; `mask` [L, K] bool (True = visible)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2)


def final_logits(model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Next-token logits (fp32) of hidden states [..., hidden]."""
    return model.lm_head(model.model.norm(hidden_states)).float()
