"""Packed rows built from synthetic and BEIR data decode back to the intended samples, with
labels, doc ids, positions and aux labels as the spec and the row contract say."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from batches import tiny_msa
from data_fixtures import DELIMITER, END_OF_RETRIEVAL, doc_runs, synthetic_build, train_byte_bpe, write_beir

from data.build import BuildConfig, build_dataset, load_source
from data.errors import BadRecordTally
from data.loader import PackedRowLoader, stack_rows
from data.samples import MemoryConfig
from data.synthetic import generate_needles
from data.templates import TemplateConfig
from data.tokenization import load_tokenizer
from msa_modeling.layout import compute_position_ids
from train.data_stream import LayoutSettings, MicroBatchStream

ROW_LENGTH = 1536
OFFSET = 16
ID_DIGITS = [f"<id{d}>" for d in range(10)]

GENERATORS = {
    "retrieval": {"generator": "needles", "kind": "multi_query", "num_samples": 12, "seed": 3, "haystack_docs": 8},
    "qa": {"generator": "kv_facts", "num_facts": 60, "num_queries": 12, "seed": 4},
    "interleave": {"generator": "multihop", "num_chains": 8, "seed": 5, "hops": 3},
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, sp_model: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builds")
    outputs = {}
    for kind, generator in GENERATORS.items():
        synthetic_build(root / kind, sp_model, kind, generator)
        outputs[kind] = root / kind
    bpe = train_byte_bpe(tmp_path_factory.mktemp("bpe"))
    synthetic_build(root / "bpe-qa", bpe, "qa", GENERATORS["qa"])
    outputs["bpe-qa"] = root / "bpe-qa"
    # Numeric values and IDs in tokens of their own.
    synthetic_build(
        root / "qa-id-digits",
        sp_model,
        "qa",
        {**GENERATORS["qa"], "attributes": ["lucky number"]},
        template={"id_digits": ID_DIGITS},
    )
    outputs["qa-id-digits"] = root / "qa-id-digits"
    # Document IDs numbered from random offsets: digit IDs, and ID tokens across interleave steps.
    offsets = {"memory_tokens": 700, "max_memory_docs": 64, "id_offset_max": 5000}
    synthetic_build(root / "retrieval-id-offset", sp_model, "retrieval", GENERATORS["retrieval"], memory=offsets)
    outputs["retrieval-id-offset"] = root / "retrieval-id-offset"
    synthetic_build(
        root / "interleave-id-offset",
        sp_model,
        "interleave",
        GENERATORS["interleave"],
        memory=offsets,
        template={"id_digits": ID_DIGITS},
    )
    outputs["interleave-id-offset"] = root / "interleave-id-offset"
    beir = write_beir(root / "beir-src", generate_needles("multi_key", 10, seed=8, haystack_docs=6))
    build_dataset(
        BuildConfig.from_dict(
            {
                "source": {"kind": "beir", "path": str(beir), "split": "test"},
                "tokenizer": str(sp_model),
                "memory": {"memory_tokens": 700, "max_memory_docs": 64},
                "max_example_tokens": ROW_LENGTH,
                "docs_per_shard": 50,
                "records_per_shard": 4,
            }
        ),
        root / "beir",
    )
    outputs["beir"] = root / "beir"
    return outputs


def expected_example(
    kind: str,
    record,
    memory_ids: list[str],
    corpus: dict[str, str],
    step: int,
    id_text: Callable[[int], str] = str,
    id_offset: int = 0,
):
    """(full text, labelled text, positive corpus ids) the example must decode to."""
    memory_id_of = {doc_id: id_offset + i for i, doc_id in enumerate(memory_ids, start=1)}
    doc_of = {memory_id: doc_id for doc_id, memory_id in memory_id_of.items()}
    memory_text = "".join(f"[{id_text(memory_id_of[doc_id])}]. {corpus[doc_id]}\n" for doc_id in memory_ids)

    def ids_text(doc_ids: list[str]) -> str:
        return "".join(f"[{id_text(i)}]" for i in sorted(memory_id_of[d] for d in doc_ids)) + DELIMITER

    def injected(doc_ids: list[str]) -> str:
        return (
            "".join(f"[{id_text(i)}]. {corpus[doc_of[i]]}\n" for i in sorted(memory_id_of[d] for d in doc_ids))
            + DELIMITER
        )

    tail = f"Question: {record.query}\n"
    if kind == "retrieval":
        return memory_text + tail + ids_text(record.positives), ids_text(record.positives), set(record.positives)
    hops = record.hops if kind == "interleave" and record.hops else [record.positives]
    labelled = ""
    for hop in hops[:step]:
        tail += ids_text(hop) + injected(hop)
        if kind == "qa":
            labelled += ids_text(hop)
    if step < len(hops):
        return memory_text + tail + ids_text(hops[step]), labelled + ids_text(hops[step]), set(hops[step])
    final = END_OF_RETRIEVAL + record.answer
    return memory_text + tail + final, labelled + final, set(record.positives)


def id_numbers_in(text: str, template: TemplateConfig) -> list[int]:
    """Every memory ID written in ``text`` (documents and targets), in order."""
    return [template.parse_memory_id(m) for m in re.findall(template.memory_id_pattern(), text)]


def rows_of(
    build: Path, world_size: int = 1, rank: int = 0
) -> tuple[list[dict], list[list[tuple[int, int]]], PackedRowLoader]:
    loader = PackedRowLoader(build, ROW_LENGTH, seed=1, rank=rank, world_size=world_size, max_epochs=1)
    rows, origins = [], []
    for row in loader:
        rows.append(row)
        origins.append(list(loader.last_row_examples))
    return rows, origins, loader


def check_row_grammar(row: dict[str, torch.Tensor]) -> None:
    doc_ids = row["doc_ids"].numpy()
    example_ids = row["example_ids"].numpy()
    labels = row["labels"].numpy()
    aux = row["aux_labels"].numpy()
    for name, tensor in row.items():
        assert tensor.dtype == torch.int64 and tensor.shape == (ROW_LENGTH,), name
    padding = doc_ids == -1
    assert (example_ids[padding] == -1).all() and (example_ids[~padding] >= 0).all()
    if padding.any():
        assert padding[np.argmax(padding) :].all(), "padding must come only at the end"
    examples = example_ids[~padding]
    assert (np.diff(examples) >= 0).all() and (np.diff(examples) <= 1).all() and examples[0] == 0
    assert ((labels == -100) | (labels == row["input_ids"].numpy())).all()
    assert (labels[doc_ids != 0] == -100).all(), "only query/answer tokens are generated"
    assert (aux[doc_ids <= 0] == 0).all()
    for example in np.unique(examples):
        roles = doc_ids[example_ids == example]
        rank = np.where(roles == -2, 0, np.where(roles > 0, 1, 2))
        assert (np.diff(rank) >= 0).all(), "prefix, then documents, then query"
        assert (roles == 0).any(), "every example has query tokens"
        runs = doc_runs(roles)
        assert [doc for doc, _, _ in runs] == list(range(1, len(runs) + 1)), "doc ids 1..n, one run each"
        # Routing tokens: query tokens that are not generated.
        assert ((roles == 0) & (labels[example_ids == example] == -100)).any()


@pytest.mark.parametrize(
    "name",
    ["retrieval", "qa", "interleave", "bpe-qa", "beir", "qa-id-digits", "retrieval-id-offset", "interleave-id-offset"],
)
def test_rows_decode_to_intended_samples(builds: dict[str, Path], name: str) -> None:
    build = builds[name]
    kind = {
        "bpe-qa": "qa",
        "beir": "retrieval",
        "qa-id-digits": "qa",
        "retrieval-id-offset": "retrieval",
        "interleave-id-offset": "interleave",
    }.get(name, name)
    config = BuildConfig.from_dict(json.loads((build / "manifest.json").read_text())["config"])
    source = load_source(config.source, BadRecordTally())
    corpus = {doc.doc_id: doc.full_text() for doc in source.corpus}
    tokenizer = load_tokenizer(build / "tokenizer")
    rows, origins, loader = rows_of(build)
    dataset = loader.datasets[0]
    corpus_ids = dataset.docs.doc_ids()
    eos = tokenizer.eos_token_id
    seen = 0
    id_offsets: set[int] = set()
    for row, row_examples in zip(rows, origins):
        check_row_grammar(row)
        for example_id, (_, example) in enumerate(row_examples):
            mask = (row["example_ids"] == example_id).numpy()
            record_index, step = dataset.example_origin(example)
            memory, _, _, _ = dataset.example_parts(example)
            memory_ids = [corpus_ids[i] for i in memory.tolist()]
            id_offset = dataset.example_id_offset(example)
            assert 0 <= id_offset <= config.memory.id_offset_max
            assert id_offset + len(memory_ids) <= config.memory.max_memory_id
            id_offsets.add(id_offset)
            full, labelled, positives = expected_example(
                kind, source.records[record_index], memory_ids, corpus, step, config.template.memory_id_text, id_offset
            )
            input_ids = row["input_ids"].numpy()[mask].tolist()
            labels = row["labels"].numpy()[mask]
            generated = labels[labels != -100].tolist()
            if full.endswith(END_OF_RETRIEVAL + (source.records[record_index].answer or "\0")):
                # The answer ends with the tokenizer's end-of-sequence id, generated too.
                assert input_ids[-1] == generated[-1] == eos
                input_ids, generated = input_ids[:-1], generated[:-1]
            assert tokenizer.decode(input_ids) == full
            assert tokenizer.decode(generated) == labelled
            doc_ids = row["doc_ids"].numpy()[mask]
            aux = row["aux_labels"].numpy()[mask]
            for doc, start, end in doc_runs(doc_ids):
                expected_flag = int(memory_ids[doc - 1] in positives)
                assert (aux[start:end] == expected_flag).all()
                id_text = config.template.memory_id_text(id_offset + doc)
                assert tokenizer.decode(input_ids[start:end]) == f"[{id_text}]. {corpus[memory_ids[doc - 1]]}\n"
            if config.template.id_digits:
                # Each ID digit is one token of its own, which the documents' numbers never use.
                digit_ids = {tokenizer.special_token_ids[d] for d in config.template.id_digits}
                id_tokens = [t for t in input_ids if t in digit_ids]
                assert tokenizer.decode(id_tokens) == "".join(
                    config.template.memory_id_text(i)
                    for i in id_numbers_in(tokenizer.decode(input_ids), config.template)
                )
            seen += 1
    assert seen == len(dataset) > 0
    # Offsets vary between records and are absent unless asked for.
    assert len(id_offsets) > 1 if config.memory.id_offset_max else id_offsets == {0}


def expected_positions(doc_ids: torch.Tensor, example_ids: torch.Tensor, document_positions: bool) -> torch.Tensor:
    """Spec section 4 written out token by token: document-wise, prefix 0..T-1, each document 0..len-1 and
    the query T + OFFSET + j; global, 0.. from each example's first token; padding 0."""
    positions = torch.zeros_like(doc_ids)
    for row in range(doc_ids.shape[0]):
        counter, previous = 0, None
        for token in range(doc_ids.shape[1]):
            example, role = int(example_ids[row, token]), int(doc_ids[row, token])
            if example < 0:
                continue
            if not document_positions:
                counter = 0 if previous is None or previous[0] != example else counter + 1
            elif previous is None or previous != (example, role):
                prefix = int(((example_ids[row] == example) & (doc_ids[row] == -2)).sum())
                counter = prefix + OFFSET if role == 0 else 0
            else:
                counter += 1
            positions[row, token] = counter
            previous = (example, role)
    return positions


@pytest.mark.parametrize("document_positions", [True, False])
@pytest.mark.parametrize("name", ["retrieval", "interleave"])
def test_positions_agree_on_the_data_path_and_the_model_path(
    builds: dict[str, Path], tmp_path: Path, name: str, document_positions: bool
) -> None:
    """The trainer's micro-batches (loader rows, layout built on the host) and the model building its own
    layout from the same rows give the positions of spec section 4, for both position settings."""
    model = tiny_msa(0, query_position_offset=OFFSET, chunk_size=64, document_positions=document_positions)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / name).symlink_to(builds[name])
    rows_per_micro_batch = 2
    stream = MicroBatchStream(
        {name: 1.0},
        ROW_LENGTH,
        rows_per_micro_batch,
        tmp_path,
        LayoutSettings.from_model_config(model.config),
        seed=1,
        rank=0,
        world_size=1,
    )
    loader = PackedRowLoader(builds[name], ROW_LENGTH, seed=1)
    for _ in range(3):
        batch = stack_rows([loader.next_row() for _ in range(rows_per_micro_batch)])
        data_path = stream.next().layout.position_ids
        model_path = model.build_layout(
            batch["doc_ids"], batch["example_ids"], batch["labels"], batch["aux_labels"]
        ).position_ids
        expected = expected_positions(batch["doc_ids"], batch["example_ids"], document_positions)
        assert torch.equal(data_path, expected)
        assert torch.equal(model_path, expected)
        assert torch.equal(
            compute_position_ids(batch["doc_ids"], batch["example_ids"], OFFSET, document_positions), expected
        )


def test_chat_prefix_is_shared_prefix(tmp_path: Path, sp_model: Path) -> None:
    synthetic_build(
        tmp_path / "chat",
        sp_model,
        "retrieval",
        GENERATORS["retrieval"],
        template={"system_prompt": "You answer from memory.", "chat": {}},
    )
    tokenizer = load_tokenizer(tmp_path / "chat" / "tokenizer")
    rows, _, _ = rows_of(tmp_path / "chat")
    row = rows[0]
    first = (row["example_ids"] == 0).numpy()
    doc_ids = row["doc_ids"].numpy()[first]
    input_ids = row["input_ids"].numpy()[first]
    assert (
        tokenizer.decode(input_ids[doc_ids == -2].tolist())
        == "<|im_start|>system\nYou answer from memory.<|im_end|>\n<|im_start|>user\n"
    )
    query_text = tokenizer.decode(input_ids[doc_ids == 0].tolist())
    assert query_text.startswith("Question: ") and "<|im_end|>\n<|im_start|>assistant\n[" in query_text
    assert query_text.endswith(DELIMITER)
    check_row_grammar(row)


CHATML_WITH_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nBe helpful.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
)


def test_chat_format_from_the_tokenizers_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from data.templates import ChatFormat

    folder = train_byte_bpe(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(folder))
    hf.chat_template = CHATML_WITH_DEFAULT_SYSTEM
    hf.save_pretrained(str(folder))
    chat = ChatFormat.from_hf_tokenizer(hf)
    assert chat.user_start == "<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\n"
    assert chat.system_start == "<|im_start|>system\n" and chat.system_to_user == "<|im_end|>\n<|im_start|>user\n"
    assert chat.user_to_assistant == "<|im_end|>\n<|im_start|>assistant\n" and chat.assistant_end == "<|im_end|>"
    synthetic_build(tmp_path / "chat", folder, "qa", GENERATORS["qa"], template={"chat_from_tokenizer": True})
    tokenizer = load_tokenizer(tmp_path / "chat" / "tokenizer")
    rows, _, _ = rows_of(tmp_path / "chat")
    row = rows[0]
    first = (row["example_ids"] == 0).numpy()
    doc_ids = row["doc_ids"].numpy()[first]
    input_ids = row["input_ids"].numpy()[first]
    assert tokenizer.decode(input_ids[doc_ids == -2].tolist()) == chat.user_start
    labels = row["labels"].numpy()[first]
    generated = tokenizer.decode(labels[labels != -100].tolist())
    assert generated.startswith("[") and DELIMITER + END_OF_RETRIEVAL in generated
    assert generated.endswith("<|im_end|>")
    check_row_grammar(row)


def test_show_rows_names_every_run(builds: dict[str, Path]) -> None:
    from data.show_rows import describe_row

    tokenizer = load_tokenizer(builds["qa"] / "tokenizer")
    rows, _, _ = rows_of(builds["qa"])
    text = describe_row(rows[0], tokenizer.decode)
    assert "ex 0     doc 1" in text and " + (" in text and "query" in text and "generate" in text


def test_show_rows_fits_rows_to_the_build_by_default(builds: dict[str, Path], capsys) -> None:
    """Without --row-length a row is as long as the build's longest example may be, not 16384."""
    from data.show_rows import build_row_length, main

    manifest = json.loads((builds["qa"] / "manifest.json").read_text())
    assert build_row_length(builds["qa"]) == manifest["config"]["max_example_tokens"] < 16_384
    assert main([str(builds["qa"])]) == 0
    padding = [int(line.split("x")[-1]) for line in capsys.readouterr().out.splitlines() if "padding x" in line]
    assert sum(padding) < manifest["config"]["max_example_tokens"]


def test_memory_holds_hard_negatives_then_random_fill(builds: dict[str, Path], tmp_path: Path, sp_model: Path) -> None:
    manifest = json.loads((builds["beir"] / "manifest.json").read_text())
    source = load_source(BuildConfig.from_dict(manifest["config"]).source, BadRecordTally())
    _, origins, loader = rows_of(builds["beir"])
    dataset = loader.datasets[0]
    corpus_ids = dataset.docs.doc_ids()
    for _, example in (item for row_examples in origins for item in row_examples):
        record = source.records[dataset.example_origin(example)[0]]
        memory = {corpus_ids[i] for i in dataset.example_parts(example)[0].tolist()}
        assert set(record.positives) | set(record.negatives) <= memory
        assert len(memory) > len(set(record.positives) | set(record.negatives)), "random negatives fill the rest"
    values = dict(manifest["config"])
    values["memory"] = {**values["memory"], "random_negatives": False}
    build_dataset(BuildConfig.from_dict(values), tmp_path / "hard-only")
    _, origins, loader = rows_of(tmp_path / "hard-only")
    dataset = loader.datasets[0]
    for _, example in (item for row_examples in origins for item in row_examples):
        record = source.records[dataset.example_origin(example)[0]]
        memory = [corpus_ids[i] for i in dataset.example_parts(example)[0].tolist()]
        assert sorted(memory) == sorted(set(record.positives) | set(record.negatives))


def test_memory_ids_in_id_digits_round_trip_and_reject_bad_digit_sets() -> None:
    template = TemplateConfig(id_digits=ID_DIGITS)
    text = template.target_ids_text([3, 12, 407]) + "the number 1234 is not an ID"
    assert text.startswith("[<id3>][<id1><id2>][<id4><id0><id7>]")
    assert id_numbers_in(text, template) == [3, 12, 407]
    assert id_numbers_in(TemplateConfig().target_ids_text([3, 12]), TemplateConfig()) == [3, 12]
    assert set(ID_DIGITS) <= set(template.special_strings())
    for bad in (ID_DIGITS[:9], ID_DIGITS[:9] + ["<id0>"], ID_DIGITS[:9] + [""]):
        with pytest.raises(ValueError, match="id_digits must be ten distinct non-empty strings"):
            TemplateConfig(id_digits=bad)


def test_id_offsets_are_log_uniform_and_drawn_only_when_asked_for() -> None:
    rng = np.random.default_rng(0)
    config = MemoryConfig(id_offset_max=9999)
    first_ids = np.array([config.draw_id_offset(rng) + 1 for _ in range(8000)])
    assert first_ids.min() >= 1 and first_ids.max() <= 10_000
    # Every ID length is equally likely: a quarter each for 1 to 4 digits.
    shares = np.bincount([len(str(i)) for i in first_ids], minlength=6)[1:5] / len(first_ids)
    assert np.all(np.abs(shares - 0.25) < 0.03), shares
    state = rng.bit_generator.state
    assert MemoryConfig().draw_id_offset(rng) == 0
    assert rng.bit_generator.state == state, "builds without offsets keep their random draws"
    with pytest.raises(ValueError, match="memory.id_offset_max must be >= 0"):
        MemoryConfig(id_offset_max=-1)


def test_id_stride_max_is_refused_and_strided_builds_are_not_read(builds: dict[str, Path], tmp_path: Path) -> None:
    """`memory.id_stride_max` is gone: a config that sets it, and a build whose shards spaced the IDs by
    strides, fail with an error naming it instead of rendering other IDs than the build wrote."""
    config = json.loads((builds["retrieval-id-offset"] / "manifest.json").read_text())["config"]
    config["memory"]["id_stride_max"] = 8
    with pytest.raises(ValueError, match="id_stride_max"):
        BuildConfig.from_dict(config)
    strided = tmp_path / "strided"
    shutil.copytree(builds["retrieval-id-offset"], strided)
    shard = sorted(strided.glob("examples/shard-*"))[0]
    np.save(shard / "id_strides.npy", np.full(len(np.load(shard / "id_offsets.npy")), 3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"id_strides\.npy.*id_stride_max"):
        PackedRowLoader(strided, ROW_LENGTH)
    np.save(shard / "id_strides.npy", np.ones(len(np.load(shard / "id_offsets.npy")), dtype=np.int64))
    assert len(list(PackedRowLoader(strided, ROW_LENGTH, max_epochs=1))) > 0


def test_shards_without_id_offsets_read_as_offset_zero(builds: dict[str, Path], tmp_path: Path) -> None:
    """Builds written before ID offsets existed load unchanged."""
    old = tmp_path / "retrieval"
    shutil.copytree(builds["retrieval"], old)
    for path in old.glob("examples/shard-*/id_offsets.npy"):
        path.unlink()
    new_rows, _, _ = rows_of(builds["retrieval"])
    old_rows, _, _ = rows_of(old)
    assert len(old_rows) == len(new_rows) > 0
    for a, b in zip(old_rows, new_rows):
        assert all(torch.equal(a[key], b[key]) for key in a)
