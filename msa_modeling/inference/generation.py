"""`MSAGenerator`: routing for the question, sparse prefill, then decoding with a KV cache.

A round's query segment (the question, plus whatever earlier rounds appended) is prefilled
at positions `T + query_position_offset + j` (spec section 4). Every layer attends to the
cached prefix K/V; router layers also attend to the pooled K̄/V̄ of the documents their own
routing selected, which stays fixed while the round decodes, as one selection per example
serves every answer token in training.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .layer_steps import attend, attention_residual, embed_tokens, final_logits, rotary_tables
from .routing_index import RoutingIndex, group_routing_queries
from .store import MemoryStore, model_signature

logger = logging.getLogger(__name__)


@dataclass
class LayerRouting:
    """One router layer's ranked documents (0-based store indices), best first."""

    layer: int
    docs: torch.Tensor  # [k] long, CPU
    scores: torch.Tensor  # [k] fp32, CPU


@dataclass
class QueryCache:
    """Per layer: the context K/V (prefix, selected chunks) and the query segment's K/V so far."""

    context_keys: list[torch.Tensor]
    context_values: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    routing: list[LayerRouting] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class GenerationOutput:
    token_ids: list[int]  # generated tokens, the stop token included when one was hit
    stop_token: int | None  # the stop token that ended generation, None at the length limit
    routing: list[LayerRouting]  # the selection (and trace) of every router layer
    first_logits: torch.Tensor  # [vocab] fp32, the distribution of the first generated token


class MSAGenerator:
    """Generation over a `MemoryStore` with an `MSAForCausalLM`.

    Args:
        model: the MSA model, in eval mode, on the device to generate on.
        store: the encoded memory (host); its selected documents are copied per question.
        index: where routing keys are scored (default: a one-shard index on the model's device).
        trace_k: rank this many documents per router layer for reporting (recall@k); the
            model still attends to its own top_k_docs.
    """

    def __init__(self, model: nn.Module, store: MemoryStore, index: RoutingIndex | None = None, trace_k: int = 0) -> None:
        if store.signature != model_signature(model.config):
            raise ValueError(f"store encoded for {store.signature}, the model has {model_signature(model.config)}")
        self.model = model
        self.store = store
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.index = index if index is not None else RoutingIndex.from_store(store, [self.device])
        self.trace_k = trace_k
        self.router_slot = {layer: slot for slot, layer in enumerate(self.config.router_layers)}
        to_device = lambda tensors: [t.to(self.device, self.dtype) for t in tensors]  # noqa: E731
        self.prefix_keys, self.prefix_values = to_device(store.prefix_keys), to_device(store.prefix_values)
        self.query_start = store.prefix_ids.numel() + self.config.query_position_offset

    def new_cache(self) -> QueryCache:
        empty = self.prefix_keys[0].new_zeros((0, *self.prefix_keys[0].shape[1:]))
        layers = range(self.config.num_hidden_layers)
        return QueryCache(list(self.prefix_keys), list(self.prefix_values), [empty for _ in layers], [empty for _ in layers])

    @torch.no_grad()
    def prefill(self, query_ids: Sequence[int]) -> tuple[torch.Tensor, QueryCache]:
        """Route with every token of `query_ids`, attend, and return (next-token logits [vocab], cache)."""
        if len(query_ids) == 0:
            raise ValueError("the query segment is empty")
        cache = self.new_cache()
        return self._forward(cache, query_ids, route=True), cache

    @torch.no_grad()
    def decode(self, cache: QueryCache, token_id: int) -> torch.Tensor:
        """Append one token to the cache; return the next-token logits [vocab]."""
        return self._forward(cache, [token_id], route=False)

    @torch.no_grad()
    def generate(
        self, query_ids: Sequence[int], max_new_tokens: int, stop_token_ids: Collection[int] = (),
        cache: QueryCache | None = None,
    ) -> tuple[GenerationOutput, QueryCache]:
        """Greedy decoding after a prefill of `query_ids` (or, with `cache`, after appending them)."""
        if cache is None:
            logits, cache = self.prefill(query_ids)
        else:
            logits = self._forward(cache, query_ids, route=False)
        first_logits, generated, stop = logits, [], None
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            generated.append(token)
            if token in stop_token_ids:
                stop = token
                break
            logits = self.decode(cache, token)
        return GenerationOutput(generated, stop, cache.routing, first_logits.cpu()), cache

    def _forward(self, cache: QueryCache, token_ids: Sequence[int], route: bool) -> torch.Tensor:
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        count, past = ids.shape[1], cache.length
        hidden = embed_tokens(self.model, ids)
        positions = self.query_start + past + torch.arange(count, device=self.device)
        ropes = rotary_tables(self.model, hidden, positions[None])
        for index, layer in enumerate(self.model.model.layers):
            normed = layer.input_layernorm(hidden)
            q, k, v = layer.self_attn.project(normed, *ropes[index])
            if route and index in self.router_slot and self.store.num_docs > 0:
                self._route(cache, index, layer, normed[0])
            cache.keys[index] = torch.cat([cache.keys[index], k[0]])
            cache.values[index] = torch.cat([cache.values[index], v[0]])
            keys = torch.cat([cache.context_keys[index], cache.keys[index]])
            values = torch.cat([cache.context_values[index], cache.values[index]])
            # Context and earlier query tokens are all visible; the new tokens see each other causally.
            mask = None
            if count > 1:
                seen = keys.shape[0] - count
                mask = torch.ones(count, keys.shape[0], dtype=torch.bool, device=self.device)
                mask[:, seen:] = torch.ones(count, count, dtype=torch.bool, device=self.device).tril()
            attended = attend(layer, q, keys[None], values[None], mask)
            hidden = attention_residual(layer, hidden, attended)
        return final_logits(self.model, hidden[0, -1])

    def _route(self, cache: QueryCache, index: int, layer: nn.Module, normed: torch.Tensor) -> None:
        """Select this layer's documents and put their pooled K̄/V̄ after the prefix in its context."""
        attention = layer.self_attn
        slot = self.router_slot[index]
        routing_queries = attention.router_q_proj(normed).view(normed.shape[0], attention.num_heads, -1)
        grouped = group_routing_queries(routing_queries, attention.num_kv_heads)
        scores, docs = self.index.top_documents(slot, grouped, max(self.config.top_k_docs, self.trace_k))
        cache.routing.append(LayerRouting(layer=index, docs=docs.cpu(), scores=scores.cpu()))
        # Chunks in document order, as the training forward lays them out.
        selected = torch.sort(docs[: self.config.top_k_docs]).values
        keys, values = self.store.gather_chunks(slot, selected)
        cache.context_keys[index] = torch.cat([self.prefix_keys[index], keys.to(self.device, self.dtype, non_blocking=True)])
        cache.context_values[index] = torch.cat([self.prefix_values[index], values.to(self.device, self.dtype, non_blocking=True)])
