"""Inference over an encoded memory (spec section 8).

- `MemoryEncoder` encodes documents once: per router layer the chunk-pooled K̄, V̄ and the
  normalised routing keys K̄R, plus the prefix K/V of every layer.
- `MemoryStore` holds them on the host (pinned when a GPU is used), saves them as
  safetensors shards plus a manifest, reloads them and takes appended documents.
- `RoutingIndex` keeps the routing keys on the GPUs, sharded by document, and returns the
  merged top-k documents for a question.
- `MSAGenerator` routes, prefills sparsely and decodes with a KV cache;
  `MemoryInterleave` runs the retrieve-inject-answer loop of spec section 7.
"""

from .encoder import MemoryEncoder
from .generation import GenerationOutput, LayerRouting, MSAGenerator
from .interleave import (
    InterleaveFormat,
    InterleaveResult,
    MemoryInterleave,
    RetrievalRound,
    RoutedIdGrammar,
    TranscriptRounds,
    selected_memory_ids,
)
from .routing_index import RoutingIndex
from .store import MemoryStore

__all__ = [
    "GenerationOutput",
    "InterleaveFormat",
    "InterleaveResult",
    "LayerRouting",
    "MSAGenerator",
    "MemoryEncoder",
    "MemoryInterleave",
    "MemoryStore",
    "RetrievalRound",
    "RoutedIdGrammar",
    "RoutingIndex",
    "TranscriptRounds",
    "selected_memory_ids",
]
