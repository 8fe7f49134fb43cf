"""Encoded memories on disk: save -> load, appending, and the interleave loop's protocol."""

from __future__ import annotations

import json

import pytest
import torch
from batches import tiny_msa
from memories import DELIM, END, EOS, ScriptedGenerator, random_memory

from data.templates import TemplateConfig
from msa_modeling.inference import InterleaveFormat, MemoryEncoder, MemoryInterleave, MemoryStore, MSAGenerator


def answers(model, store, questions: list[list[int]]) -> list[tuple[list[int], list[list[int]]]]:
    generator = MSAGenerator(model, store)
    outputs = [generator.generate(q, max_new_tokens=5)[0] for q in questions]
    return [(o.token_ids, [r.docs.tolist() for r in o.routing]) for o in outputs]


def questions(seed: int) -> list[list[int]]:
    return [random_memory(seed + i)["question"] for i in range(3)]


def test_encode_save_load_gives_the_same_answers(tmp_path):
    model = tiny_msa(0, top_k_docs=2, chunk_size=4)
    memory = random_memory(0, num_docs=9)
    encoder = MemoryEncoder(model, max_batch_tokens=30, show_progress=False)
    store = encoder.new_store(memory["prefix"])
    encoder.add_documents(store, memory["docs"])
    store.save(tmp_path / "memory", docs_per_shard=4)
    loaded = MemoryStore.load(tmp_path / "memory", config=model.config)

    manifest = json.loads((tmp_path / "memory" / "manifest.json").read_text())
    assert [s["num_docs"] for s in manifest["shards"]] == [4, 4, 1]
    assert manifest["num_tokens"] == sum(len(d) for d in memory["docs"])
    for name in ("keys", "values", "routing_keys", "prefix_keys", "prefix_values"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(store, name), getattr(loaded, name)))
    assert [loaded.doc_token_ids(i) for i in range(9)] == memory["docs"]
    assert answers(model, loaded, questions(10)) == answers(model, store, questions(10))


def test_appending_documents_equals_encoding_them_all_at_once(tmp_path):
    model = tiny_msa(1, top_k_docs=3, chunk_size=4)
    memory = random_memory(1, num_docs=10)
    encoder = MemoryEncoder(model, max_batch_tokens=40, show_progress=False)
    at_once = encoder.new_store(memory["prefix"])
    encoder.add_documents(at_once, memory["docs"])

    first = encoder.new_store(memory["prefix"])
    encoder.add_documents(first, memory["docs"][:6])
    first.save(tmp_path / "memory")
    old_shard = tmp_path / "memory" / first.shards[0]["file"]
    old_bytes = old_shard.read_bytes()
    grown = MemoryStore.load(tmp_path / "memory", config=model.config)
    encoder.add_documents(grown, memory["docs"][6:])
    grown.save(tmp_path / "memory")
    assert old_shard.read_bytes() == old_bytes
    appended = MemoryStore.load(tmp_path / "memory", config=model.config)

    assert appended.num_docs == 10 and len(appended.shards) == 2
    assert torch.equal(appended.doc_chunk_offsets, at_once.doc_chunk_offsets)
    for name in ("keys", "values", "routing_keys"):
        for a, b in zip(getattr(appended, name), getattr(at_once, name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert answers(model, appended, questions(20)) == answers(model, at_once, questions(20))


def test_loading_checks_the_model_shape(tmp_path):
    model = tiny_msa(0, chunk_size=4)
    encoder = MemoryEncoder(model, show_progress=False)
    store = encoder.new_store([5, 6])
    encoder.add_documents(store, [[7, 8, 9]])
    store.save(tmp_path / "memory")
    with pytest.raises(ValueError, match="encoded for"):
        MemoryStore.load(tmp_path / "memory", config=tiny_msa(0, chunk_size=8).config)


DIGITS = {80 + d: str(d) for d in range(10)}


def decode(ids) -> str:
    memory_ids = {t: f"[{t - 60}]" for t in (*range(61, 80), 99)}  # 99 -> [39], outside the memory
    return "".join(DIGITS.get(t) or memory_ids.get(t, "") for t in ids)


def scripted_store():
    model = tiny_msa(0, chunk_size=4)
    encoder = MemoryEncoder(model, show_progress=False)
    store = encoder.new_store([])
    encoder.add_documents(store, [[10 + i, 11 + i] for i in range(5)])
    return store


def test_interleave_injects_retrieved_texts_until_end_of_retrieval():
    store = scripted_store()
    scripted = ScriptedGenerator(store, [[62, 64, DELIM], [65, DELIM], [END], [84, 82, EOS]])
    loop = MemoryInterleave(scripted, decode, InterleaveFormat(DELIM, END, stop_token_ids=[EOS], max_rounds=3))
    result = loop.answer([1, 2])
    assert [r.memory_ids for r in result.rounds] == [[2, 4], [5]]
    assert result.answer == "42"
    assert scripted.contexts[1] == [1, 2, 62, 64, DELIM, 11, 12, 13, 14, DELIM]
    assert scripted.contexts[2] == scripted.contexts[1] + [65, DELIM, 14, 15, DELIM]
    assert scripted.contexts[3] == [END]  # the answer continues on the round's cache


def test_interleave_reads_ids_written_in_id_digit_tokens():
    # Memory IDs in tokens of their own (template.id_digits); the answer's digits are plain.
    template = TemplateConfig(id_digits=[f"<id{d}>" for d in range(10)])
    id_digit_tokens = {70 + d: f"<id{d}>" for d in range(10)}
    brackets = {68: "[", 69: "]"}

    def decode_id_digits(ids) -> str:
        return "".join(DIGITS.get(t) or id_digit_tokens.get(t) or brackets.get(t, "") for t in ids)

    store = scripted_store()
    # [<id4>] [<id1><id2>] (12: outside the 5-document memory) [<id2>], then the answer 42.
    scripted = ScriptedGenerator(store, [[68, 74, 69, 68, 71, 72, 69, 68, 72, 69, DELIM], [END], [84, 82, EOS]])
    protocol = InterleaveFormat(
        DELIM,
        END,
        stop_token_ids=[EOS],
        memory_id_pattern=template.memory_id_pattern(),
        parse_memory_id=template.parse_memory_id,
    )
    result = MemoryInterleave(scripted, decode_id_digits, protocol).answer([1])
    assert [r.memory_ids for r in result.rounds] == [[4, 2]]
    assert result.answer == "42"


def test_interleave_forces_the_end_marker_after_the_round_limit():
    store = scripted_store()
    scripted = ScriptedGenerator(store, [[61, DELIM], [99, 61, DELIM], [83, EOS]])
    result = MemoryInterleave(
        scripted, decode, InterleaveFormat(DELIM, END, stop_token_ids=[EOS], max_rounds=2)
    ).answer([1])
    assert len(result.rounds) == 2 and result.rounds[1].memory_ids == [1]
    assert scripted.contexts[-1][-1] == END and result.answer == "3"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_interleave_rounds_equal_full_re_prefills(seed):
    model = tiny_msa(seed, top_k_docs=2, chunk_size=4)
    memory = random_memory(seed, num_docs=9)
    encoder = MemoryEncoder(model, max_batch_tokens=40, show_progress=False)
    store = encoder.new_store(memory["prefix"])
    encoder.add_documents(store, memory["docs"])
    generator = MSAGenerator(model, store, trace_k=4)
    # The model's first token ends round 1, so that rounds happen with random weights.
    delimiter = generator.generate(memory["question"], 1)[0].token_ids[0]
    protocol = InterleaveFormat(
        delimiter, end_of_retrieval_id=-1, stop_token_ids=[-2], max_rounds=3, max_round_tokens=4, max_answer_tokens=4
    )
    to_text = lambda ids: "".join(f"[{t % 9 + 1}]" for t in ids)  # noqa: E731

    def run(incremental: bool):
        result = MemoryInterleave(generator, to_text, protocol, incremental=incremental).answer(memory["question"])
        return (
            result.answer_token_ids,
            [r.memory_ids for r in result.rounds],
            [[(x.layer, x.docs.tolist()) for x in r.routing] for r in result.rounds],
            [(x.layer, x.docs.tolist()) for x in result.answer_routing],
        )

    incremental, full = run(True), run(False)
    assert incremental[1], "no retrieval round happened"
    assert incremental == full


def test_a_memory_stored_on_another_device_keeps_every_piece_there():
    """`storage_device` off the host. CI has no GPU, so the meta device stands in for one: its
    `index_copy_` and `empty` check devices as a GPU's do, so an encoding batch's rows, or a
    gathered document's output, left on the host fails here (meta's `index_select` does not
    check its index's device; `gather_chunks` moves it anyway)."""
    model = tiny_msa(2, top_k_docs=2, chunk_size=4)
    memory = random_memory(2, num_docs=7)
    on_host = MemoryEncoder(model, max_batch_tokens=30, show_progress=False)
    elsewhere = MemoryEncoder(model, max_batch_tokens=30, show_progress=False, storage_device="meta")
    host_store, meta_store = on_host.new_store(memory["prefix"]), elsewhere.new_store(memory["prefix"])
    for encoder, store in ((on_host, host_store), (elsewhere, meta_store)):
        encoder.add_documents(store, memory["docs"][:4])
        encoder.add_documents(store, memory["docs"][4:])  # appending concatenates on that device
    assert host_store.device.type == "cpu" and meta_store.device.type == "meta"
    for name in ("keys", "values", "routing_keys"):
        assert all(t.device.type == "meta" for t in getattr(meta_store, name))
        assert [t.shape for t in getattr(meta_store, name)] == [t.shape for t in getattr(host_store, name)]
    assert all(t.device.type == "cpu" for t in meta_store.prefix_keys)  # small; the generator copies it
    assert meta_store.nbytes() == host_store.nbytes() and meta_store.num_tokens == host_store.num_tokens
    assert meta_store.pin_memory() is meta_store and meta_store.device.type == "meta"
    selected = torch.tensor([1, 5])
    host_keys, host_values = host_store.gather_chunks(0, selected)
    meta_keys, meta_values = meta_store.gather_chunks(0, selected)
    assert meta_keys.device.type == meta_values.device.type == "meta"
    assert meta_keys.shape == host_keys.shape and meta_values.shape == host_values.shape
