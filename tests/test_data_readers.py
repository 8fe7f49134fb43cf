"""Readers of local data, and errors that name the file, the line and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import write_beir

from data.errors import BadRecordTally, DataFormatError, MissingFileError
from data.readers import (
    corpus_from_hf,
    iter_lm_texts,
    load_local_hf_dataset,
    read_beir,
    read_retrieval_jsonl,
    records_from_hf,
)
from data.synthetic import generate_multihop_chains, generate_needles


@pytest.fixture()
def beir(tmp_path: Path) -> Path:
    return write_beir(tmp_path / "beir", generate_needles("multi_key", 5, seed=1, haystack_docs=3))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_beir_positives_and_hard_negatives(beir: Path) -> None:
    source = generate_needles("multi_key", 5, seed=1, haystack_docs=3)
    dataset = read_beir(beir, "test")
    assert [d.doc_id for d in dataset.corpus] == [d.doc_id for d in source.corpus]
    assert [r.query for r in dataset.records] == [r.query for r in source.records]
    for read, original in zip(dataset.records, source.records):
        assert read.positives == original.positives
        assert read.negatives == original.negatives[:3]


def test_malformed_json_names_file_and_line(beir: Path) -> None:
    lines = (beir / "corpus.jsonl").read_text().splitlines()
    lines[3] = '{"_id": "broken", "text": '
    (beir / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError) as error:
        read_beir(beir, "test")
    assert error.value.path == str(beir / "corpus.jsonl") and error.value.line == 4
    assert f"{beir / 'corpus.jsonl'}:4: malformed JSON" in str(error.value)


def test_unknown_doc_id_in_qrels_names_file_and_line(beir: Path) -> None:
    qrels = beir / "qrels" / "test.tsv"
    lines = qrels.read_text().splitlines()
    lines.insert(2, "q0\tno-such-doc\t1")
    qrels.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=rf"{qrels}:3: unknown doc id 'no-such-doc'"):
        read_beir(beir, "test")


def test_missing_files_are_named(beir: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"qrels[/\\]dev.tsv: missing BEIR qrels/dev.tsv"):
        read_beir(beir, "dev")
    (beir / "queries.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="queries.jsonl"):
        read_beir(beir, "test")
    with pytest.raises(MissingFileError, match="nowhere"):
        read_beir(tmp_path / "nowhere")


def test_skip_bad_records_counts_them(beir: Path) -> None:
    corpus = beir / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + 'not json\n[1, 2]\n{"text": "no id"}\n')
    tally = BadRecordTally(skip_bad_records=True)
    dataset = read_beir(beir, "test", tally)
    assert len(dataset.records) == 5
    summary = tally.summary()
    assert summary["skipped"] == 3
    assert any("expected a JSON object" in reason for reason in summary["reasons"])
    assert all(str(corpus) in message for message in summary["first_errors"])


def test_retrieval_jsonl_records(tmp_path: Path) -> None:
    chains = generate_multihop_chains(3, seed=2, hops=2)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": d.doc_id, "text": d.text} for d in chains.corpus])
    rows = [{"query": r.query, "hops": r.hops, "negatives": r.negatives, "answer": r.answer} for r in chains.records]
    rows.append({"query": "Plain?", "positives": [chains.corpus[0].doc_id]})
    records = write_jsonl(tmp_path / "records.jsonl", rows)
    dataset = read_retrieval_jsonl(records, corpus)
    assert dataset.records[0].hops == chains.records[0].hops
    assert dataset.records[0].positives == chains.records[0].positives
    assert dataset.records[3].answer is None and dataset.records[3].positives == [chains.corpus[0].doc_id]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"query": "q", "positives": ["ghost"]}, "unknown doc id 'ghost'"),
        ({"query": "q"}, "neither 'positives' nor 'hops'"),
        ({"query": "", "positives": ["d0"]}, "'query' must be a non-empty string"),
        ({"query": "q", "positives": "d0"}, "'positives' must be a list"),
    ],
)
def test_bad_retrieval_record_names_line(tmp_path: Path, row: dict, reason: str) -> None:
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d0", "text": "zero"}])
    records = write_jsonl(tmp_path / "records.jsonl", [{"query": "fine", "positives": ["d0"]}, "", row])
    with pytest.raises(DataFormatError, match=rf"{records}:3: .*{reason}"):
        read_retrieval_jsonl(records, corpus)


def test_lm_texts(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "from jsonl"}, {"body": "wrong field"}])
    assert list(iter_lm_texts(tmp_path / "a.txt", txt_unit="paragraph")) == ["first paragraph", "second paragraph\n"]
    with pytest.raises(DataFormatError, match=r"b.jsonl:2: no string field 'text'"):
        list(iter_lm_texts(tmp_path))
    tally = BadRecordTally(skip_bad_records=True)
    assert list(iter_lm_texts(tmp_path, tally=tally)) == ["first paragraph\n\nsecond paragraph\n", "from jsonl"]
    assert tally.skipped == 1


def test_hf_datasets_from_disk_and_files(tmp_path: Path) -> None:
    import datasets

    needles = generate_needles("single", 3, seed=4, haystack_docs=2)
    corpus = datasets.Dataset.from_list([{"_id": d.doc_id, "text": d.text, "title": ""} for d in needles.corpus])
    corpus.save_to_disk(str(tmp_path / "corpus"))
    records_file = write_jsonl(
        tmp_path / "records.jsonl",
        [
            {"query": r.query, "positives": r.positives, "negatives": r.negatives, "answer": r.answer}
            for r in needles.records
        ],
    )
    documents = corpus_from_hf(load_local_hf_dataset(tmp_path / "corpus"))
    assert [d.text for d in documents] == [d.text for d in needles.corpus]
    records = records_from_hf(load_local_hf_dataset(records_file), {d.doc_id for d in documents})
    assert [r.positives for r in records] == [r.positives for r in needles.records]
    with pytest.raises(DataFormatError, match=r"<hf>:1: unknown doc id"):
        records_from_hf(load_local_hf_dataset(records_file), {"other"}, "<hf>")


@pytest.mark.parametrize("id_field", ["_id", "id", "doc_id"])
def test_hf_corpus_takes_the_id_fields_of_a_corpus_file(id_field: str) -> None:
    import datasets

    rows = datasets.Dataset.from_list([{id_field: "d1", "text": "one"}, {id_field: "d2", "text": "two"}])
    assert [d.doc_id for d in corpus_from_hf(rows)] == ["d1", "d2"]


def test_hf_corpus_without_an_id_field_names_the_row() -> None:
    import datasets

    rows = datasets.Dataset.from_list([{"key": "d1", "text": "one"}])
    with pytest.raises(DataFormatError, match=r"corpus:1: document has no id field \(_id or id or doc_id\)"):
        corpus_from_hf(rows, source_name="corpus")


def test_lm_texts_from_a_saved_hf_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}, {"text": None}]).save_to_disk(str(tmp_path / "lm"))
    with pytest.raises(DataFormatError, match=r"lm:3: no string field 'text'"):
        list(iter_lm_texts(tmp_path / "lm"))
    tally = BadRecordTally(skip_bad_records=True)
    assert list(iter_lm_texts(tmp_path / "lm", tally=tally)) == ["one", "two"] and tally.skipped == 1
