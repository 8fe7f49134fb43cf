"""`MSAGenerator`: routing for the question, sparse prefill, then decoding with a KV cache.

A round's query segment (the question, plus whatever earlier rounds appended) is prefilled
at positions `T + query_position_offset + j` (spec section 4), or, for a model with global
positions (`document_positions=False`), right after the whole memory, at `T + M + j` (M: the
memory's tokens; `query_start_position`). Every layer attends to the
cached prefix K/V; router layers also attend to the pooled K̄/V̄ of the documents their own
routing selected, which stays fixed while the round decodes, as one selection per example
serves every answer token in training.

**The KV cache.** Each layer keeps one preallocated buffer `[context ; query segment]`:
the prefix K/V, then (router layers) the selected chunks' K̄/V̄, then one slot per query
token. A decode step writes its K/V in place and attends to a view of the buffer, so a step
moves O(1) data besides the attention's own reads, and the only host synchronisation per
token is the stop check. Buffers are sized `prompt + max_new_tokens` and grow by doubling
when a segment is extended past them.

**Extending a segment with routing (memory interleave, spec sections 7 and 8).** Routing
uses every token of the segment (S_c is a max over routing tokens), so appending tokens can
change the selection of any router layer. A changed selection at router layer l changes the
attention output of every earlier token from layer l on, hence their K/V in every layer
above l, and the routing queries of the router layers above l. What stays provably identical
is everything below the first router layer: those layers never see the memory, and a
causal token's states do not depend on later tokens. `extend` therefore keeps, for the
earlier tokens, the K/V of the layers below the first router layer and the residual stream
entering it (cached per token as the segment is built); it runs only the new tokens through
the lower layers, and then re-runs the whole segment through the router half from that
cached boundary, routing with every token as a full re-prefill does. The result equals a
full re-prefill (tested), at the cost of the upper half only.

**Routing tokens.** By default every token of a prefilled segment routes. A prefill may name the
tokens that do (`routing_mask`): the others are attended and cached as usual but add no routing
query, as the released engine marks only some tokens of a re-prefilled transcript as queries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .layer_steps import attend, attention_residual, embed_tokens, final_logits, rotary_tables
from .routing_index import RoutingIndex, group_routing_queries
from .store import MemoryStore, check_signature

logger = logging.getLogger(__name__)


@dataclass
class LayerRouting:
    """One router layer's ranked documents (0-based store indices), best first."""

    layer: int
    docs: torch.Tensor  # [k] long, CPU
    scores: torch.Tensor  # [k] fp32, CPU


@dataclass
class QueryCache:
    """Per layer, one buffer `[context ; query segment ; free slots]` of keys and of values.

    `context_lengths[l]` rows of layer l hold the prefix K/V and, in router layers, the
    selected chunks' K̄/V̄; the next `length` rows hold the segment's K/V. `boundary` holds
    the residual stream entering the first router layer for each segment token (what
    `MSAGenerator.extend` restarts the router half from).
    """

    keys: list[torch.Tensor]  # per layer [capacity_l, Hkv, D]
    values: list[torch.Tensor]
    context_lengths: list[int]
    boundary: torch.Tensor | None  # [capacity, hidden], None without router layers or memory
    length: int = 0
    token_ids: list[int] = field(default_factory=list)
    routing: list[LayerRouting] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[0] - self.context_lengths[0]

    def layer_keys(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer `layer`'s context and first `end` segment rows: ([1, n, Hkv, D], same)."""
        stop = self.context_lengths[layer] + end
        return self.keys[layer][None, :stop], self.values[layer][None, :stop]


@dataclass
class GenerationOutput:
    token_ids: list[int]  # generated tokens, the stop token included when one was hit
    stop_token: int | None  # the stop token that ended generation, None at the length limit
    routing: list[LayerRouting]  # the selection (and trace) of every router layer
    first_logits: torch.Tensor  # [vocab] fp32, the distribution of the first generated token


def _grown(buffer: torch.Tensor, rows: int, keep: int) -> torch.Tensor:
    """A buffer of `rows` rows whose first `keep` rows are `buffer`'s."""
    new = buffer.new_empty((rows, *buffer.shape[1:]))
    new[:keep] = buffer[:keep]
    return new


def _masked_argmax(logits: torch.Tensor, allowed: Collection[int]) -> torch.Tensor:
    """The argmax of `logits` [vocab] over the token ids in `allowed` (a 0-d device tensor)."""
    if not allowed:
        raise ValueError("constrained decoding allowed no token")
    candidates = torch.tensor(sorted(allowed), dtype=torch.long, device=logits.device)
    return candidates[logits[candidates].argmax()]


def query_start_position(config, store: MemoryStore) -> int:
    """Position of the query segment's first token, as the training layout places it (spec section 4).

    Document-wise positions: prefix length + `query_position_offset`. Global positions
    (`document_positions=False`, where training counts every token from the example's first):
    right after the whole memory, prefix length + every document's tokens.
    """
    if config.document_positions:
        return store.prefix_ids.numel() + config.query_position_offset
    return store.prefix_ids.numel() + store.num_tokens


class MSAGenerator:
    """Generation over a `MemoryStore` with an `MSAForCausalLM`.

    Args:
        model: the MSA model, in eval mode, on the device to generate on.
        store: the encoded memory (on the host, or on this GPU); its selected documents are copied
            into the query's cache per question.
        index: where routing keys are scored (default: a one-shard index on the model's device).
        trace_k: rank this many documents per router layer for reporting (recall@k); the
            model still attends to its own top_k_docs.
    """

    def __init__(
        self, model: nn.Module, store: MemoryStore, index: RoutingIndex | None = None, trace_k: int = 0
    ) -> None:
        check_signature(store.signature, model.config, "the store")
        self.model = model
        self.store = store
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.index = index if index is not None else RoutingIndex.from_store(store, [self.device])
        self.trace_k = trace_k
        self.router_slot = {layer: slot for slot, layer in enumerate(self.config.router_layers)}
        # Layers below this one never see the memory (None: no layer does, nothing to re-run).
        self.first_router = min(self.router_slot) if self.router_slot and store.num_docs > 0 else None
        to_device = lambda tensors: [t.to(self.device, self.dtype) for t in tensors]  # noqa: E731
        self.prefix_keys, self.prefix_values = to_device(store.prefix_keys), to_device(store.prefix_values)
        self.query_start = query_start_position(self.config, store)

    def new_cache(self, capacity: int = 64) -> QueryCache:
        """An empty segment after the prefix, with room for `capacity` tokens."""
        keys, values, lengths = [], [], []
        for prefix_k, prefix_v in zip(self.prefix_keys, self.prefix_values):
            lengths.append(prefix_k.shape[0])
            keys.append(_grown(prefix_k, prefix_k.shape[0] + capacity, prefix_k.shape[0]))
            values.append(_grown(prefix_v, prefix_v.shape[0] + capacity, prefix_v.shape[0]))
        boundary = None
        if self.first_router is not None:
            boundary = torch.empty((capacity, self.config.hidden_size), dtype=self.dtype, device=self.device)
        return QueryCache(keys, values, lengths, boundary)

    @torch.no_grad()
    def prefill(
        self, query_ids: Sequence[int], reserve: int = 0, routing_mask: Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, QueryCache]:
        """Route with the tokens of `query_ids`, attend, and return (next-token logits [vocab], cache).

        `reserve`: room for that many more tokens (e.g. max_new_tokens) before the cache grows.
        `routing_mask`: per token, whether it routes (default: every token does).
        """
        if len(query_ids) == 0:
            raise ValueError("the query segment is empty")
        routing_rows = None
        if routing_mask is not None:
            if len(routing_mask) != len(query_ids):
                raise ValueError(f"routing_mask has {len(routing_mask)} flags for {len(query_ids)} query tokens")
            if not any(routing_mask):
                raise ValueError("routing_mask routes no token of the query segment")
            routing_rows = torch.tensor(list(routing_mask), dtype=torch.bool, device=self.device)
        cache = self.new_cache(len(query_ids) + reserve)
        logits = self._forward(
            cache, self._ids(query_ids), route=True, known_ids=list(query_ids), routing_rows=routing_rows
        )
        return logits, cache

    @torch.no_grad()
    def decode(self, cache: QueryCache, token_id: int | torch.Tensor) -> torch.Tensor:
        """Append one token (an int, or a device tensor to avoid a host copy); return the next-token logits."""
        if isinstance(token_id, torch.Tensor):
            return self._forward(cache, self._ids(token_id), route=False)
        return self._forward(cache, self._ids([token_id]), route=False, known_ids=[token_id])

    @torch.no_grad()
    def extend(self, cache: QueryCache, token_ids: Sequence[int], route: bool = True, reserve: int = 0) -> torch.Tensor:
        """Append `token_ids` to the segment; return the next-token logits.

        With `route`, every router layer selects again with the whole segment, exactly as a
        full prefill of the grown segment would (see the module docstring); without it the
        selection stays and the tokens are attended like decoded ones.
        """
        if len(token_ids) == 0:
            raise ValueError("nothing to append")
        self._reserve(cache, cache.length + len(token_ids) + reserve)
        return self._forward(cache, self._ids(token_ids), route=route, known_ids=list(token_ids))

    @torch.no_grad()
    def generate(
        self,
        query_ids: Sequence[int],
        max_new_tokens: int,
        stop_token_ids: Collection[int] = (),
        cache: QueryCache | None = None,
        route: bool | None = None,
        allowed_tokens: Callable[[QueryCache, Sequence[int]], Collection[int] | None] | None = None,
        routing_mask: Sequence[bool] | None = None,
    ) -> tuple[GenerationOutput, QueryCache]:
        """Greedy decoding after a prefill of `query_ids`, or, with `cache`, after appending them.

        `route` (default: True for a prefill, False on a cache): whether appending re-selects
        the documents (`extend`). The stop token is not appended to the returned cache.
        `allowed_tokens(cache, generated so far)`: the token ids the next step may pick (None:
        any), for constrained decoding such as `RoutedIdGrammar`; the cache's routing is the
        selection the round decodes with. `routing_mask`: which tokens of a prefill route (`prefill`).
        """
        if cache is None:
            logits, cache = self.prefill(query_ids, reserve=max_new_tokens, routing_mask=routing_mask)
        elif routing_mask is not None:
            raise ValueError("routing_mask applies to a prefill, not to tokens appended to a cache")
        else:
            logits = self.extend(cache, query_ids, route=bool(route), reserve=max_new_tokens)
        first_logits, generated, stop = logits, [], None
        stops = set(stop_token_ids)
        for _ in range(max_new_tokens):
            allowed = allowed_tokens(cache, generated) if allowed_tokens is not None else None
            token = logits.argmax() if allowed is None else _masked_argmax(logits, allowed)
            token_id = int(token)  # the one host synchronisation per token: the stop check
            generated.append(token_id)
            if token_id in stops:
                stop = token_id
                break
            logits = self._forward(cache, token.view(1, 1), route=False, known_ids=[token_id])
        return GenerationOutput(generated, stop, cache.routing, first_logits.cpu()), cache

    # ----------------------------------------------------------------- internals

    def _ids(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(token_ids, torch.Tensor):
            return token_ids.to(self.device).view(1, -1)
        return torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)

    def _reserve(self, cache: QueryCache, tokens: int) -> None:
        """Room for `tokens` segment tokens in every buffer (doubling, so growth is amortised O(1))."""
        if tokens <= cache.capacity:
            return
        capacity = max(tokens, 2 * cache.capacity)
        for layer, context in enumerate(cache.context_lengths):
            keep = context + cache.length
            cache.keys[layer] = _grown(cache.keys[layer], context + capacity, keep)
            cache.values[layer] = _grown(cache.values[layer], context + capacity, keep)
        if cache.boundary is not None:
            cache.boundary = _grown(cache.boundary, capacity, cache.length)

    def _forward(
        self,
        cache: QueryCache,
        ids: torch.Tensor,
        route: bool,
        known_ids: Sequence[int] | None = None,
        routing_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run `ids` [1, n] after the cached segment; with `route`, (re)select in every router layer,
        from the rows `routing_rows` [n] bool marks (default: all)."""
        count, past = ids.shape[1], cache.length
        self._reserve(cache, past + count)
        token_ids = known_ids if known_ids is not None else ids[0].tolist()
        route = route and self.first_router is not None
        if route:
            cache.routing = []
        hidden = embed_tokens(self.model, ids)
        start = past  # the segment row of hidden's first token
        ropes = rotary_tables(
            self.model, hidden, (self.query_start + past + torch.arange(count, device=self.device))[None]
        )
        for index, layer in enumerate(self.model.model.layers):
            if index == self.first_router:
                cache.boundary[past : past + count] = hidden[0]
                if route and past > 0:
                    # The selection may change: the router half is re-run over the whole segment.
                    hidden, start = cache.boundary[None, : past + count], 0
                    positions = self.query_start + torch.arange(past + count, device=self.device)
                    ropes = rotary_tables(self.model, hidden, positions[None])
            rows = hidden.shape[1]
            normed = layer.input_layernorm(hidden)
            q, k, v = layer.self_attn.project(normed, *ropes[index])
            if route and index in self.router_slot:
                self._route(cache, index, layer, normed[0] if routing_rows is None else normed[0, routing_rows])
            context = cache.context_lengths[index]
            cache.keys[index][context + start : context + start + rows] = k[0]
            cache.values[index][context + start : context + start + rows] = v[0]
            keys, values = cache.layer_keys(index, start + rows)
            # Context and earlier segment tokens are all visible; the new tokens see each other causally.
            mask = None
            if rows > 1:
                seen = keys.shape[1] - rows
                mask = torch.ones(rows, keys.shape[1], dtype=torch.bool, device=self.device)
                mask[:, seen:] = torch.ones(rows, rows, dtype=torch.bool, device=self.device).tril()
            attended = attend(layer, q, keys, values, mask)
            hidden = attention_residual(layer, hidden, attended)
        cache.length = past + count
        cache.token_ids.extend(token_ids)
        return final_logits(self.model, hidden[0, -1])

    def route_layer(
        self, index: int, layer: nn.Module, normed: torch.Tensor
    ) -> tuple[LayerRouting, torch.Tensor, torch.Tensor]:
        """Router layer `index`'s ranked documents for a segment's normed hidden states [n, hidden], and
        the pooled K̄/V̄ [chunks, Hkv, D] of the documents it attends to, in document order (as the
        training forward lays them out), where the store keeps them."""
        attention = layer.self_attn
        slot = self.router_slot[index]
        routing_queries = attention.router_q_proj(normed).view(normed.shape[0], attention.num_heads, -1)
        grouped = group_routing_queries(routing_queries, attention.num_kv_heads, self.config.routing_score)
        scores, docs = self.index.top_documents(slot, grouped, max(self.config.top_k_docs, self.trace_k))
        docs, scores = docs.cpu(), scores.cpu()
        selected = torch.sort(docs[: self.config.top_k_docs]).values
        keys, values = self.store.gather_chunks(slot, selected)
        return LayerRouting(layer=index, docs=docs, scores=scores), keys, values

    def _route(self, cache: QueryCache, index: int, layer: nn.Module, normed: torch.Tensor) -> None:
        """Select this layer's documents and put their pooled K̄/V̄ after the prefix in its buffer.

        Only called when the segment's rows of this layer are all about to be rewritten, so
        the buffer is rebuilt with the new context and room for the segment.
        """
        routing, keys, values = self.route_layer(index, layer, normed)
        cache.routing.append(routing)
        prefix = self.prefix_keys[index].shape[0]
        context, capacity = prefix + keys.shape[0], cache.capacity
        for buffers, prefix_part, chunks in (
            (cache.keys, self.prefix_keys, keys),
            (cache.values, self.prefix_values, values),
        ):
            buffer = buffers[index].new_empty((context + capacity, *buffers[index].shape[1:]))
            buffer[:prefix] = prefix_part[index]
            buffer[prefix:context].copy_(
                chunks, non_blocking=True
            )  # asynchronous from pinned host memory or on the GPU
            buffers[index] = buffer
        cache.context_lengths[index] = context
