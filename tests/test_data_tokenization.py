"""Tokenizer adapters: special tokens added and reported, exact round trips, parallel workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from data_fixtures import DELIMITER, END_OF_RETRIEVAL, train_byte_bpe, train_sentencepiece, training_texts

from data.tokenization import HuggingFaceTokenizer, SentencePieceTokenizer, encode_in_workers, load_tokenizer

SAMPLE = f"[12]. The river watches\nthe light.{DELIMITER}[3]{DELIMITER}{END_OF_RETRIEVAL}Zürich 1984"


@pytest.fixture(scope="module", params=["sentencepiece", "byte_bpe"])
def tokenizer_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp(request.param)
    return train_sentencepiece(directory) if request.param == "sentencepiece" else train_byte_bpe(directory)


def test_missing_special_tokens_are_added_and_reported(tokenizer_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    size = tokenizer.vocab_size
    added = tokenizer.ensure_special_tokens([DELIMITER, END_OF_RETRIEVAL])
    assert added == [DELIMITER, END_OF_RETRIEVAL]
    assert tokenizer.vocab_size == size + 2
    assert tokenizer.ensure_special_tokens([DELIMITER]) == []
    ids = tokenizer.encode(SAMPLE)
    assert ids.count(tokenizer.special_token_ids[DELIMITER]) == 2
    assert ids.count(tokenizer.special_token_ids[END_OF_RETRIEVAL]) == 1
    assert tokenizer.decode(ids) == SAMPLE


def test_segments_concatenate_exactly(tokenizer_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.ensure_special_tokens([DELIMITER])
    pieces = ["[7]. ", "A farmer counts seven letters.", "\n", "Question: ", "why?", DELIMITER]
    assert tokenizer.decode([i for piece in tokenizer.encode_batch(pieces) for i in piece]) == "".join(pieces)


def test_existing_special_token_is_reused(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(train_byte_bpe(tmp_path))
    eos = tokenizer.eos_token_id
    assert tokenizer.ensure_special_tokens(["<|endoftext|>"]) == []
    assert tokenizer.encode("a<|endoftext|>")[-1] == eos


def test_save_and_reload_keep_ids(tokenizer_path: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.ensure_special_tokens([DELIMITER, END_OF_RETRIEVAL])
    tokenizer.save(tmp_path / "saved")
    reloaded = load_tokenizer(tmp_path / "saved")
    assert reloaded.encode(SAMPLE) == tokenizer.encode(SAMPLE)
    assert reloaded.ensure_special_tokens([DELIMITER, END_OF_RETRIEVAL]) == []
    assert reloaded.fingerprint() == tokenizer.fingerprint()
    assert reloaded.vocab_size == tokenizer.vocab_size
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(SAMPLE) == tokenizer.encode(SAMPLE) and clone.fingerprint() == tokenizer.fingerprint()


def test_fingerprint_tracks_special_tokens(tokenizer_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    before = tokenizer.fingerprint()
    tokenizer.ensure_special_tokens([DELIMITER])
    assert tokenizer.fingerprint() != before


def test_parallel_workers_match_serial(tokenizer_path: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.ensure_special_tokens([DELIMITER])
    texts = training_texts()[:60] + [SAMPLE] * 3
    serial = list(encode_in_workers(tokenizer, texts, num_workers=1))
    assert list(encode_in_workers(tokenizer, texts, num_workers=2, chunk_size=16)) == serial
    assert serial[-1] == tokenizer.encode(SAMPLE)


def test_loader_picks_the_right_adapter(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(train_sentencepiece(tmp_path)), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(train_byte_bpe(tmp_path)), HuggingFaceTokenizer)
    assert isinstance(load_tokenizer(train_byte_bpe(tmp_path) / "tokenizer.json"), HuggingFaceTokenizer)
