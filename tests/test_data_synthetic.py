"""Synthetic generators: deterministic from the seed, answers only in the positives."""

from __future__ import annotations

import re

import pytest

from data.synthetic import generate_kv_facts, generate_multihop_chains, generate_needles


@pytest.mark.parametrize("kind", ["single", "multi_key", "multi_value", "multi_query"])
def test_needles_are_deterministic_and_findable(kind: str) -> None:
    first = generate_needles(kind, 6, seed=3)
    assert first == generate_needles(kind, 6, seed=3)
    assert first != generate_needles(kind, 6, seed=4)
    texts = first.corpus_by_id()
    expected_positives = {"single": 1, "multi_key": 1, "multi_value": 3, "multi_query": 2}[kind]
    for record in first.records:
        assert len(record.positives) == expected_positives
        assert not set(record.positives) & set(record.negatives)
        values = record.answer.split(", ")
        assert len(values) == expected_positives
        for doc_id, value in zip(record.positives, values):
            assert value in texts[doc_id].text
            key = re.search(r"magic number for (\S+) is", texts[doc_id].text).group(1)
            assert key in record.query
        for doc_id in record.negatives:
            assert not any(value in texts[doc_id].text for value in values)
    if kind == "multi_key":  # the other needles are hard negatives
        assert all(sum("-needle" in d for d in r.negatives) == 3 for r in first.records)


def test_kv_facts_share_one_memory() -> None:
    dataset = generate_kv_facts(30, 10, seed=1)
    assert dataset == generate_kv_facts(30, 10, seed=1)
    texts = dataset.corpus_by_id()
    for record in dataset.records:
        (positive,) = record.positives
        assert record.answer in texts[positive].text
        assert set(record.negatives) | {positive} == set(texts)


@pytest.mark.parametrize("hops", [1, 2, 4])
def test_multihop_chains_link_up(hops: int) -> None:
    dataset = generate_multihop_chains(5, seed=2, hops=hops)
    assert dataset == generate_multihop_chains(5, seed=2, hops=hops)
    texts = dataset.corpus_by_id()
    for record in dataset.records:
        assert len(record.hops) == hops and record.positives == [d for hop in record.hops for d in hop]
        sentences = [texts[hop[0]].text.split(".")[0] for hop in record.hops]
        for current, following in zip(sentences, sentences[1:]):
            colleague = current.split(" works with ")[1]
            assert following.startswith(colleague)
        assert sentences[-1].endswith(f"lives in {record.answer}")
        assert sentences[0].split(" ")[0] in record.query
