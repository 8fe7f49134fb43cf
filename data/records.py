"""Tokenizer-agnostic text records that every reader and generator produces."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One memory document; ``doc_id`` is the corpus's own (string) identifier."""

    doc_id: str
    text: str
    title: str = ""

    def full_text(self) -> str:
        """Title and body as one string, the way BEIR corpora are usually embedded."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass
class RetrievalRecord:
    """A query with its relevant documents.

    ``hops`` lists, for multi-hop chains, the documents needed at each retrieval step
    in order; when it is given, ``positives`` is the union of the hops.
    """

    query: str
    positives: list[str]
    negatives: list[str] = field(default_factory=list)
    answer: str | None = None
    hops: list[list[str]] | None = None
    query_id: str = ""

    def __post_init__(self) -> None:
        if self.hops is not None and not self.positives:
            self.positives = [doc_id for hop in self.hops for doc_id in hop]


@dataclass
class RetrievalDataset:
    """A corpus plus the records that query it."""

    corpus: list[Document]
    records: list[RetrievalRecord]

    def corpus_by_id(self) -> dict[str, Document]:
        """Documents keyed by their corpus id."""
        return {doc.doc_id: doc for doc in self.corpus}
