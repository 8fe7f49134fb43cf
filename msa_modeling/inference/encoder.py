"""`MemoryEncoder`: documents -> per-router-layer K̄, V̄, K̄R chunks; prefix -> K/V of every layer.

Each document is encoded alone, causally, with the positions the training forward gives its
tokens (spec section 4): 0..len-1 (document-wise positions, the default), or, for a model with
`document_positions=False` (global positions, counted from the example's first token), at its
offset in the memory: prefix length + the tokens of the documents before it in the store, so
that positions run on from the prefix through the documents in order. Either way a document's
states depend only on its tokens and its start position, so appending documents later equals
encoding them all at once. Documents are batched by length (right
padding: under a causal mask real tokens never see the padding), and each batch's results
go to the store's device at once: to the host by default, so that device memory is bounded by
`max_batch_tokens`, or, with `storage_device` the model's GPU, kept there, which saves the
copies to the host and back when the whole memory fits beside the model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn
from tqdm.auto import tqdm

from ..routing import prepare_routing_keys
from .layer_steps import attend, attention_residual, embed_tokens, rotary_tables
from .store import EncodedDocuments, MemoryStore, _offsets, check_signature, model_identity, model_signature

logger = logging.getLogger(__name__)


@dataclass
class LayerStates:
    """What one layer computed for a causal batch, before its attention."""

    index: int
    layer: nn.Module
    normed: torch.Tensor  # [B, L, hidden], the attention's (and router's) input
    keys: torch.Tensor  # [B, L, Hkv, D] after the k norm and RoPE
    values: torch.Tensor  # [B, L, Hkv, D]


def causal_layer_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    last_layer: int,
    start_positions: torch.Tensor | None = None,
) -> Iterator[LayerStates]:
    """Run layers 0..last_layer over independent causal rows, yielding each layer's states; the
    last layer's attention and feed-forward are skipped (nobody reads them).

    Row b's positions are `start_positions[b] + 0..L-1` (default: from 0).
    """
    batch, length = input_ids.shape
    hidden = embed_tokens(model, input_ids)
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    if start_positions is not None:
        positions = positions + start_positions.to(input_ids.device).view(batch, 1)
    ropes = rotary_tables(model, hidden, positions)
    for index, layer in enumerate(model.model.layers[: last_layer + 1]):
        normed = layer.input_layernorm(hidden)
        q, k, v = layer.self_attn.project(normed, *ropes[index])
        yield LayerStates(index=index, layer=layer, normed=normed, keys=k, values=v)
        if index < last_layer:
            hidden = attention_residual(layer, hidden, attend(layer, q, k, v, is_causal=True))


def pool_padded_chunks(
    states: torch.Tensor,
    lengths: torch.Tensor,
    chunk_size: int,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of [B, L, ...] states over each row's chunks of real tokens, in fp32.

    Returns [C, ...]: the chunks of row 0, then of row 1, ...; a last partial chunk is
    averaged over its real tokens, as `routing.pool_chunks` does in training. `present`
    (from `present_chunks`, on the states' device) avoids a device synchronisation.
    """
    batch, length = states.shape[:2]
    padded_length = -(-length // chunk_size) * chunk_size
    real = torch.arange(padded_length, device=states.device)[None, :] < lengths[:, None]
    padded = states.new_zeros((batch, padded_length, *states.shape[2:]), dtype=torch.float32)
    padded[:, :length] = states.float()
    padded = padded * real.view(batch, padded_length, *([1] * (states.dim() - 2)))
    sums = padded.view(batch * (padded_length // chunk_size), chunk_size, *states.shape[2:]).sum(1)
    counts = real.view(-1, chunk_size).sum(1)
    if present is None:
        present = torch.nonzero(counts > 0).flatten()
    return sums[present] / counts[present].view(-1, *([1] * (states.dim() - 2)))


class _PinnedStaging:
    """One page-locked host buffer per tensor kind, grown as batches need, reused across batches
    (`pin=False`: ordinary host memory, for machines without CUDA)."""

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.buffers: dict[str, torch.Tensor] = {}

    def copy(self, name: str, source: torch.Tensor) -> torch.Tensor:
        """`source` (on a GPU) copied into the buffer; a view valid until the next copy of `name`."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < source.numel() or buffer.dtype != source.dtype:
            grown = 2 * buffer.numel() if buffer is not None and buffer.dtype == source.dtype else 0
            buffer = torch.empty(max(source.numel(), grown), dtype=source.dtype, pin_memory=self.pin)
            self.buffers[name] = buffer
        host = buffer[: source.numel()].view(source.shape)
        host.copy_(source)  # synchronous: the view is read right after
        return host


def present_chunks(lengths: Sequence[int], length: int, chunk_size: int) -> torch.Tensor:
    """Flat indices (row-major over [B, ceil(length / chunk_size)]) of the chunks holding real tokens."""
    per_row = -(-length // chunk_size)
    return torch.cat([row * per_row + torch.arange(-(-n // chunk_size)) for row, n in enumerate(lengths)])


def length_sorted_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Document indices grouped, longest first, so that rows x longest row <= max_batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


class MemoryEncoder:
    """Encodes a prefix and documents for `model` (an `MSAForCausalLM`) on `device`.

    Args:
        model: the MSA model; it is used as is (put it in eval mode and on `device` first).
        storage_dtype: dtype of the stored K̄/V̄/K̄R (default: the model's dtype).
        max_batch_tokens: padded tokens per encoding batch.
        show_progress: a tqdm bar over documents.
        storage_device: where the stored K̄/V̄/K̄R live (default: the host). The prefix K/V and
            the documents' token ids stay on the host either way.
    """

    def __init__(
        self,
        model: nn.Module,
        storage_dtype: torch.dtype | None = None,
        max_batch_tokens: int = 32768,
        show_progress: bool = True,
        storage_device: torch.device | str | None = None,
    ) -> None:
        config = model.config
        if not config.router_layers:
            raise ValueError("the model has no router layers, so there is no memory to encode")
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.storage_dtype = storage_dtype or next(model.parameters()).dtype
        self.storage_device = torch.device(storage_device) if storage_device is not None else torch.device("cpu")
        self.max_batch_tokens = max_batch_tokens
        self.show_progress = show_progress
        self.router_slot = {layer: slot for slot, layer in enumerate(config.router_layers)}

    @torch.no_grad()
    def new_store(self, prefix_ids: Sequence[int]) -> MemoryStore:
        """An empty memory whose prefix K/V (every layer, positions 0..T-1) are encoded and cached."""
        ids = torch.tensor([list(prefix_ids)], dtype=torch.long, device=self.device)
        keys, values = [], []
        if ids.numel() > 0:
            for states in causal_layer_states(self.model, ids, self.config.num_hidden_layers - 1):
                keys.append(states.keys[0].to("cpu", self.storage_dtype))
                values.append(states.values[0].to("cpu", self.storage_dtype))
        else:
            shape = (0, self.config.num_key_value_heads, self.model.model.layers[0].self_attn.head_dim)
            keys = [torch.zeros(shape, dtype=self.storage_dtype) for _ in range(self.config.num_hidden_layers)]
            values = [k.clone() for k in keys]
        return MemoryStore(
            signature=model_signature(self.config),
            prefix_ids=ids[0].cpu(),
            prefix_keys=keys,
            prefix_values=values,
            model_identity=model_identity(self.model),
        )

    def add_documents(self, store: MemoryStore, documents: Sequence[Sequence[int]]) -> None:
        """Encode `documents` (token id lists, rendered as the model saw them in training) and append them.

        With global positions the new documents continue after the store's last token:
        the first starts at prefix length + `store.num_tokens`.
        """
        check_signature(store.signature, self.config, "the store")
        start = store.prefix_ids.numel() + store.num_tokens
        store.extend(self.encode_documents(documents, first_position=start))

    @torch.no_grad()
    def encode_documents(self, documents: Sequence[Sequence[int]], first_position: int = 0) -> EncodedDocuments:
        """Encode documents independently; the result keeps their order.

        `first_position` matters only with global positions (`document_positions=False`):
        the position of the first document's first token; the others follow it in order
        (document i starts at `first_position` + the lengths of documents 0..i-1).
        `add_documents` passes prefix length + the tokens already in the store.
        """
        lengths = [len(doc) for doc in documents]
        if any(n == 0 for n in lengths):
            raise ValueError(f"document {lengths.index(0)} is empty")
        if self.config.document_positions:
            starts = [0] * len(documents)
        else:
            starts = list(accumulate(lengths[:-1], initial=first_position))
        chunk_size = self.config.chunk_size
        num_chunks = torch.tensor([-(-n // chunk_size) for n in lengths], dtype=torch.long)
        doc_start = _offsets(num_chunks)[:-1]
        # Per kind ("k", "v", "r"), one tensor [router layers, chunks, ...] in document order on the
        # storage device, allocated at the first batch; each batch's chunks are copied to their
        # final rows once. (Concatenating the batches and reordering after held and copied the
        # memory twice more: at 1M tokens, tens of GB of host copies, most of an encoding's time.)
        stored: dict[str, torch.Tensor] = {}
        # From a GPU to the host, each batch goes through a page-locked staging buffer: a copy into
        # pageable memory ran at 1.5 GB/s on an H100 host, into pinned memory at 54 GB/s (BENCHMARKS.md).
        to_host = self.storage_device.type == "cpu"
        staging = _PinnedStaging() if to_host and self.device.type == "cuda" else None
        progress = tqdm(total=len(documents), desc="encoding memory", unit="doc", disable=not self.show_progress)
        for batch in length_sorted_batches(lengths, self.max_batch_tokens):
            index = torch.tensor(batch, dtype=torch.long)
            rows = torch.repeat_interleave(
                doc_start[index] - _offsets(num_chunks[index])[:-1], num_chunks[index]
            ) + torch.arange(int(num_chunks[index].sum()))
            rows = rows.to(self.storage_device)
            for name, encoded in self._encode_batch([documents[i] for i in batch], [starts[i] for i in batch]).items():
                if staging is not None:
                    encoded = staging.copy(name, encoded)
                else:
                    encoded = encoded.to(self.storage_device)
                if name not in stored:
                    stored[name] = torch.empty(
                        (encoded.shape[0], int(num_chunks.sum()), *encoded.shape[2:]),
                        dtype=encoded.dtype,
                        device=self.storage_device,
                    )
                stored[name].index_copy_(1, rows, encoded)
            progress.update(len(batch))
        progress.close()
        logger.info("encoded %d documents, %d tokens, %d chunks", len(documents), sum(lengths), int(num_chunks.sum()))
        return EncodedDocuments(
            doc_num_chunks=num_chunks,
            doc_tokens=[torch.tensor(list(doc), dtype=torch.int32) for doc in documents],
            keys=list(stored["k"].unbind(0)),
            values=list(stored["v"].unbind(0)),
            routing_keys=list(stored["r"].unbind(0)),
        )

    def _encode_batch(self, documents: list[Sequence[int]], starts: list[int]) -> dict[str, torch.Tensor]:
        """{"k", "v", "r"}: [router layers, the batch's chunks (row by row), ...] on the model's device."""
        longest = max(len(doc) for doc in documents)
        ids = torch.zeros((len(documents), longest), dtype=torch.long)
        for row, doc in enumerate(documents):
            ids[row, : len(doc)] = torch.as_tensor(list(doc), dtype=torch.long)
        ids = ids.to(self.device)
        lengths = torch.tensor([len(doc) for doc in documents], device=self.device)
        chunk_size = self.config.chunk_size
        present = present_chunks([len(doc) for doc in documents], longest, chunk_size).to(self.device)
        on_device: dict[str, dict[int, torch.Tensor]] = {"k": {}, "v": {}, "r": {}}
        start_positions = None if self.config.document_positions else torch.tensor(starts, device=self.device)
        for states in causal_layer_states(self.model, ids, max(self.config.router_layers), start_positions):
            slot = self.router_slot.get(states.index)
            if slot is None:
                continue
            attention = states.layer.self_attn
            routing_keys = attention.router_k_proj(states.normed).view(*ids.shape, attention.num_kv_heads, -1)
            # Training casts pooled K/V back to the model dtype before attending to them.
            keys = pool_padded_chunks(states.keys, lengths, chunk_size, present).to(states.keys.dtype)
            values = pool_padded_chunks(states.values, lengths, chunk_size, present).to(states.values.dtype)
            pooled_routing_keys = pool_padded_chunks(routing_keys, lengths, chunk_size, present)
            prepared = prepare_routing_keys(pooled_routing_keys, self.config.routing_score).flatten(1)
            on_device["k"][slot] = keys.to(self.storage_dtype)
            on_device["v"][slot] = values.to(self.storage_dtype)
            on_device["r"][slot] = prepared.to(self.storage_dtype)
        # One copy per tensor kind and batch: the device is waited for once per batch, not per layer.
        return {name: torch.stack([layers[slot] for slot in range(len(layers))]) for name, layers in on_device.items()}
