"""Random memories for the inference tests: documents, the training row that packs them, and
their encoded store, plus the token ids that scripted interleave tests use as markers and a
generator that replays scripted rounds."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from batches import VOCAB

from msa_modeling.inference import MemoryEncoder
from msa_modeling.inference.generation import GenerationOutput

# Token ids of the interleave markers in scripted tests: the end of an ID round, the end of
# retrieval, and end of sequence (all below VOCAB, above the scripted documents' ids).
DELIM, END, EOS = 90, 91, 92

IGNORE = -100


def random_memory(seed: int, num_docs: int = 7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=generator))  # noqa: E731
    tokens = lambda n: torch.randint(3, VOCAB, (n,), generator=generator).tolist()  # noqa: E731
    return {
        "prefix": tokens(3),
        "docs": [tokens(draw(1, 13)) for _ in range(num_docs)],
        "question": tokens(4),
        "answer": tokens(3),
    }


def training_row(memory: dict) -> dict[str, torch.Tensor]:
    """One packed example `[prefix][docs][question][answer]` with the answer labelled."""
    ids, doc_ids, labels = list(memory["prefix"]), [-2] * len(memory["prefix"]), [IGNORE] * len(memory["prefix"])
    for number, doc in enumerate(memory["docs"], start=1):
        ids += doc
        doc_ids += [number] * len(doc)
        labels += [IGNORE] * len(doc)
    ids += memory["question"] + memory["answer"]
    doc_ids += [0] * (len(memory["question"]) + len(memory["answer"]))
    labels += [IGNORE] * len(memory["question"]) + memory["answer"]
    return {k: torch.tensor([v]) for k, v in (("input_ids", ids), ("doc_ids", doc_ids), ("labels", labels))}


def encoded_store(model, memory: dict, max_batch_tokens: int = 24):
    encoder = MemoryEncoder(model, max_batch_tokens=max_batch_tokens, show_progress=False)
    store = encoder.new_store(memory["prefix"])
    encoder.add_documents(store, memory["docs"])
    return store


class ScriptedGenerator:
    """Stands in for `MSAGenerator`: replays scripted rounds and records what it was given."""

    def __init__(self, store, rounds: list[list[int]]) -> None:
        self.store = store
        self.rounds = list(rounds)
        self.contexts: list[list[int]] = []
        self.routing_masks: list[list[bool] | None] = []  # per call, the routing mask of its prefill

    def generate(
        self,
        query_ids,
        max_new_tokens,
        stop_token_ids=(),
        cache=None,
        route=None,
        allowed_tokens=None,
        routing_mask=None,
    ):
        if cache is not None and route:  # a routed extension: the round sees the whole segment
            query_ids = cache.token_ids + list(query_ids)
        self.contexts.append(list(query_ids))
        self.routing_masks.append(None if routing_mask is None else list(routing_mask))
        tokens = self.rounds.pop(0)
        stop = tokens[-1] if tokens[-1] in stop_token_ids else None
        cached = list(query_ids) + (tokens[:-1] if stop is not None else tokens)
        return GenerationOutput(tokens, stop, [], torch.zeros(1)), SimpleNamespace(token_ids=cached)
