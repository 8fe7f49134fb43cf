"""Fixtures the data tests make for themselves: tokenizers trained on generated text, a tiny
BEIR folder, builds of synthetic data, and helpers that read rows back."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.build import BuildConfig, build_dataset
from data.records import RetrievalDataset
from data.synthetic import filler_text, generate_kv_facts, generate_multihop_chains, generate_needles
from data.templates import TemplateConfig
from data.tokenization import SentencePieceTokenizer

DELIMITER = "<|object_ref_end|>"
END_OF_RETRIEVAL = "<End-of-Retrieve>"


def training_texts() -> list[str]:
    """Text covering the vocabulary of every synthetic generator and the templates."""
    texts = []
    for kind in ("single", "multi_key", "multi_value", "multi_query"):
        dataset = generate_needles(kind, 4, seed=99, haystack_docs=4)
        texts += [d.text for d in dataset.corpus] + [r.query for r in dataset.records]
    for dataset in (generate_kv_facts(40, 10, seed=99), generate_multihop_chains(10, seed=99, hops=3)):
        texts += [d.text for d in dataset.corpus] + [r.query for r in dataset.records]
    texts += [filler_text(random.Random(seed), 60) for seed in range(20)]
    texts += ["[1]. [2]. [10]. [12][3] Question: Answer: 0123456789 What is it?"] * 5
    return texts


def train_sentencepiece(directory: Path, vocab_size: int = 600) -> Path:
    """A BPE sentencepiece model whose encoding concatenates exactly (no dummy prefix,
    identity normalisation, byte fallback for anything unseen)."""
    prefix = directory / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        minloglevel=2,
        num_threads=1,
    )
    return prefix.with_suffix(".model")


def train_byte_bpe(directory: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE saved as a Hugging Face tokenizer folder (no template tokens in it)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_texts(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    folder = directory / "bpe"
    wrapped.save_pretrained(str(folder))
    return folder


def write_beir(root: Path, dataset: RetrievalDataset, split: str = "test") -> Path:
    """A BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) holding ``dataset``;
    record negatives become score-0 judgements."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w") as handle:
        for doc in dataset.corpus:
            handle.write(json.dumps({"_id": doc.doc_id, "title": doc.title, "text": doc.text}) + "\n")
    (root / "qrels").mkdir(exist_ok=True)
    with (root / "queries.jsonl").open("w") as queries, (root / "qrels" / f"{split}.tsv").open("w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for index, record in enumerate(dataset.records):
            query_id = f"q{index}"
            queries.write(json.dumps({"_id": query_id, "text": record.query}) + "\n")
            for doc_id in record.positives:
                qrels.write(f"{query_id}\t{doc_id}\t1\n")
            for doc_id in record.negatives[:3]:
                qrels.write(f"{query_id}\t{doc_id}\t0\n")
    return root


def synthetic_build(output: Path, tokenizer: Path, sample_kind: str, generator: dict, **overrides) -> dict:
    """Build a synthetic source; returns the manifest."""
    values = {
        "source": {"kind": "synthetic", "synthetic": generator},
        "tokenizer": str(tokenizer),
        "sample_kind": sample_kind,
        "memory": {"memory_tokens": 700, "max_memory_docs": 64},
        "max_example_tokens": 1536,
        "docs_per_shard": 64,
        "records_per_shard": 8,
    }
    values.update(overrides)
    return build_dataset(BuildConfig.from_dict(values), output)


def example_spans(row: dict, example: int) -> np.ndarray:
    """Token positions of one packed example."""
    return np.flatnonzero(row["example_ids"].numpy() == example)


def doc_runs(doc_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(doc id, start, end) runs of document tokens, in order."""
    runs = []
    start = 0
    for position in range(1, len(doc_ids) + 1):
        if position == len(doc_ids) or doc_ids[position] != doc_ids[start]:
            if doc_ids[start] > 0:
                runs.append((int(doc_ids[start]), start, position))
            start = position
    return runs


def write_tiny_export(folder: Path, **msa_settings) -> Path:
    """A trainer-export-shaped folder: a tiny random MSA model (`msa_settings` go to `tiny_msa`)
    and a sentencepiece tokenizer holding the template tokens."""
    from batches import tiny_msa

    tokenizer = SentencePieceTokenizer(train_sentencepiece(folder))
    tokenizer.ensure_special_tokens(TemplateConfig().special_strings(), report=False)
    tokenizer.save(folder)
    tiny_msa(0, backbone_overrides={"vocab_size": tokenizer.vocab_size}, **msa_settings).save_pretrained(folder)
    return folder
