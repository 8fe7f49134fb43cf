"""Sample builders: turn a retrieval record into example plans.

An example plan is what a shard stores for one training example: the memory as a list
of corpus document indices (in memory order, so memory document i is ``memory[i-1]``),
which of them are positives, and the tokenised query/answer tail with a per-token flag
saying whether the model must generate it. Document tokens are not copied into the plan;
the loader fetches them from the document store when it assembles rows.

Sample kinds (spec section 7):

- ``retrieval`` (CPT): question -> IDs of the positives + delimiter.
- ``qa`` (SFT): question -> IDs + delimiter -> original text of those documents (+ delimiter,
  appended by the system, so not labelled) -> end of retrieval + answer.
- ``interleave`` (multi-hop SFT): one example per retrieval step; step s sees the question
  and the documents retrieved in steps < s and generates the next IDs, or, after the last
  hop, end of retrieval + answer.
- ``lm``: plain text, every token labelled, no memory.

Aux positives (ours): the record's positives for ``retrieval`` and ``qa``; for an
``interleave`` step, the documents of the hop it must retrieve, and for the final (answer)
step all documents of the chain, which the answer depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .templates import TemplateConfig, TemplateTokens
from .tokenization import TextTokenizer

SampleKind = Literal["retrieval", "qa", "interleave", "lm"]


@dataclass
class MemoryConfig:
    """How a memory is filled.

    The memory holds the positives plus negatives up to ``memory_tokens`` rendered tokens:
    first the record's own (hard) negatives, then, if ``random_negatives``, random corpus
    documents. Its order is shuffled, then documents get IDs 1..n in that order.

    ``id_offset_max`` > 0 numbers each example's documents from a random offset o instead
    (IDs o+1..o+n, o log-uniform in 0..id_offset_max, one o per record). Inference numbers a
    memory of N documents 1..N, so a model trained only on small memories has never written
    the longer IDs of a large one; offsets up to the largest evaluated memory train every ID
    length equally often. Only the rendered ID text changes: ``doc_ids`` and routing do not.
    """

    memory_tokens: int = 8192
    max_memory_docs: int = 512
    random_negatives: bool = True
    random_draw_attempts: int = 64
    id_offset_max: int = 0

    def __post_init__(self) -> None:
        for key in ("memory_tokens", "max_memory_docs"):
            if getattr(self, key) < 1:
                raise ValueError(f"memory.{key} must be >= 1, got {getattr(self, key)}")
        if self.id_offset_max < 0:
            raise ValueError(f"memory.id_offset_max must be >= 0, got {self.id_offset_max}")

    @property
    def max_memory_id(self) -> int:
        """The largest document ID an example can carry."""
        return self.max_memory_docs + self.id_offset_max

    def draw_id_offset(self, rng: np.random.Generator) -> int:
        """An ID offset, log-uniform over 0..id_offset_max (0 without drawing when that is 0)."""
        if self.id_offset_max == 0:
            return 0
        # o + 1 log-uniform in [1, id_offset_max + 2): its integer part covers 1..id_offset_max + 1.
        return int(np.exp(rng.uniform(0.0, np.log(self.id_offset_max + 2)))) - 1


@dataclass
class IndexedRecord:
    """A retrieval record whose document ids were resolved to corpus indices."""

    record_index: int
    query: str
    positives: list[int]
    negatives: list[int] = field(default_factory=list)
    answer: str | None = None
    hops: list[list[int]] | None = None


@dataclass
class ExamplePlan:
    """One training example, stored by reference to corpus documents."""

    memory: np.ndarray
    positive: np.ndarray
    tail_tokens: np.ndarray
    tail_labelled: np.ndarray
    record_index: int = -1
    step: int = 0
    id_offset: int = 0  # memory document i is rendered with ID id_offset + i

    def num_tokens(self, template_tokens: TemplateTokens, doc_lengths: np.ndarray) -> int:
        """Length of the assembled example."""
        memory_tokens = int(doc_lengths[self.memory].sum()) if len(self.memory) else 0
        id_prefix_tokens = sum(
            len(template_tokens.doc_id_prefix[self.id_offset + i]) for i in range(1, len(self.memory) + 1)
        )
        suffix_tokens = len(template_tokens.doc_suffix) * len(self.memory)
        return len(template_tokens.prefix) + memory_tokens + id_prefix_tokens + suffix_tokens + len(self.tail_tokens)


class UnusableRecordError(ValueError):
    """A record this sample kind cannot use; the build counts it by ``reason``."""

    reason = "unusable"


class MissingAnswerError(UnusableRecordError):
    """A QA or interleave sample needs an answer the record does not have."""

    reason = "no answer"


class TooManyPositivesError(UnusableRecordError):
    """The record's positives alone exceed ``max_memory_docs``."""

    reason = "more positives than max_memory_docs"


class SampleBuilder:
    """Builds example plans of one ``kind``; deterministic per (seed, record index)."""

    def __init__(
        self,
        kind: SampleKind,
        template: TemplateConfig,
        template_tokens: TemplateTokens,
        tokenizer: TextTokenizer,
        doc_lengths: np.ndarray,
        doc_tokens: Callable[[int], np.ndarray],
        memory: MemoryConfig,
        seed: int,
    ) -> None:
        if len(template_tokens.doc_id_prefix) <= memory.max_memory_id:
            raise ValueError(
                f"template_tokens hold ID prefixes up to {len(template_tokens.doc_id_prefix) - 1}, "
                f"fewer than max_memory_docs + id_offset_max = {memory.max_memory_id}"
            )
        self.kind = kind
        self.template = template
        self.template_tokens = template_tokens
        self.tokenizer = tokenizer
        self.doc_lengths = doc_lengths
        self.doc_tokens = doc_tokens
        self.memory = memory
        self.seed = seed
        # Budgeting with the longest ID prefix keeps every memory within memory_tokens
        # whatever position a document ends up at after shuffling.
        self._overhead = max(len(p) for p in template_tokens.doc_id_prefix[1 : memory.max_memory_id + 1]) + len(
            template_tokens.doc_suffix
        )

    def build(self, record: IndexedRecord) -> list[ExamplePlan]:
        """Example plans for ``record``: one, or one per retrieval step for ``interleave``."""
        rng = np.random.default_rng([self.seed, record.record_index])
        if self.kind in ("qa", "interleave") and record.answer is None:
            raise MissingAnswerError(f"{self.kind} samples need an answer")
        memory, positive_flags = self._fill_memory(record, rng)
        # Drawn after the memory, so that builds without offsets keep their exact examples.
        id_offset = self.memory.draw_id_offset(rng)
        memory_id_of = {int(doc): id_offset + position + 1 for position, doc in enumerate(memory)}
        if self.kind == "retrieval":
            plan = self._plan(
                memory,
                positive_flags,
                [
                    (self.template.query_text(record.query), False),
                    (self.template.target_ids_text(self._ids(record.positives, memory_id_of)), True),
                ],
            )
            plan.record_index = record.record_index
            plan.id_offset = id_offset
            return [plan]
        hops = record.hops if (self.kind == "interleave" and record.hops) else [record.positives]
        plans = []
        steps = range(len(hops) + 1) if self.kind == "interleave" else [len(hops)]
        for step in steps:
            # Earlier rounds are context in a per-step sample: trained in their own sample.
            label_earlier = self.kind == "qa"
            segments: list[tuple[str | list[int], bool]] = [(self.template.query_text(record.query), False)]
            for hop in hops[:step]:
                ids = self._ids(hop, memory_id_of)
                segments.append((self.template.target_ids_text(ids), label_earlier))
                segments.append((self._injected_tokens(ids, memory_id_of), False))
            if step < len(hops):
                segments.append((self.template.target_ids_text(self._ids(hops[step], memory_id_of)), True))
                step_positives = set(hops[step])
            else:
                segments += self.template.final_answer_segments(record.query, record.answer or "")
                segments.append((list(self.template_tokens.eos), True))
                step_positives = set(record.positives)
            flags = np.array([int(doc) in step_positives for doc in memory], dtype=np.uint8)
            plan = self._plan(memory, flags, segments)
            plan.record_index = record.record_index
            plan.step = step
            plan.id_offset = id_offset
            plans.append(plan)
        return plans

    def build_lm(self, text: str, max_tokens: int, text_index: int = -1) -> list[ExamplePlan]:
        """Plain-text examples of at most ``max_tokens`` tokens each, all labelled; a longer
        text is split into consecutive pieces (numbered by ``step``), not cut."""
        tokens = self.tokenizer.encode(text) + list(self.template_tokens.eos)
        room = max_tokens - len(self.template_tokens.prefix)
        empty = np.zeros(0, dtype=np.int64)
        return [
            ExamplePlan(
                empty,
                np.zeros(0, dtype=np.uint8),
                np.asarray(tokens[start : start + room], dtype=np.int64),
                np.ones(len(tokens[start : start + room]), dtype=np.uint8),
                text_index,
                piece,
            )
            for piece, start in enumerate(range(0, len(tokens), room))
        ]

    @staticmethod
    def _ids(doc_indices: Sequence[int], memory_id_of: dict[int, int]) -> list[int]:
        return sorted(memory_id_of[int(doc)] for doc in dict.fromkeys(doc_indices))

    def _injected_tokens(self, memory_ids: list[int], memory_id_of: dict[int, int]) -> list[int]:
        """The original text of the retrieved documents, rendered as in memory, + delimiter."""
        doc_of = {memory_id: doc for doc, memory_id in memory_id_of.items()}
        tokens: list[int] = []
        for memory_id in memory_ids:
            tokens += self.template_tokens.doc_id_prefix[memory_id]
            tokens += self.doc_tokens(doc_of[memory_id]).tolist()
            tokens += self.template_tokens.doc_suffix
        tokens.append(self.tokenizer.special_token_ids[self.template.delimiter])
        return tokens

    def _plan(
        self, memory: np.ndarray, positive_flags: np.ndarray, segments: list[tuple[str | list[int], bool]]
    ) -> ExamplePlan:
        texts = [content for content, _ in segments if isinstance(content, str)]
        encoded = iter(self.tokenizer.encode_batch(texts))
        tokens: list[int] = []
        labelled: list[int] = []
        for content, is_labelled in segments:
            ids = next(encoded) if isinstance(content, str) else content
            tokens += ids
            labelled += [int(is_labelled)] * len(ids)
        return ExamplePlan(
            memory, positive_flags, np.asarray(tokens, dtype=np.int64), np.asarray(labelled, dtype=np.uint8)
        )

    def _fill_memory(self, record: IndexedRecord, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        config = self.memory
        positives = list(dict.fromkeys(int(d) for d in record.positives))
        if record.hops:
            positives = list(dict.fromkeys(positives + [int(d) for hop in record.hops for d in hop]))
        chosen = list(positives)
        taken = set(chosen)
        used = sum(int(self.doc_lengths[d]) + self._overhead for d in chosen)

        def try_add(doc: int) -> bool:
            nonlocal used
            cost = int(self.doc_lengths[doc]) + self._overhead
            if doc in taken or used + cost > config.memory_tokens or len(chosen) >= config.max_memory_docs:
                return False
            chosen.append(doc)
            taken.add(doc)
            used += cost
            return True

        hard_negatives = [int(d) for d in record.negatives if int(d) not in taken]
        for position in rng.permutation(len(hard_negatives)):
            try_add(hard_negatives[position])
        if config.random_negatives and len(self.doc_lengths) > len(taken):
            misses = 0
            while misses < config.random_draw_attempts and len(chosen) < config.max_memory_docs:
                misses = 0 if try_add(int(rng.integers(len(self.doc_lengths)))) else misses + 1
        if len(chosen) > config.max_memory_docs:
            raise TooManyPositivesError(
                f"record {record.record_index} has {len(chosen)} positives, more than "
                f"max_memory_docs={config.max_memory_docs}"
            )
        memory = np.asarray(chosen, dtype=np.int64)[rng.permutation(len(chosen))]
        flags = np.isin(memory, np.asarray(positives, dtype=np.int64)).astype(np.uint8)
        return memory, flags
