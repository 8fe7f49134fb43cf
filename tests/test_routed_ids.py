"""Decoding a round's memory IDs among the routed documents only (`RoutedIdGrammar`)."""

from __future__ import annotations

import pytest
import torch
from batches import tiny_msa
from memories import DELIM, END, encoded_store, random_memory

from msa_modeling.inference import InterleaveFormat, MemoryInterleave, MSAGenerator, RoutedIdGrammar

OPEN, CLOSE = 68, 69


def test_grammar_walks_whole_ids_then_the_delimiter():
    # [3], [12] and [1] written as `[`, digit tokens (70 + d), `]`.
    grammar = RoutedIdGrammar({3: [OPEN, 73, CLOSE], 12: [OPEN, 71, 72, CLOSE], 1: [OPEN, 71, CLOSE]}, DELIM, END)
    assert grammar.allowed_after([]) == {OPEN, END}
    assert grammar.allowed_after([OPEN]) == {73, 71}
    assert grammar.allowed_after([OPEN, 71]) == {CLOSE, 72}
    assert grammar.allowed_after([OPEN, 71, 72]) == {CLOSE}
    assert grammar.allowed_after([OPEN, 71, CLOSE]) == {OPEN, DELIM}  # another ID or the end of the round
    assert grammar.allowed_after([OPEN, 71, CLOSE, OPEN]) == {73, 71}  # [12] is left below `[1`
    assert grammar.allowed_after([OPEN, 71, CLOSE, OPEN, 71]) == {72}  # [1] is written
    assert grammar.allowed_after([OPEN, 71, CLOSE, OPEN, 73, CLOSE, OPEN, 71, 72, CLOSE]) == {DELIM}  # all written
    assert grammar.allowed_after([OPEN, 74]) is None  # off the grammar: no constraint is invented
    assert grammar.allowed_after([71]) is None


def test_an_id_that_prefixes_another_may_end_or_go_on():
    grammar = RoutedIdGrammar({1: [7], 2: [7, 8]}, DELIM, END)
    assert grammar.allowed_after([7]) == {8, 7, DELIM}
    assert grammar.allowed_after([7, 7]) == {8}  # 1 is written: only 2 is left
    assert grammar.allowed_after([7, 8]) == {7, DELIM}
    assert grammar.allowed_after([7, 8, 7]) == {DELIM}


def test_an_empty_memory_allows_only_the_end_of_retrieval():
    assert RoutedIdGrammar({}, DELIM, END).allowed_after([]) == {END}


def test_routed_ids_only_needs_the_id_encoding():
    with pytest.raises(ValueError, match="encode_memory_id"):
        InterleaveFormat(DELIM, END, routed_ids_only=True)


ID_BASE = 40  # memory ID i is the single token ID_BASE + i in these tests


def id_protocol(routed_ids_only: bool, delimiter: int, end: int = END, max_rounds: int = 2) -> InterleaveFormat:
    return InterleaveFormat(
        delimiter,
        end,
        stop_token_ids=[-2],
        max_rounds=max_rounds,
        max_round_tokens=24,
        max_answer_tokens=2,
        encode_memory_id=lambda i: [ID_BASE + i],
        routed_ids_only=routed_ids_only,
    )


def ids_text(tokens) -> str:
    return "".join(f"[{t - ID_BASE}]" for t in tokens if ID_BASE < t <= ID_BASE + 20)


def slow_constrained_round(
    generator: MSAGenerator, context: list[int], grammar_of, max_new_tokens: int, stops
) -> list[int]:
    """The reference: prefill, then per step the best allowed token found by scanning the logits."""
    logits, cache = generator.prefill(context, reserve=max_new_tokens)
    grammar = grammar_of(cache.routing)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        allowed = grammar.allowed_after(generated)
        scores = logits.tolist()
        token = (
            max(allowed, key=lambda t: (scores[t], -t))
            if allowed is not None
            else max(range(len(scores)), key=scores.__getitem__)
        )
        generated.append(token)
        if token in stops:
            break
        logits = generator.decode(cache, token)
    return generated


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_constrained_rounds_write_only_routed_ids_and_match_a_slow_reference(seed):
    model = tiny_msa(seed, top_k_docs=2, chunk_size=4)
    memory = random_memory(seed, num_docs=9)
    generator = MSAGenerator(model, encoded_store(model, memory, max_batch_tokens=40), trace_k=4)
    delimiter = 5
    # An end marker the random model ranks last, so that retrieval rounds happen.
    end = int(generator.prefill(memory["question"])[0].argmin())
    protocol = id_protocol(True, delimiter, end)
    constrained = MemoryInterleave(generator, ids_text, protocol).answer(memory["question"])

    assert constrained.rounds, "no retrieval round"
    for round_ in constrained.rounds:
        routed = {int(d) + 1 for layer in round_.routing for d in layer.docs[:2]}
        assert round_.memory_ids and set(round_.memory_ids) <= routed
    # The first round against the reference decoding.
    reference = slow_constrained_round(
        generator,
        memory["question"],
        lambda routing: RoutedIdGrammar.from_routing(routing, 2, protocol),
        protocol.max_round_tokens,
        {delimiter, end, -2},
    )
    first, _ = generator.generate(
        memory["question"],
        protocol.max_round_tokens,
        {delimiter, end, -2},
        allowed_tokens=lambda cache, generated: RoutedIdGrammar.from_routing(cache.routing, 2, protocol).allowed_after(
            generated
        ),
    )
    assert first.token_ids == reference


def test_the_constraint_bites_on_random_weights():
    """Across seeds, free decoding's first token is outside the grammar at least once (else the tests above prove nothing)."""
    outside = 0
    for seed in range(4):
        model = tiny_msa(seed, top_k_docs=2, chunk_size=4)
        memory = random_memory(seed, num_docs=9)
        output, _ = MSAGenerator(model, encoded_store(model, memory, max_batch_tokens=40)).generate(
            memory["question"], 1
        )
        grammar = RoutedIdGrammar.from_routing(output.routing, 2, id_protocol(True, 5))
        outside += output.token_ids[0] not in grammar.allowed_after([])
    assert outside > 0


def test_masked_argmax_picks_the_best_allowed_token():
    from msa_modeling.inference.generation import _masked_argmax

    logits = torch.tensor([0.0, 5.0, 1.0, 3.0, -1.0])
    assert int(_masked_argmax(logits, {0, 2, 3})) == 3
    assert int(_masked_argmax(logits, {4})) == 4
    with pytest.raises(ValueError, match="allowed no token"):
        _masked_argmax(logits, set())
