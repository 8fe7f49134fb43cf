"""`RoutingIndex`: the routing keys K̄R on the GPUs, sharded by document, scored in tiles.

Each shard holds whole documents, so a shard's document scores (max over its chunks) are
final; the shards' top-k lists are then merged. Ties go to the lower document index, as in
training (`routing.rank_documents`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..routing import prepare_routing_queries

logger = logging.getLogger(__name__)


def group_routing_queries(
    routing_queries: torch.Tensor, num_kv_heads: int, routing_score: str = "cosine"
) -> torch.Tensor:
    """Q_R [R, H, D] -> [R, Hkv * D] fp32, such that `grouped @ K̄R.T` is the head-mean score.

    The mean over a KV group's query heads of sim(q_h, k) is <sum_h prepared(q_h), k> / H for
    a key stored as `routing.prepare_routing_keys` leaves it (the folding of `routing.score_chunks`).
    """
    queries = prepare_routing_queries(routing_queries, routing_score)
    num_heads = queries.shape[1]
    grouped = queries.view(queries.shape[0], num_kv_heads, num_heads // num_kv_heads, -1).sum(2) / num_heads
    return grouped.flatten(1)


def ranking_keys(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (score descending, index ascending): one `topk` ranks without ties.

    The fp32 score's bits are mapped to an int32 that orders like the float (negative floats
    have their magnitude bits flipped; -0.0 is folded into +0.0 first), and the index fills
    the low 32 bits inverted, so that a lower index wins a tie. No NaN scores.
    """
    return _keys_with_low_bits(scores, (1 << 32) - 1 - index.long())


def _keys_with_low_bits(scores: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    bits = (scores.float() + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return ordered * (1 << 32) + low


def top_k_lowest_index_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, index) pairs, best first; equal scores keep the lower index first.

    Nothing here waits for the device (no `nonzero`, no `.item()`), so the shards of an
    index on several GPUs are scored concurrently.
    """
    k = min(k, scores.numel())
    if k == 0:
        return scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=scores.device)
    keys = ranking_keys(scores, torch.arange(scores.numel(), device=scores.device))
    index = torch.topk(keys, k).indices
    return scores[index], index


def merge_top_k(scores: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge shard candidates: the k best overall, ties to the lower document index."""
    k = min(k, scores.numel())
    position = torch.topk(ranking_keys(scores, docs), k).indices
    return scores[position], docs[position]


@dataclass
class IndexShard:
    """The routing keys of documents first_doc .. first_doc + num_docs - 1 on one device."""

    device: torch.device
    first_doc: int
    num_docs: int
    chunk_doc: torch.Tensor  # [C_s] long, local document index of every chunk
    routing_keys: list[torch.Tensor]  # per router layer [C_s, Hkv * D], normalised
    _low_bits: torch.Tensor | None = None  # ranking keys' tie-break part of every global document

    def top_documents(self, layer_slot: int, grouped_queries: torch.Tensor, k: int, tile_size: int):
        """(scores, global document indices) of the shard's k best documents for one router layer.

        Queues kernels on the shard's device only; nothing waits for it.
        """
        keys = self.routing_keys[layer_slot]
        k = min(k, self.num_docs)
        if self._low_bits is None:
            self._low_bits = (
                (1 << 32) - 1 - torch.arange(self.first_doc, self.first_doc + self.num_docs, device=self.device)
            )
        queries = grouped_queries.to(self.device, keys.dtype, non_blocking=True)
        doc_scores = torch.full((self.num_docs,), float("-inf"), device=self.device)
        for start in range(0, keys.shape[0], tile_size):
            # The max over routing tokens is exact in the keys' dtype; only [tile] is cast.
            chunk_scores = (queries @ keys[start : start + tile_size].T).amax(0).float()
            doc_scores.scatter_reduce_(0, self.chunk_doc[start : start + tile_size], chunk_scores, reduce="amax")
        local = torch.topk(_keys_with_low_bits(doc_scores, self._low_bits), k).indices
        return doc_scores[local], local + self.first_doc

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.routing_keys, self.chunk_doc))


def shard_boundaries(doc_chunk_offsets: torch.Tensor, num_shards: int) -> list[int]:
    """Document boundaries splitting the chunks into `num_shards` nearly equal runs of whole documents."""
    total = int(doc_chunk_offsets[-1])
    targets = torch.tensor([total * s / num_shards for s in range(1, num_shards)], dtype=torch.float64)
    cuts = torch.searchsorted(doc_chunk_offsets.double(), targets).tolist()
    return [0, *cuts, doc_chunk_offsets.numel() - 1]


class RoutingIndex:
    """Scores a question's routing queries against every chunk and returns the top-k documents.

    Args:
        shards: document-contiguous shards, in document order.
        tile_size: chunks scored at once per shard, bounding the [R, tile] score matrix.
    """

    def __init__(self, shards: Sequence[IndexShard], tile_size: int = 65536) -> None:
        self.shards = list(shards)
        self.tile_size = tile_size
        self.num_docs = sum(shard.num_docs for shard in self.shards)
        gpus = {shard.device for shard in self.shards if shard.device.type == "cuda" and shard.num_docs}
        # One thread per GPU queues that GPU's kernels, so the host-side launch work of the
        # shards overlaps too (kernel launches release the GIL); the GPUs run concurrently anyway.
        self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix="routing") if len(gpus) > 1 else None

    @classmethod
    def from_store(
        cls,
        store,
        devices: Sequence[torch.device | str] | None = None,
        dtype: torch.dtype | None = None,
        tile_size: int = 65536,
    ) -> RoutingIndex:
        """Copy a `MemoryStore`'s routing keys to `devices` (default: every visible GPU, else the CPU)."""
        if devices is None:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
        devices = [torch.device(d) for d in devices]
        bounds = shard_boundaries(store.doc_chunk_offsets, len(devices))
        chunk_doc = store.chunk_doc()
        shards = []
        for device, first, end in zip(devices, bounds[:-1], bounds[1:]):
            chunk_start, chunk_end = int(store.doc_chunk_offsets[first]), int(store.doc_chunk_offsets[end])
            shards.append(
                IndexShard(
                    device=device,
                    first_doc=first,
                    num_docs=end - first,
                    chunk_doc=(chunk_doc[chunk_start:chunk_end] - first).to(device),
                    routing_keys=[
                        keys[chunk_start:chunk_end].to(device, dtype or keys.dtype) for keys in store.routing_keys
                    ],
                )
            )
        logger.info("routing index: %d documents over %s", store.num_docs, [str(d) for d in devices])
        return cls(shards, tile_size)

    def top_documents(
        self, layer_slot: int, grouped_queries: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores fp32 [k'], document indices [k']) best first, k' = min(k, documents), on the first shard's device.

        On one device nothing waits for it: the caller's first read of the result does. On
        several GPUs, each GPU's kernels are queued by its own thread and run concurrently, and
        the call returns once every shard's k candidates are on the host and merged.
        """
        active = [shard for shard in self.shards if shard.num_docs]
        home = self.shards[0].device
        if self._pool is not None:
            try:
                return self._top_documents_on_gpus(active, layer_slot, grouped_queries, k)
            except RuntimeError:
                # Whatever stops the threaded path (pinned memory, events), the plain path below
                # gives the same documents: use it from now on.
                logger.exception(
                    "routing over %d GPUs with host-side merging failed; merging on %s instead",
                    len(active),
                    self.shards[0].device,
                )
                self._pool = None
        results = [shard.top_documents(layer_slot, grouped_queries, k, self.tile_size) for shard in active]
        if len(results) == 1:
            return results[0][0].to(home), results[0][1].to(home)
        scores = torch.cat([s.to(home) for s, _ in results])
        docs = torch.cat([d.to(home) for _, d in results])
        return merge_top_k(scores, docs, k)

    def _top_documents_on_gpus(self, active, layer_slot: int, grouped_queries: torch.Tensor, k: int):
        """Several GPUs: the queries go out and the shards' candidates come back through pinned
        host memory (no GPU-to-GPU copies, which are staged and synchronous without peer
        access), each GPU's kernels are queued by its own thread, and the few candidates are
        merged on the host."""
        queries = grouped_queries.to("cpu").pin_memory()

        def score(shard: IndexShard):
            scores, docs = shard.top_documents(layer_slot, queries, k, self.tile_size)
            host_scores = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            host_docs = torch.empty(docs.shape, dtype=docs.dtype, pin_memory=True)
            host_scores.copy_(scores, non_blocking=True)
            host_docs.copy_(docs, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(shard.device))
            return host_scores, host_docs, done

        results = list(self._pool.map(score, active))
        for _, _, done in results:
            done.synchronize()
        scores, docs = merge_top_k(torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results]), k)
        home = self.shards[0].device
        return scores.to(home, non_blocking=True), docs.to(home, non_blocking=True)

    def device_bytes(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for shard in self.shards:
            used[str(shard.device)] = used.get(str(shard.device), 0) + shard.nbytes()
        return used
