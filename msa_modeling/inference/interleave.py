"""`MemoryInterleave`: the retrieve-inject-answer loop of spec section 7.

Each round the model generates document IDs and the round delimiter; the original text of
those documents (as stored: `[i]. text` + suffix) and the delimiter are appended to the query
segment, which is routed again. The model ends retrieval with `<End-of-Retrieve>` and goes
on with the answer; after `max_rounds` rounds the end marker is appended for it. This mirrors
how the data package lays out interleave training samples.

A new round extends the round's KV cache (`MSAGenerator.extend`): the new tokens run through
the layers below the first router layer only, while the router half is re-run over the whole
segment, because routing with the grown segment may select other documents, and a changed
selection changes every earlier token's states from that layer up (spec sections 3 and 7).
`incremental=False` re-prefills the whole segment each round instead (the same result).

**Re-prefilled transcripts** (`TranscriptRounds`, the `reference` protocol). The released MSA-4B
engine does not grow the segment after a round. It injects the round's documents as text, each
once in ascending ID order, `[i]. text\\n`, then the delimiter; and the next round prefills the
whole transcript so far from scratch, tokenised anew from its text: the first round's prompt,
then each round's generated text (its IDs and delimiter) and injected block. Only the
instructions with the question and the last injected block route
(`reference_protocol.transcript_routing_mask`). Given a `TranscriptRounds`, `answer` does that.

**IDs of routed documents only** (`InterleaveFormat.routed_ids_only`, off by default). In its
router layers the model attends to the documents their routing selected and to no other, so
an ID outside that selection names a document it has not seen. With the option on, a round's
IDs are decoded under `RoutedIdGrammar`: each is one of the selected documents' IDs, as the
template writes it. This is decoding over a candidate set, as generative retrieval with a
prefix tree of valid IDs does; the answer after the rounds stays unconstrained.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .generation import LayerRouting, MSAGenerator, QueryCache
from .reference_protocol import DELIMITER, injected_document_text, transcript_routing_mask

logger = logging.getLogger(__name__)


@dataclass
class InterleaveFormat:
    """Token ids and patterns of the interleave protocol (defaults: the reference format).

    Attributes:
        delimiter_id: token closing a round of IDs (`<|object_ref_end|>`).
        end_of_retrieval_id: token ending retrieval (`<End-of-Retrieve>`).
        stop_token_ids: tokens ending the answer (EOS, a chat end marker).
        memory_id_pattern: regex whose first group is a memory ID (1-based) in generated text.
        parse_memory_id: that group's text -> the ID (``int`` for decimal digits).
        max_rounds: retrieval rounds before the end marker is forced.
        max_round_tokens: tokens a round of IDs may take.
        max_answer_tokens: tokens the answer may take.
        encode_memory_id: a memory ID -> its tokens as a round writes one (`[12]`); needed by
            `routed_ids_only`.
        routed_ids_only: decode a round's IDs among the documents the routers selected
            (`RoutedIdGrammar`).
    """

    delimiter_id: int
    end_of_retrieval_id: int
    stop_token_ids: Sequence[int] = ()
    memory_id_pattern: str = r"\[(\d+)\]"
    parse_memory_id: Callable[[str], int] = int
    max_rounds: int = 3
    max_round_tokens: int = 64
    max_answer_tokens: int = 64
    encode_memory_id: Callable[[int], Sequence[int]] | None = None
    routed_ids_only: bool = False

    def __post_init__(self) -> None:
        if self.routed_ids_only and self.encode_memory_id is None:
            raise ValueError("routed_ids_only needs encode_memory_id (a memory ID -> its tokens)")


def selected_memory_ids(routing: Sequence[LayerRouting], top_k_docs: int) -> list[list[int]]:
    """Per router layer, the memory IDs (1-based) of the documents it attends to: its first `top_k_docs`."""
    return [[int(doc) + 1 for doc in layer.docs[:top_k_docs].tolist()] for layer in routing]


class RoutedIdGrammar:
    """The tokens a retrieval round may write next when its IDs are the selected documents'.

    A round is `ID+ delimiter` or `<End-of-Retrieve>` alone, each ID one of `id_tokens`'
    sequences and written at most once, so a round ends within as many IDs as there are
    candidates. The sequences are walked as a prefix tree; one that is a prefix of another (a
    merged BPE bracket) may both end and go on. With no candidates (an empty memory) only
    `<End-of-Retrieve>` is allowed.

    Args:
        id_tokens: {memory ID: its tokens}.
        delimiter_id: the token closing a round of IDs.
        end_of_retrieval_id: the token ending retrieval.
    """

    def __init__(self, id_tokens: dict[int, Sequence[int]], delimiter_id: int, end_of_retrieval_id: int) -> None:
        self.delimiter_id = delimiter_id
        self.end_of_retrieval_id = end_of_retrieval_id
        self.root: dict = {}
        self.ids_below: dict[int, set[int]] = {id(self.root): set()}  # node -> the IDs ending in its subtree
        for memory_id, tokens in id_tokens.items():
            if not tokens:
                raise ValueError(f"memory ID {memory_id} has no tokens")
            node = self.root
            self.ids_below[id(node)].add(memory_id)
            for token in tokens:
                node = node.setdefault(token, {})
                self.ids_below.setdefault(id(node), set()).add(memory_id)
            node[None] = memory_id  # the key None marks the end of an ID

    @classmethod
    def from_routing(
        cls,
        routing: Sequence[LayerRouting],
        top_k_docs: int,
        protocol: InterleaveFormat,
    ) -> RoutedIdGrammar:
        """The grammar of the documents each router layer attends to (its first `top_k_docs`)."""
        ids = sorted({i for layer_ids in selected_memory_ids(routing, top_k_docs) for i in layer_ids})
        return cls(
            {i: list(protocol.encode_memory_id(i)) for i in ids}, protocol.delimiter_id, protocol.end_of_retrieval_id
        )

    def allowed_after(self, generated: Sequence[int]) -> set[int] | None:
        """Tokens allowed after `generated` (this round's tokens so far); None once off the grammar."""
        node, written = self.root, set()
        for token in generated:
            if token in node:
                node = node[token]
            elif None in node and token in self.root:
                written.add(node[None])
                node = self.root[token]
            else:
                return None

        def open_children(of: dict) -> set[int]:
            return {t for t, child in of.items() if t is not None and self.ids_below[id(child)] - written}

        allowed = open_children(node)
        if node is self.root:
            allowed.add(self.end_of_retrieval_id)
        elif None in node and node[None] not in written:  # an ID is complete: another may follow, or the delimiter
            written.add(node[None])
            allowed |= open_children(self.root) | {self.delimiter_id}
        return allowed


@dataclass
class TranscriptRounds:
    """Later rounds as the released engine runs them: each re-prefills the transcript so far.

    Attributes:
        query_text: the first round's query segment as text (`query_ids` is its encoding).
        encode: text -> token ids, the text tokenised whole, special strings as single ids,
            nothing added (the loop's `decode` must keep special tokens, so that a decoded round
            keeps its delimiter).
    """

    query_text: str
    encode: Callable[[str], list[int]]


@dataclass
class RetrievalRound:
    memory_ids: list[int]  # IDs the model generated this round (1-based, valid ones)
    routing: list[LayerRouting]  # the router's selection while it generated them


@dataclass
class InterleaveResult:
    answer: str
    answer_token_ids: list[int]
    rounds: list[RetrievalRound] = field(default_factory=list)
    answer_routing: list[LayerRouting] = field(default_factory=list)

    @property
    def retrieved_ids(self) -> list[int]:
        """Every memory ID retrieved over all rounds, first occurrence order."""
        return list(dict.fromkeys(i for r in self.rounds for i in r.memory_ids))

    @property
    def first_routing(self) -> list[LayerRouting]:
        """The selection the question itself routed to: the first round's, or the answer's where no round opened."""
        return self.rounds[0].routing if self.rounds else self.answer_routing


class MemoryInterleave:
    """Answers questions over a memory by interleaving retrieval rounds and generation.

    Args:
        generator: the generator over the encoded memory.
        decode: token ids -> text (the tokenizer's decode).
        protocol: token ids and limits of the loop.
    """

    def __init__(
        self,
        generator: MSAGenerator,
        decode: Callable[[Sequence[int]], str],
        protocol: InterleaveFormat,
        incremental: bool = True,
    ) -> None:
        self.generator = generator
        self.decode = decode
        self.protocol = protocol
        self.incremental = incremental
        self.id_pattern = re.compile(protocol.memory_id_pattern)

    def answer(
        self,
        query_ids: Sequence[int],
        after_retrieval_ids: Sequence[int] = (),
        transcript: TranscriptRounds | None = None,
    ) -> InterleaveResult:
        """Run the loop for a tokenised question (the query template already applied).

        `after_retrieval_ids`: tokens injected after `<End-of-Retrieve>`, before the answer (the
        released engine's `reference` protocol restates the question there).
        `transcript`: inject documents as text and re-prefill the whole transcript for every round
        after the first, instead of growing the segment (the released engine's later rounds).
        """
        protocol = self.protocol
        context = list(query_ids)
        text = transcript.query_text if transcript is not None else ""
        routing_mask: list[bool] | None = None  # every token routes
        if transcript is not None:
            # The engine routes its first round, too, on the instructions and the question alone:
            # the turn switch after them is attended but does not route.
            routing_mask = transcript_routing_mask(text, transcript.encode)
            if len(routing_mask) != len(context):
                raise ValueError(
                    f"the transcript's question tokenises into {len(routing_mask)} tokens but the query has "
                    f"{len(context)}: pass the query_ids of transcript.query_text"
                )
        after_retrieval = [protocol.end_of_retrieval_id, *after_retrieval_ids]
        rounds: list[RetrievalRound] = []
        round_stops = {protocol.delimiter_id, protocol.end_of_retrieval_id, *protocol.stop_token_ids}
        cache = None  # the previous round's cache: it holds `context` minus the round's stop and injection
        while True:
            if len(rounds) == protocol.max_rounds:
                context += after_retrieval
                if routing_mask is not None:  # the forced end and injected question do not route, as decoded tokens
                    routing_mask += [False] * len(after_retrieval)
                output, _ = self._round(
                    context, cache, protocol.max_answer_tokens, protocol.stop_token_ids, routing_mask=routing_mask
                )
                return self._result(output.token_ids, rounds, output.routing)
            output, cache = self._round(
                context, cache, protocol.max_round_tokens, round_stops, constrain=True, routing_mask=routing_mask
            )
            if output.stop_token == protocol.end_of_retrieval_id:
                # The answer follows on the same cache and selection, as in the training sample.
                answer, _ = self.generator.generate(
                    after_retrieval, protocol.max_answer_tokens, protocol.stop_token_ids, cache=cache
                )
                return self._result(answer.token_ids, rounds, output.routing)
            if output.stop_token != protocol.delimiter_id:
                # The model answered without the end marker (or ran out of round tokens).
                return self._result(output.token_ids, rounds, output.routing)
            memory_ids = self.parse_memory_ids(output.token_ids)
            rounds.append(RetrievalRound(memory_ids=memory_ids, routing=output.routing))
            if transcript is None:
                context += output.token_ids + self.injected_tokens(memory_ids)
            else:
                text += self.decode(output.token_ids) + self.injected_text(memory_ids)
                context, cache = transcript.encode(text), None
                routing_mask = transcript_routing_mask(text, transcript.encode)

    def _round(
        self,
        context: list[int],
        cache,
        max_new_tokens: int,
        stops,
        constrain: bool = False,
        routing_mask: list[bool] | None = None,
    ):
        """Generate after the routed `context`: extending `cache` (which holds a prefix of it) or from scratch.

        `constrain`: decode the round's IDs under `RoutedIdGrammar` (with `routed_ids_only`).
        `routing_mask`: which tokens of `context` route when it is prefilled (None: every token); only
        given without a cache.
        """
        allowed = self._routed_id_constraint() if constrain and self.protocol.routed_ids_only else None
        if cache is None or not self.incremental:
            return self.generator.generate(
                context, max_new_tokens, stops, allowed_tokens=allowed, routing_mask=routing_mask
            )
        cached = cache.token_ids
        if context[: len(cached)] != cached:
            raise RuntimeError("the round cache does not hold a prefix of the context")
        return self.generator.generate(
            context[len(cached) :], max_new_tokens, stops, cache=cache, route=True, allowed_tokens=allowed
        )

    def _routed_id_constraint(self) -> Callable[[QueryCache, Sequence[int]], set[int] | None]:
        """`allowed_tokens` for one round: the grammar is built once, from the round's selection."""
        grammar: RoutedIdGrammar | None = None

        def allowed(cache: QueryCache, generated: Sequence[int]) -> set[int] | None:
            nonlocal grammar
            if grammar is None:
                grammar = RoutedIdGrammar.from_routing(cache.routing, self.generator.config.top_k_docs, self.protocol)
            return grammar.allowed_after(generated)

        return allowed

    def parse_memory_ids(self, token_ids: Sequence[int]) -> list[int]:
        """Valid memory IDs in generated tokens, in order, without repeats."""
        found = [self.protocol.parse_memory_id(m) for m in self.id_pattern.findall(self.decode(token_ids))]
        valid = [i for i in dict.fromkeys(found) if 1 <= i <= self.generator.store.num_docs]
        if len(valid) < len(dict.fromkeys(found)):
            logger.warning("ignored memory IDs outside 1..%d in %r", self.generator.store.num_docs, found)
        return valid

    def injected_tokens(self, memory_ids: Sequence[int]) -> list[int]:
        """The stored text of the documents (as rendered in memory), then the delimiter."""
        tokens: list[int] = []
        for memory_id in memory_ids:
            tokens += self.generator.store.doc_token_ids(memory_id - 1)
        return tokens + [self.protocol.delimiter_id]

    def injected_text(self, memory_ids: Sequence[int]) -> str:
        """What the released engine injects after a round: each document once, in ascending ID
        order, as `[i]. text\\n` (read from its stored rendering), then the delimiter."""
        store = self.generator.store
        documents = [
            injected_document_text(self.decode(store.doc_token_ids(memory_id - 1)))
            for memory_id in sorted(set(memory_ids))
        ]
        return "".join(documents) + DELIMITER

    def _result(
        self, answer_ids: list[int], rounds: list[RetrievalRound], routing: list[LayerRouting]
    ) -> InterleaveResult:
        stops = [i for i, t in enumerate(answer_ids) if t in self.protocol.stop_token_ids]
        answer_ids = answer_ids[: stops[0]] if stops else answer_ids
        return InterleaveResult(self.decode(answer_ids).strip(), answer_ids, rounds, routing)
