"""Readers drop nothing in silence: fractional qrels count as positives, empty documents, duplicate
query ids and non-UTF-8 lines are errors at file:line, or counted skips with --skip-bad-records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.errors import BadRecordTally, DataFormatError
from data.readers import (
    iter_lm_texts,
    read_corpus_jsonl,
    read_qrels_tsv,
    read_queries_jsonl,
)


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_fractional_qrels_scores_are_kept_and_positive_means_above_zero(tmp_path: Path) -> None:
    qrels = write_lines(
        tmp_path / "qrels.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t0.5", "q1\td2\t0", "q2\td1\t-1"]
    )
    judgements = read_qrels_tsv(qrels, {"q1": "a", "q2": "b"}, {"d1", "d2"})
    assert judgements == {"q1": {"d1": 0.5, "d2": 0.0}, "q2": {"d1": -1.0}}


def test_non_finite_qrels_score_is_an_error_at_its_line(tmp_path: Path) -> None:
    qrels = write_lines(tmp_path / "qrels.tsv", ["q1\td1\t1", "q1\td2\tnan"])
    with pytest.raises(DataFormatError, match=r"qrels.tsv:2: score 'nan'"):
        read_qrels_tsv(qrels, {"q1": "a"}, {"d1", "d2"})


def test_empty_document_is_an_error_or_a_counted_skip(tmp_path: Path) -> None:
    corpus = write_lines(
        tmp_path / "corpus.jsonl",
        [json.dumps({"_id": "d1", "text": "alpha"}), json.dumps({"_id": "d2", "text": "  \n "})],
    )
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: document 'd2' has empty text"):
        read_corpus_jsonl(corpus)
    tally = BadRecordTally(skip_bad_records=True)
    assert [doc.doc_id for doc in read_corpus_jsonl(corpus, tally)] == ["d1"]
    assert tally.skipped == 1


def test_duplicate_query_id_is_an_error_or_a_counted_skip(tmp_path: Path) -> None:
    queries = write_lines(
        tmp_path / "queries.jsonl",
        [json.dumps({"_id": "q1", "text": "first"}), json.dumps({"_id": "q1", "text": "second"})],
    )
    with pytest.raises(DataFormatError, match=r"queries.jsonl:2: duplicate query id 'q1'"):
        read_queries_jsonl(queries)
    tally = BadRecordTally(skip_bad_records=True)
    assert read_queries_jsonl(queries, tally) == {"q1": "first"}
    assert tally.skipped == 1


def test_non_utf8_line_names_file_and_line_and_can_be_skipped(tmp_path: Path) -> None:
    corpus = write_lines(
        tmp_path / "corpus.jsonl",
        [
            json.dumps({"_id": "d1", "text": "alpha"}),
            b'{"_id": "d2", "text": "caf\xe9"}',
            json.dumps({"_id": "d3", "text": "gamma"}),
        ],
    )
    with pytest.raises(DataFormatError, match=r"corpus.jsonl:2: not UTF-8 \(byte 0xe9"):
        read_corpus_jsonl(corpus)
    tally = BadRecordTally(skip_bad_records=True)
    assert [doc.doc_id for doc in read_corpus_jsonl(corpus, tally)] == ["d1", "d3"]
    text = write_lines(tmp_path / "text.txt", [b"fine", b"bad \xff"])
    with pytest.raises(DataFormatError, match=r"text.txt:2: not UTF-8"):
        list(iter_lm_texts(text))
