"""Chunk pooling, document scoring and top-k selection (spec section 3, steps 2-4)."""

from __future__ import annotations

import torch

from .layout import PackedLayout


def _per_row(x: torch.Tensor, dims: int) -> torch.Tensor:
    """A [C] or [C, P] tensor shaped to broadcast against [C, (P,) *features] with `dims` feature dims."""
    return x.view(*x.shape, *([1] * dims))


class _ChunkMean(torch.autograd.Function):
    """Mean over each chunk's tokens, which are consecutive in the flat token order.

    Forward gathers every chunk as a [C, P] block (padding masked to zero) and sums in fp32;
    backward hands each document token its chunk's gradient / length. Both are plain gathers:
    autograd's versions of a scatter-add pooling run atomics or a sort on the GPU.
    """

    @staticmethod
    def forward(ctx, token_states, layout: PackedLayout):
        features = token_states.dim() - 1
        slots = torch.arange(layout.chunk_size, device=token_states.device)
        token_index = (layout.chunk_first_token[:, None] + slots).clamp(max=token_states.shape[0] - 1)
        padding = _per_row(slots[None, :] >= layout.chunk_length[:, None], features)
        blocks = token_states[token_index].masked_fill(padding, 0)
        ctx.layout = layout
        ctx.dtype = token_states.dtype
        return blocks.sum(1, dtype=torch.float32) / _per_row(layout.chunk_length, features)

    @staticmethod
    def backward(ctx, grad_pooled):
        layout = ctx.layout
        features = grad_pooled.dim() - 1
        per_token = (grad_pooled / _per_row(layout.chunk_length, features))[layout.token_chunk.clamp(min=0)]
        outside = _per_row(layout.token_chunk < 0, features)
        return per_token.masked_fill(outside, 0).to(ctx.dtype), None


def pool_chunks(token_states: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Mean of `token_states` ([N, ...], N = B*L tokens) over each chunk's real tokens.

    Sums run in fp32 (a 64-token bf16 sum loses precision); the result is fp32, [C, ...].
    """
    if layout.num_chunks == 0:
        return token_states.new_zeros((0, *token_states.shape[1:]), dtype=torch.float32)
    return _ChunkMean.apply(token_states, layout)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) over the last dimension."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# How a routing query meets a pooled routing key, per head (`MSAConfig.routing_score`):
# "cosine" is the paper's cos(q, k); "scaled_dot" is <q, k> / sqrt(D), what the released
# MSA-4B engine computes at inference for its INFONCE_DECOUPLE checkpoints (no L2 norm).
ROUTING_SCORES = ("cosine", "scaled_dot")


def prepare_routing_queries(routing_queries: torch.Tensor, routing_score: str = "cosine") -> torch.Tensor:
    """Q_R [..., D] -> fp32 vectors whose dot product with `prepare_routing_keys` is the head score."""
    queries = routing_queries.float()
    if routing_score == "cosine":
        return l2_normalize(queries)
    if routing_score == "scaled_dot":
        return queries * queries.shape[-1] ** -0.5
    raise ValueError(f"routing_score must be one of {ROUTING_SCORES}, got {routing_score!r}")


def prepare_routing_keys(pooled_routing_keys: torch.Tensor, routing_score: str = "cosine") -> torch.Tensor:
    """Pooled K̄R [..., D] -> fp32 keys as scored: normalised for "cosine", unchanged for "scaled_dot"."""
    keys = pooled_routing_keys.float()
    if routing_score == "cosine":
        return l2_normalize(keys)
    if routing_score == "scaled_dot":
        return keys
    raise ValueError(f"routing_score must be one of {ROUTING_SCORES}, got {routing_score!r}")


def score_chunks(
    routing_queries: torch.Tensor,
    pooled_routing_keys: torch.Tensor,
    layout: PackedLayout,
    tile_size: int = 8192,
    routing_score: str = "cosine",
) -> torch.Tensor:
    """S_c = max over the example's routing tokens t of mean over heads h of sim(Q_R[t,h], K̄R_c[g(h)]).

    Args:
        routing_queries: [R, H, D] Q_R of the routing tokens (any float dtype).
        pooled_routing_keys: [C, Hkv, D] chunk-pooled K_R (not yet normalised).
        tile_size: chunks scored at once, bounding the [R, tile] similarity matrix.
        routing_score: sim = cos(q, k) for "cosine", <q, k> / sqrt(D) for "scaled_dot".

    Returns:
        [C] fp32 chunk scores; -inf for a chunk whose example has no routing token.
    """
    num_heads = routing_queries.shape[1]
    num_kv_heads = pooled_routing_keys.shape[1]
    queries = prepare_routing_queries(routing_queries, routing_score)
    keys = prepare_routing_keys(pooled_routing_keys, routing_score)
    # The mean over a KV group's query heads of sim(q_h, k) equals <sum_h q_h, k> / H (q_h prepared),
    # so the head reduction folds into one [R, Hkv*D] x [Hkv*D, C] product.
    grouped = (queries.view(queries.shape[0], num_kv_heads, num_heads // num_kv_heads, -1).sum(2) / num_heads).flatten(
        1
    )
    keys = keys.flatten(1)
    if grouped.shape[0] == 0:
        return keys.new_full((keys.shape[0],), float("-inf"))
    scores = []
    for start in range(0, keys.shape[0], tile_size):
        similarity = grouped @ keys[start : start + tile_size].T
        same_example = layout.routing_token_example[:, None] == layout.chunk_example[None, start : start + tile_size]
        scores.append(similarity.masked_fill(~same_example, float("-inf")).max(dim=0).values)
    return torch.cat(scores) if scores else keys.new_zeros(0)


def score_documents(chunk_scores: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """s_i = max over the chunks of document i. Returns [D] fp32."""
    scores = chunk_scores.new_full((layout.num_docs,), float("-inf"))
    return scores.scatter_reduce(0, layout.chunk_doc, chunk_scores, reduce="amax", include_self=True)


def rank_documents(doc_scores: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Rank (0 = best) of every document among its example's documents.

    Ties go to the lower document id: a stable descending sort over documents laid out in
    id order keeps the earlier one first. Returns [D] long.
    """
    example_docs = layout.example_docs
    present = example_docs >= 0
    table = doc_scores[example_docs.clamp(min=0)].detach()
    table = table.masked_fill(~present, float("-inf"))
    order = torch.sort(table, dim=1, descending=True, stable=True).indices
    ranks_table = torch.empty_like(order)
    ranks_table.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    # Empty table slots write into a spare last entry, which is dropped.
    ranks = torch.zeros(layout.num_docs + 1, dtype=torch.long, device=doc_scores.device)
    ranks.scatter_(0, torch.where(present, example_docs, layout.num_docs).flatten(), ranks_table.flatten())
    return ranks[:-1]


def select_documents(doc_ranks: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-min(k, n) documents of each example: [D] bool."""
    return doc_ranks < top_k
