"""Random memories for the inference tests: documents, the training row that packs them, and
their encoded store, plus the token ids that scripted interleave tests use as markers."""

from __future__ import annotations

import torch
from batches import VOCAB

from msa_modeling.inference import MemoryEncoder

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
