"""The few per-layer steps inference composes, on top of the decoder layer's own seams.

Inference never re-implements layer math: it calls the model's embedding (and its scale),
`rotary_emb` / `rotary_emb_local`, `input_layernorm`, `self_attn.project`, the router
projections, `self_attn.o_proj`, `attention_residual`, `feed_forward`, `model.model.norm`
and `compute_logits`. Only the attention itself runs here, over inference's own key sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..attention import softcapped_attention

# cuDNN's attention builds an execution plan per key length, about 3 ms of host time for a
# kernel of a few microseconds; a decode step grows the key length every token, so with cuDNN
# among the candidates a 20-layer step cost 80 ms (experiments/results/gpu_decode_profile.txt).
_SDPA_BACKENDS_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def embed_tokens(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of `input_ids` [B, L] -> [B, L, hidden], scaled where the backbone scales them."""
    hidden = model.model.embed_tokens(input_ids)
    scale = getattr(model.model, "embedding_scale", None)
    return hidden if scale is None else hidden * torch.tensor(scale).to(hidden.dtype)


def rotary_tables(
    model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) of every layer for `positions` [B, L]: local RoPE where a layer uses it (Gemma 3)."""
    global_rope = model.model.rotary_emb(hidden, positions)
    local_module = getattr(model.model, "rotary_emb_local", None)
    local_rope = local_module(hidden, positions) if local_module is not None else None
    return [
        local_rope if getattr(layer.self_attn, "uses_local_rope", False) else global_rope
        for layer in model.model.layers
    ]


def attention_residual(layer: nn.Module, hidden_states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The layer's output given its input and the attention result [B, L, H, D] (before o_proj)."""
    batch, length = attended.shape[:2]
    attention_output = layer.self_attn.o_proj(attended.reshape(batch, length, -1))
    return layer.after_attention(hidden_states, attention_output)


def attend(
    layer: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """The layer's grouped-query attention on [B, L, heads, D] tensors; `mask` [L, K] bool (True = visible)."""
    attention = layer.self_attn
    window = getattr(attention, "sliding_window", None)
    if window is not None and k.shape[1] > window:
        # Training rejects batches where a window binds (MSA attends over whole segments).
        raise ValueError(
            f"layer {attention.layer_idx}: {k.shape[1]} key slots exceed its {window}-token sliding window"
        )
    softcap = getattr(attention, "softcap", None)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if softcap is None:
        with sdpa_kernel(_SDPA_BACKENDS_WITHOUT_CUDNN):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=attention.scaling, enable_gqa=True
            )
        return out.transpose(1, 2)
    # SDPA has no logit soft-cap (Gemma 2): training's explicit-score attention, so that both
    # round the scores alike.
    if is_causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    elif mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    return softcapped_attention(q, k, v, mask, attention.scaling, softcap).transpose(1, 2)


def final_logits(model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Next-token logits (fp32) of hidden states [..., hidden] (soft-capped where the backbone caps them)."""
    normed = model.model.norm(hidden_states)
    compute = getattr(model, "compute_logits", model.lm_head)
    return compute(normed).float()
