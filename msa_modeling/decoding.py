"""The MSA model as a plain causal LM over a Hugging Face KV cache: what `generate()` runs.

Rows are ordinary (left- or right-padded) token sequences, all query tokens; there are no
packed documents. Without a memory every layer attends causally to the row's own tokens,
which is the backbone. With a memory (an encoded `MemoryStore`), the first forward routes
each row with its prompt tokens exactly as `MSAGenerator.prefill` does and writes, per layer,
the memory's context in front of the row's tokens in the cache: the prefix K/V, then (router
layers) the pooled K̄/V̄ of the documents that layer selected. Later forwards attend to that
context unchanged, as `MSAGenerator` decodes with one selection per round.

A row's context length differs per router layer and per row (documents have different chunk
counts), so contexts are padded to the longest row and `MemoryContext.masks` says which slots
are real. Beam search reorders rows only among the beams of one prompt, whose contexts are
identical, so the masks need no reordering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .inference.generation import LayerRouting, MSAGenerator
from .inference.layer_steps import attend, attention_residual, rotary_tables
from .inference.store import MemoryStore


@dataclass
class MemoryContext:
    """The memory part of a KV cache, kept on the cache as `cache.msa_memory`.

    Attributes:
        masks: per layer, [batch, context slots] bool: True where a slot holds prefix K/V or a
            selected chunk's K̄/V̄ (False: padding up to the row with the longest context).
        routing: per row, every router layer's ranked documents for the row's prompt.
        query_start: position of the first query token (spec section 4).
    """

    masks: list[torch.Tensor]
    routing: list[list[LayerRouting]]
    query_start: int


def memory_generator(model: nn.Module, memory: MemoryStore | MSAGenerator) -> MSAGenerator:
    """The generator that routes over `memory` (a store, or a generator whose routing index is reused)."""
    if isinstance(memory, MSAGenerator):
        if memory.model is not model:
            raise ValueError("memory is an MSAGenerator built for another model; pass the MemoryStore instead")
        return memory
    if isinstance(memory, MemoryStore):
        return MSAGenerator(model, memory)
    raise TypeError(f"memory must be a MemoryStore or an MSAGenerator, got {type(memory).__name__}")


def _pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n_b, ...] tensors -> ([batch, max n, ...] zero-padded at the end, [batch, max n] bool of real rows)."""
    longest = max(row.shape[0] for row in rows)
    padded = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].device)
    for b, row in enumerate(rows):
        padded[b, : row.shape[0]] = row
        mask[b, : row.shape[0]] = True
    return padded, mask


def layer_context(
    generator: MSAGenerator,
    index: int,
    layer: nn.Module,
    normed: torch.Tensor,
    routing_tokens: torch.Tensor,
    routing: list[list[LayerRouting]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer `index`'s memory context for every row: keys, values [batch, slots, Hkv, D] and the slot mask.

    `normed`: the layer's normed input [batch, L, hidden]; `routing_tokens`: [batch, L] bool,
    the tokens each row routes with (its prompt). Router layers append the row's selection
    to `routing[row]`.
    """
    prefix_k, prefix_v = generator.prefix_keys[index], generator.prefix_values[index]
    batch = normed.shape[0]
    if index not in generator.router_slot or generator.first_router is None:
        mask = torch.ones(batch, prefix_k.shape[0], dtype=torch.bool, device=normed.device)
        return prefix_k.expand(batch, *prefix_k.shape), prefix_v.expand(batch, *prefix_v.shape), mask
    keys, values = [], []
    for row in range(batch):
        selection, chunk_k, chunk_v = generator.route_layer(index, layer, normed[row, routing_tokens[row]])
        routing[row].append(selection)
        keys.append(torch.cat([prefix_k, chunk_k.to(prefix_k.device, prefix_k.dtype)]))
        values.append(torch.cat([prefix_v, chunk_v.to(prefix_v.device, prefix_v.dtype)]))
    keys, mask = _pad_rows(keys)
    values, _ = _pad_rows(values)
    return keys, values, mask


def token_positions(
    attention_mask: torch.Tensor | None, past_length: int, length: int, device: torch.device
) -> torch.Tensor:
    """Positions of the new tokens within the query, counting real tokens only (left padding: 0)."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + length, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, -length:]


def causal_attention_mask(key_mask: torch.Tensor, context_slots: int, length: int) -> torch.Tensor:
    """[batch, 1, L, K] bool for the new tokens over keys `[context ; cached tokens ; new tokens]`.

    `key_mask` [batch, K]: which keys are real. Every token also sees itself, so that a padding
    token's attention is defined (its output is never used).
    """
    keys = key_mask.shape[1]
    key_token = torch.arange(keys, device=key_mask.device) - context_slots  # context slots: negative
    query_token = torch.arange(keys - length, keys, device=key_mask.device) - context_slots
    visible = key_mask[:, None, :] & (key_token[None, None, :] <= query_token[None, :, None])
    diagonal = key_token[None, :] == query_token[:, None]
    return (visible | diagonal[None]).unsqueeze(1)


def run_cached_decoder(
    model: nn.Module,
    hidden: torch.Tensor,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    cache,
    memory: MemoryStore | MSAGenerator | None,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The decoder stack over `hidden` [B, L, hidden] (scaled embeddings) after the cached tokens.

    `position_ids` [B, L]: positions within the query (`None`: from `attention_mask`, or after
    the cached tokens); the model adds the query start. `attention_mask` [B, cached + L]: 0 on
    padding. `cache`: a transformers `Cache` or `None`. `memory`: routed over when the cache
    holds no memory context yet. Returns the final-normed hidden states and, if asked, each
    layer's input and the last layer's output (before the norm).
    """
    batch, length = hidden.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    context = getattr(cache, "msa_memory", None)
    generator = None
    if context is not None:
        past -= context.masks[0].shape[1]  # layer 0's context slots are counted by the cache
    elif memory is not None:
        if past:
            raise ValueError(
                "memory was given after the cache already holds tokens; route with the prompt's first forward"
            )
        generator = memory_generator(model, memory)
        context = MemoryContext(masks=[], routing=[[] for _ in range(batch)], query_start=generator.query_start)
        if cache is not None:
            cache.msa_memory = context
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=hidden.device)
    if attention_mask.shape != (batch, past + length):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past + length)} "
            f"({past} cached and {length} new tokens)"
        )
    token_mask = attention_mask.bool()
    if position_ids is None:
        position_ids = token_positions(attention_mask, past, length, hidden.device)
    query_start = context.query_start if context is not None else model.config.query_position_offset
    ropes = rotary_tables(model, hidden, position_ids + query_start)
    all_hidden = [hidden] if output_hidden_states else None
    for index, layer in enumerate(model.model.layers):
        normed = layer.input_layernorm(hidden)
        q, k, v = layer.self_attn.project(normed, *ropes[index])
        if generator is not None:
            context_k, context_v, context_mask = layer_context(
                generator, index, layer, normed, token_mask[:, -length:], context.routing
            )
            context.masks.append(context_mask)
            k, v = torch.cat([context_k, k], 1), torch.cat([context_v, v], 1)
        if cache is not None:
            keys, values = cache.update(k.transpose(1, 2), v.transpose(1, 2), index)
            k, v = keys.transpose(1, 2), values.transpose(1, 2)
        context_mask = context.masks[index] if context is not None else token_mask.new_zeros(batch, 0)
        key_mask = torch.cat([context_mask, token_mask], 1)
        if k.shape[1] != key_mask.shape[1]:
            # A sliding-window cache drops keys once the window binds; MSA attends over whole segments.
            raise ValueError(
                f"layer {index}: the cache holds {k.shape[1]} keys where {key_mask.shape[1]} are needed "
                f"({context_mask.shape[1]} memory slots, {past + length} tokens); a sliding window of "
                f"{layer.self_attn.sliding_window} binds, which MSA cannot apply"
            )
        attended = attend(layer, q, k, v, causal_attention_mask(key_mask, context_mask.shape[1], length))
        hidden = attention_residual(layer, hidden, attended)
        if output_hidden_states:
            all_hidden.append(hidden)
    return model.model.norm(hidden), tuple(all_hidden) if output_hidden_states else None
