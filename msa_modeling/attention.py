"""Attention backends for the MSA layer, behind one small interface.

Every backend computes the same thing (spec section 3): each token attends causally within
its segment (the prefix, one document, or the query/answer of an example); query/answer
tokens also see their example's whole prefix and, in router layers, the pooled K/V of the
selected documents' chunks.

The variable-length backends use causal varlen kernels, whose causal masks are aligned
bottom-right: query token j of a segment with more keys than queries sees every extra key in
front plus its own tokens 0..j. A query segment's keys read `[prefix ; selected chunks ; query]`;
document and prefix segments have their own tokens as keys. Unselected chunks are sorted past
the last segment, where no kernel reads them, so every tensor has a size known before routing
and the step needs no host sync. Two ways to get there:
    - one call over a key buffer regrouped segment by segment (`VarlenBackend`), which copies
      every K/V row of the layer;
    - two calls (`QueryContextVarlenBackend`): every segment over its own tokens with K/V in
      place, then the query tokens over a small gathered `[prefix ; chunks ; query]` buffer,
      whose output replaces the first call's query rows.

Backends:
    `varlen`: ATen's flash kernels, what `torch.nn.attention.varlen.varlen_attn` runs (CUDA,
        torch >= 2.10), in two calls; the default on CUDA. At 64K on an H100 it is 1.5% faster
        than the same kernels in one call over regrouped keys (docs/BENCHMARKS.md, training step).
    `flash_attn`: flash-attn's `flash_attn_varlen_func`, when installed (CUDA), in one call.
    `flex`: FlexAttention with a segment block mask (CUDA; compiled).
    `sdpa`: dense masked `scaled_dot_product_attention`; the CPU path, O(L^2) memory.

Attention logit soft-capping (Gemma 2: scores -> c * tanh(scores / c) before the softmax) is
an optional `softcap` argument of `attend`: `sdpa` then computes explicit scores, `flex`
applies it as a score_mod, `flash_attn` passes it to the kernel; torch's `varlen` kernel
cannot express it and raises.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from .layout import ROLE_PREFIX, ROLE_QUERY, PackedLayout

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "varlen", "flex", "sdpa")


@dataclass
class PooledMemory:
    """Pooled K/V of every chunk in the batch, and which chunks their example selected."""

    keys: torch.Tensor  # [C, Hkv, D]
    values: torch.Tensor  # [C, Hkv, D]
    selected_chunks: torch.Tensor  # [C] bool


# ------------------------------------------------------------------ dense masked SDPA


def token_attention_mask(layout: PackedLayout) -> torch.Tensor:
    """[B, 1, L, L] bool: who sees whom among the row's own tokens (the same in every layer)."""
    shape = (layout.batch_size, layout.row_length)
    segment = layout.token_segment.view(shape)
    example = layout.token_example.view(shape)
    role = layout.role.view(shape)
    positions = torch.arange(layout.row_length, device=segment.device)
    causal = positions[:, None] >= positions[None, :]
    same_segment = (segment[:, :, None] == segment[:, None, :]) & causal
    query_sees_prefix = (
        (role[:, :, None] == ROLE_QUERY)
        & (role[:, None, :] == ROLE_PREFIX)
        & (example[:, :, None] == example[:, None, :])
    )
    return (same_segment | query_sees_prefix).unsqueeze(1)


def memory_attention_mask(layout: PackedLayout, selected_chunks: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, C] bool: query/answer tokens see the selected chunks of their own example."""
    shape = (layout.batch_size, layout.row_length)
    is_query = (layout.role == ROLE_QUERY).view(shape)
    example = layout.token_example.view(shape)
    mask = is_query[:, :, None] & (example[:, :, None] == layout.chunk_example[None, None, :]) & selected_chunks
    return mask.unsqueeze(1)


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """Masked attention with soft-capped scores, in Gemma 2's order: scale, cap, mask, fp32 softmax.

    q [B, H, Lq, D], k/v [B, Hkv, Lk, D], mask [B, 1, Lq, Lk] bool -> [B, H, Lq, D].
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def reject_softcap(backend_name: str, softcap: float | None) -> None:
    if softcap is not None:
        raise ValueError(
            f"attention backend {backend_name!r} cannot apply attention logit soft-capping "
            f"(attn_logit_softcapping={softcap}, e.g. Gemma 2); use attn_backend 'flash_attn', 'flex' or 'sdpa'"
        )


class SDPABackend:
    name = "sdpa"

    def prepare(self, layout: PackedLayout) -> dict:
        return {"token_mask": token_attention_mask(layout)}

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: PackedLayout,
        plan: dict,
        scale: float,
        memory: PooledMemory | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """q [B, L, H, D], k/v [B, L, Hkv, D] -> [B, L, H, D]."""
        batch = q.shape[0]
        keys, values, mask = k.transpose(1, 2), v.transpose(1, 2), plan["token_mask"]
        if memory is not None:
            # Every row sees the chunks of the whole batch; the mask keeps each example to its own.
            keys = torch.cat([keys, memory.keys.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)], dim=2)
            values = torch.cat([values, memory.values.transpose(0, 1).unsqueeze(0).expand(batch, -1, -1, -1)], dim=2)
            mask = torch.cat([mask, memory_attention_mask(layout, memory.selected_chunks)], dim=-1)
        if softcap is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True
            )
        else:
            out = softcapped_attention(q.transpose(1, 2), keys, values, mask, scale, softcap)
        return out.transpose(1, 2)


# ------------------------------------------------------------------ variable-length kernels


@dataclass
class VarlenKeys:
    """Keys/values regrouped segment by segment, with their boundaries."""

    order: torch.Tensor  # [K] long, a permutation of cat([tokens, prefix copies, chunks])
    inverse: torch.Tensor  # [K] long, its inverse: where each buffer row lands
    cu_seqlens: torch.Tensor  # [S+1] int32
    max_length: int


_SLOT_OWN, _SLOT_CHUNK, _SLOT_QUERY = 0, 1, 2


def _group_boundaries(owner: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[G+1] int32 cumulative counts of rows per group 0..G-1 (`owner == G` is the sentinel, not counted)."""
    counts = torch.zeros(num_groups + 1, dtype=torch.int32, device=owner.device)
    counts.scatter_add_(0, owner, torch.ones_like(owner, dtype=torch.int32))
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts[:num_groups], 0, dtype=torch.int32)])


def _slot_order(owner: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation sorting rows by `owner * 3 + slot` (stable: row order inside a slot), and its inverse."""
    order = torch.sort(owner * 3 + slot, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return order, inverse


def varlen_key_order(layout: PackedLayout, selected_chunks: torch.Tensor | None) -> VarlenKeys:
    """Order of the key buffer `cat([tokens, prefix copies, chunks])` for a causal varlen call.

    Sort keys are `segment * 3 + slot`: within a query segment the prefix copies (slot 0)
    come first, then the selected chunks (slot 1), then the query tokens (slot 2); a stable
    sort keeps row order inside each slot. Unselected chunks get the sentinel segment S.
    """
    num_segments = layout.num_segments
    token_slot = torch.where(layout.role == ROLE_QUERY, _SLOT_QUERY, _SLOT_OWN)
    prefix_segment = layout.example_query_segment[layout.token_example[layout.prefix_token_index]]
    segments = [layout.token_segment, prefix_segment]
    slots = [token_slot, torch.full_like(prefix_segment, _SLOT_OWN)]
    # An upper bound is enough for the kernels; the exact value would need a host sync.
    max_length = max(layout.max_segment_length, layout.max_query_context)
    if selected_chunks is not None:
        chunk_segment = torch.where(
            selected_chunks,
            layout.example_query_segment[layout.chunk_example],
            torch.full_like(layout.chunk_example, num_segments),
        )
        segments.append(chunk_segment)
        slots.append(torch.full_like(chunk_segment, _SLOT_CHUNK))
    segment = torch.cat(segments)
    order, inverse = _slot_order(segment, torch.cat(slots))
    return VarlenKeys(
        order=order, inverse=inverse, cu_seqlens=_group_boundaries(segment, num_segments), max_length=max_length
    )


def gather_varlen_keys(
    tokens: torch.Tensor, layout: PackedLayout, keys: VarlenKeys, pooled: torch.Tensor | None
) -> torch.Tensor:
    """Keys or values [N, Hkv, D] (+ pooled [C, Hkv, D]) regrouped by `keys.order`."""
    parts = [tokens, tokens[layout.prefix_token_index]]
    if pooled is not None:
        parts.append(pooled)
    return _PermuteRows.apply(torch.cat(parts), keys.order, keys.inverse)


class _PermuteRows(torch.autograd.Function):
    """`x[order]` for a permutation: backward gathers with the inverse permutation, where
    autograd would scatter-add (a sort and atomics on the GPU)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x[order]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def regroup_key_values(
    k: torch.Tensor, v: torch.Tensor, layout: PackedLayout, plan: dict, memory: PooledMemory | None
) -> tuple[VarlenKeys, torch.Tensor, torch.Tensor]:
    """K/V [B, L, Hkv, D] (+ the memory's pooled chunks) regrouped for a varlen-style call.

    Layers without memory share the order precomputed in `plan`; router layers sort anew,
    since their selection decides which chunks join which query segment.
    """
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    if memory is None:
        keys, pooled_k, pooled_v = plan["keys_without_memory"], None, None
    else:
        keys, pooled_k, pooled_v = varlen_key_order(layout, memory.selected_chunks), memory.keys, memory.values
    return (
        keys,
        gather_varlen_keys(flat(k), layout, keys, pooled_k),
        gather_varlen_keys(flat(v), layout, keys, pooled_v),
    )


VarlenKernel = Callable[..., torch.Tensor]


class _ZeroGradientPastEnd(torch.autograd.Function):
    """Identity whose gradient is zero on rows at or past `end`.

    Varlen kernels never touch rows outside the segments (here: unselected chunks), so their
    backward leaves those rows of dK/dV uninitialised; this keeps the garbage out of the model.
    """

    @staticmethod
    def forward(ctx, x, end):
        ctx.save_for_backward(end)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (end,) = ctx.saved_tensors
        outside = torch.arange(grad.shape[0], device=grad.device) >= end
        return grad.masked_fill(outside.view(-1, *([1] * (grad.dim() - 1))), 0.0), None


class VarlenBackend:
    """Any causal varlen kernel with flash-attn's calling convention (bottom-right causal, GQA)."""

    def __init__(self, name: str, kernel: VarlenKernel, supports_softcap: bool = False) -> None:
        self.name = name
        self.kernel = kernel
        self.supports_softcap = supports_softcap

    def prepare(self, layout: PackedLayout) -> dict:
        return {"keys_without_memory": varlen_key_order(layout, None)}

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: PackedLayout,
        plan: dict,
        scale: float,
        memory: PooledMemory | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        # Only kernels that take a softcap get one, so the others keep their plain signature.
        softcap_kwargs = {}
        if softcap is not None:
            if not self.supports_softcap:
                reject_softcap(self.name, softcap)
            softcap_kwargs = {"softcap": softcap}
        batch, length = q.shape[:2]
        keys, k_buffer, v_buffer = regroup_key_values(k, v, layout, plan, memory)
        end = keys.cu_seqlens[-1]
        out = self.kernel(
            q.reshape(batch * length, *q.shape[2:]),
            _ZeroGradientPastEnd.apply(k_buffer, end),
            _ZeroGradientPastEnd.apply(v_buffer, end),
            layout.cu_seqlens,
            keys.cu_seqlens,
            layout.max_segment_length,
            keys.max_length,
            scale,
            **softcap_kwargs,
        )
        return out.view(batch, length, *out.shape[1:])


@dataclass(frozen=True)
class VarlenKernelOps:
    """A causal (bottom-right aligned, GQA) varlen kernel as separate forward and backward ops.

    `forward(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> (out, state)`;
    `backward(grad_out, q, k, v, out, state, cu_q, cu_k, max_q, max_k, scale) -> (dq, dk, dv)`,
    where `state` is a tuple of tensors the backward needs (the log-sum-exp, RNG state).
    """

    forward: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
    backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _aten_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    out, lse, philox_seed, philox_offset, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False, scale=scale
    )
    return out, (lse, philox_seed, philox_offset)


def _aten_flash_backward(grad_out, q, k, v, out, state, cu_q, cu_k, max_q, max_k, scale):
    lse, philox_seed, philox_offset = state
    return torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, True, philox_seed, philox_offset, scale=scale
    )[:3]


# ATen's flash kernels (what `varlen_attn` runs): they take grouped K/V and `is_causal=True`.
ATEN_FLASH_OPS = VarlenKernelOps(forward=_aten_flash_forward, backward=_aten_flash_backward)


@dataclass
class QueryContextKeys:
    """The keys of each example's query segment, `[prefix ; selected chunks ; query]`, gathered
    from `cat([prefix tokens, query tokens, chunks])` by `order` (unselected chunks past the end)."""

    order: torch.Tensor  # [K2] long
    inverse: torch.Tensor  # [K2] long
    cu_seqlens: torch.Tensor  # [E+1] int32
    cu_queries: torch.Tensor  # [E+1] int32, each example's query tokens in `layout.query_token_index`


def query_context_keys(layout: PackedLayout, selected_chunks: torch.Tensor | None) -> QueryContextKeys:
    """Sort keys `example * 3 + slot` (prefix 0, chunks 1, query 2), stable so that each slot keeps
    row order; unselected chunks get the sentinel example E."""
    num_examples = layout.num_examples
    query_example = layout.token_example[layout.query_token_index]
    examples = [layout.token_example[layout.prefix_token_index], query_example]
    slots = [torch.full_like(examples[0], _SLOT_OWN), torch.full_like(query_example, _SLOT_QUERY)]
    if selected_chunks is not None:
        examples.append(
            torch.where(selected_chunks, layout.chunk_example, torch.full_like(layout.chunk_example, num_examples))
        )
        slots.append(torch.full_like(layout.chunk_example, _SLOT_CHUNK))
    example = torch.cat(examples)
    order, inverse = _slot_order(example, torch.cat(slots))
    return QueryContextKeys(
        order=order,
        inverse=inverse,
        cu_seqlens=_group_boundaries(example, num_examples),
        cu_queries=_group_boundaries(query_example, num_examples),
    )


class _OwnSegmentsThenQueryContext(torch.autograd.Function):
    """Attention of the packed row in two kernel calls that never copy the row's K/V.

    1. Every segment over its own tokens, with the keys where they are (`cu_k = cu_q`).
    2. Each example's query tokens over `[prefix ; selected chunks ; query]`, a buffer of a few
       hundred rows; its output replaces call 1's rows of the query tokens.

    Call 1's query rows are discarded, so their output gradient is zeroed before its backward:
    with dO = 0 on a row, that row adds nothing to dQ, dK or dV.
    """

    @staticmethod
    def forward(ctx, q, k, v, pooled_k, pooled_v, layout, keys, scale, ops):
        query_rows, prefix_rows = layout.query_token_index, layout.prefix_token_index
        own = (layout.cu_seqlens, layout.cu_seqlens, layout.max_segment_length, layout.max_segment_length)
        context = (keys.cu_queries, keys.cu_seqlens, layout.max_query_length, layout.max_query_context)

        def context_buffer(x: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
            parts = [x[prefix_rows], x[query_rows]] + ([] if pooled is None else [pooled])
            return torch.cat(parts)[keys.order]

        out, own_state = ops.forward(q, k, v, *own, scale)
        q2, k2, v2 = q[query_rows], context_buffer(k, pooled_k), context_buffer(v, pooled_v)
        out2, context_state = ops.forward(q2, k2, v2, *context, scale)
        # Rewriting rows of the kernel's own output: idempotent, so a selective-checkpoint cache
        # that hands this tensor back on recomputation still yields the same result.
        out.index_copy_(0, query_rows, out2)
        ctx.save_for_backward(q, k, v, out, q2, k2, v2, out2, *own_state, *context_state)
        ctx.num_own_state = len(own_state)
        ctx.own, ctx.context = own, context
        ctx.layout, ctx.keys, ctx.scale, ctx.ops = layout, keys, scale, ops
        ctx.has_pooled = pooled_k is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, q2, k2, v2, out2, *states = ctx.saved_tensors
        own_state, context_state = tuple(states[: ctx.num_own_state]), tuple(states[ctx.num_own_state :])
        layout, keys, ops = ctx.layout, ctx.keys, ctx.ops
        query_rows, prefix_rows = layout.query_token_index, layout.prefix_token_index
        grad_out = grad_out.contiguous()
        grad_context = grad_out[query_rows]
        # In place: the buffer is the output projection's input gradient, read by nobody else.
        grad_out.index_fill_(0, query_rows, 0.0)
        dq, dk, dv = ops.backward(grad_out, q, k, v, out, own_state, *ctx.own, ctx.scale)
        dq2, dk2, dv2 = ops.backward(grad_context, q2, k2, v2, out2, context_state, *ctx.context, ctx.scale)
        dq.index_add_(0, query_rows, dq2)
        num_prefix, num_query = prefix_rows.numel(), query_rows.numel()
        # Kernels leave rows outside every segment (the unselected chunks) unwritten.
        outside = torch.arange(k2.shape[0], device=k2.device) >= keys.cu_seqlens[-1]

        def scatter(grad_full: torch.Tensor, grad_buffer: torch.Tensor) -> torch.Tensor | None:
            by_source = grad_buffer.masked_fill(outside.view(-1, 1, 1), 0.0)[keys.inverse]
            grad_full.index_add_(0, prefix_rows, by_source[:num_prefix])
            grad_full.index_add_(0, query_rows, by_source[num_prefix : num_prefix + num_query])
            return by_source[num_prefix + num_query :] if ctx.has_pooled else None

        dpooled_k, dpooled_v = scatter(dk, dk2), scatter(dv, dv2)
        return dq, dk, dv, dpooled_k, dpooled_v, None, None, None, None


class QueryContextVarlenBackend:
    """Varlen attention as two calls (see `_OwnSegmentsThenQueryContext`): the row's own K/V are
    read in place, and only each example's `[prefix ; chunks ; query]` keys are gathered.
    `VarlenBackend` instead regroups every key row of the layer, twice the K/V traffic."""

    def __init__(self, name: str, ops: VarlenKernelOps) -> None:
        self.name = name
        self.ops = ops

    def prepare(self, layout: PackedLayout) -> dict:
        return {"context_without_memory": query_context_keys(layout, None)}

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: PackedLayout,
        plan: dict,
        scale: float,
        memory: PooledMemory | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        reject_softcap(self.name, softcap)
        batch, length = q.shape[:2]
        flat = lambda x: x.reshape(batch * length, *x.shape[2:])  # noqa: E731
        if memory is None:
            keys, pooled_k, pooled_v = plan["context_without_memory"], None, None
        else:
            keys, pooled_k, pooled_v = query_context_keys(layout, memory.selected_chunks), memory.keys, memory.values
        out = _OwnSegmentsThenQueryContext.apply(
            flat(q), flat(k), flat(v), pooled_k, pooled_v, layout, keys, scale, self.ops
        )
        return out.view(batch, length, *out.shape[1:])


def flash_attn_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, softcap=0.0):
    from flash_attn import flash_attn_varlen_func

    # flash-attn reads softcap 0.0 as "no soft-capping".
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, causal=True, softcap=softcap)


# ------------------------------------------------------------------ FlexAttention


class FlexBackend:
    """FlexAttention over the same regrouped keys, with a segment-and-causal block mask."""

    name = "flex"

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.create_block_mask = create_block_mask
        self.flex_attention = torch.compile(flex_attention, dynamic=False)

    def prepare(self, layout: PackedLayout) -> dict:
        return {"keys_without_memory": varlen_key_order(layout, None)}

    def block_mask(self, layout: PackedLayout, keys: VarlenKeys, num_keys: int):
        def position_from_end(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.arange(total, device=cu.device)
            segment = torch.searchsorted(cu[1:].long(), index, right=True)
            # Positions past the last boundary (unselected chunks) get the sentinel segment.
            end = torch.cat([cu[1:].long(), cu.new_full((1,), total).long()])[segment]
            return segment, index - end

        q_segment, q_from_end = position_from_end(layout.cu_seqlens, layout.num_tokens)
        k_segment, k_from_end = position_from_end(keys.cu_seqlens, num_keys)

        def mask_mod(b, h, q_idx, kv_idx):
            return (q_segment[q_idx] == k_segment[kv_idx]) & (k_from_end[kv_idx] <= q_from_end[q_idx])

        # Compiled, the mask is evaluated block by block instead of as one dense [N, K] grid.
        return self.create_block_mask(
            mask_mod, None, None, layout.num_tokens, num_keys, device=q_segment.device, _compile=True
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: PackedLayout,
        plan: dict,
        scale: float,
        memory: PooledMemory | None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        batch, length = q.shape[:2]
        keys, k_buffer, v_buffer = regroup_key_values(k, v, layout, plan, memory)
        if memory is not None:
            block_mask = self.block_mask(layout, keys, k_buffer.shape[0])
        else:
            if "block_mask" not in plan:
                plan["block_mask"] = self.block_mask(layout, keys, k_buffer.shape[0])
            block_mask = plan["block_mask"]
        heads = lambda x: x.transpose(0, 1).unsqueeze(0)  # noqa: E731  [T, H, D] -> [1, H, T, D]
        score_mod = None if softcap is None else _softcap_score_mod(softcap)
        out = self.flex_attention(
            heads(q.reshape(batch * length, *q.shape[2:])),
            heads(k_buffer),
            heads(v_buffer),
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=True,
        )
        return out.squeeze(0).transpose(0, 1).reshape(batch, length, *q.shape[2:])


def _softcap_score_mod(softcap: float):
    def score_mod(score, b, h, q_idx, kv_idx):
        # FlexAttention hands over the already scaled score, as Gemma 2 caps it.
        return torch.tanh(score / softcap) * softcap

    return score_mod


# ------------------------------------------------------------------ choice


# The forward kernels of every backend that a recomputed layer may keep instead of running twice.
# FlexAttention is absent: its higher-order op does not go through selective checkpointing.
ATTENTION_KERNEL_OPS = frozenset(
    {
        "aten::_flash_attention_forward",
        "aten::_efficient_attention_forward",
        "aten::_scaled_dot_product_flash_attention",
        "aten::_scaled_dot_product_efficient_attention",
        "aten::_scaled_dot_product_cudnn_attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "torch_attn::_varlen_attn",
        "flash_attn::_flash_attn_varlen_forward",
    }
)


def keep_attention_kernel_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpoint policy: save the attention kernel's outputs (output and log-sum-exp),
    recompute everything else. Backward still gets Q/K/V from the recomputed projections."""
    name = op.name() if hasattr(op, "name") else str(op)
    return CheckpointPolicy.MUST_SAVE if name in ATTENTION_KERNEL_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def make_attention_backend(
    name: str, device: torch.device
) -> SDPABackend | VarlenBackend | QueryContextVarlenBackend | FlexBackend:
    """The backend `name` (one of `BACKENDS`), or for `"auto"` the fastest one available on `device`."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            name = "sdpa"
        elif torch_varlen_available():
            name = "varlen"
        elif importlib.util.find_spec("flash_attn") is not None:
            name = "flash_attn"
        else:
            name = "flex"
    if name == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attention backend 'flash_attn' needs the flash-attn package (pip install '.[flash]')")
        return VarlenBackend("flash_attn", flash_attn_kernel, supports_softcap=True)
    if name == "varlen":
        if not torch_varlen_available():
            raise ValueError(f"attention backend 'varlen' needs torch >= 2.10 (have {torch.__version__})")
        return QueryContextVarlenBackend("varlen", ATEN_FLASH_OPS)
    if name == "flex":
        return FlexBackend()
    return SDPABackend()
