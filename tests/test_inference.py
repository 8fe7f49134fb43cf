"""Inference path vs the training forward, on a tiny random Qwen3-based MSA model."""

from __future__ import annotations

import json

import pytest
import torch
from batches import FAMILIES, tiny_msa
from memories import encoded_store, random_memory, training_row

from msa_modeling.inference import MemoryEncoder, MemoryStore, MSAGenerator, RoutingIndex
from msa_modeling.inference.routing_index import IndexShard, merge_top_k, top_k_lowest_index_first


def assert_inference_matches_the_training_forward(model, memory: dict, store) -> None:
    """The generator over `store` predicts every answer token of `memory`'s training row as the
    training forward does (fp32), and its routing selects and scores the same documents."""
    row = training_row(memory)
    with torch.no_grad():
        trained = model(**row, return_logits=True)
    generator = MSAGenerator(model, store)

    logits, cache = generator.prefill(memory["question"])
    first_answer = len(row["input_ids"][0]) - len(memory["answer"])
    torch.testing.assert_close(logits, trained.logits[0, first_answer - 1], rtol=1e-4, atol=1e-5)
    # The decode path with its KV cache predicts every later answer token the same way.
    for offset, token in enumerate(memory["answer"][:-1]):
        logits = generator.decode(cache, token)
        torch.testing.assert_close(logits, trained.logits[0, first_answer + offset], rtol=1e-4, atol=1e-5)

    for routing, selected, scores in zip(cache.routing, trained.selected_docs, trained.doc_scores):
        assert sorted(routing.docs.tolist()) == selected.nonzero().flatten().tolist()
        torch.testing.assert_close(routing.scores, scores[routing.docs], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("family", "seed"), [("qwen3", 0), ("qwen3", 1), *((f, 2) for f in FAMILIES)])
def test_inference_matches_the_training_forward(family, seed):
    model = tiny_msa(seed, family=family, top_k_docs=2, chunk_size=4, query_position_offset=3)
    memory = random_memory(seed)
    assert_inference_matches_the_training_forward(model, memory, encoded_store(model, memory))


@pytest.mark.parametrize("seed", [0, 1])
def test_scaled_dot_inference_matches_the_training_forward(seed):
    """The released engine's routing score: the encoded keys, the index and the training forward agree."""
    model = tiny_msa(seed, top_k_docs=2, chunk_size=4, query_position_offset=3, routing_score="scaled_dot")
    memory = random_memory(seed)
    store = encoded_store(model, memory)
    assert store.signature["routing_score"] == "scaled_dot"
    assert_inference_matches_the_training_forward(model, memory, store)


@pytest.mark.parametrize("is_causal", [False, True])
def test_softcapped_inference_attention_rounds_as_training_does(is_causal):
    """Gemma 2 caps attention logits. Inference's attention is training's function: in bf16 the
    two give the same bits (scores formed in fp32 on one side only differed in the last place)."""
    from msa_modeling.attention import softcapped_attention
    from msa_modeling.inference.layer_steps import attend

    model = tiny_msa(5, family="gemma2").to(torch.bfloat16)
    layer = model.model.layers[0]
    assert layer.self_attn.softcap is not None
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 4, 12, generator=generator).to(torch.bfloat16) * 4  # [B, L, heads, D]
    k, v = (torch.randn(1, 6, 2, 12, generator=generator).to(torch.bfloat16) * 4 for _ in range(2))
    mask = torch.ones(6, 6, dtype=torch.bool).tril() if is_causal else torch.rand(6, 6, generator=generator) > 0.3
    mask[:, 0] = True  # every query sees a key
    out = attend(layer, q, k, v, mask=None if is_causal else mask, is_causal=is_causal)
    expected = softcapped_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, layer.self_attn.scaling, layer.self_attn.softcap
    ).transpose(1, 2)
    assert torch.equal(out, expected)


def test_a_memory_encoded_for_the_other_routing_score_is_refused(tmp_path):
    model = tiny_msa(4, top_k_docs=2, chunk_size=4, query_position_offset=3)
    memory = random_memory(4)
    encoded_store(model, memory).save(tmp_path / "memory")
    scaled = tiny_msa(4, top_k_docs=2, chunk_size=4, query_position_offset=3, routing_score="scaled_dot")
    with pytest.raises(ValueError, match="routing_score"):
        MemoryStore.load(tmp_path / "memory", config=scaled.config)


@pytest.mark.parametrize(("family", "seed"), [("qwen3", 0), ("qwen3", 1), ("llama", 2), ("gemma3_text", 3)])
def test_global_position_inference_matches_the_training_forward(family, seed):
    """`document_positions=False`: training counts positions from the example's first token, so
    documents are encoded at their offsets in the memory and the question follows the whole
    memory (query_position_offset plays no part). Documents added in two calls continue."""
    model = tiny_msa(seed, family=family, top_k_docs=2, chunk_size=4, query_position_offset=3, document_positions=False)
    memory = random_memory(seed)
    encoder = MemoryEncoder(model, max_batch_tokens=24, show_progress=False)
    store = encoder.new_store(memory["prefix"])
    encoder.add_documents(store, memory["docs"][:3])
    encoder.add_documents(store, memory["docs"][3:])
    generator = MSAGenerator(model, store)
    assert generator.query_start == len(memory["prefix"]) + sum(len(doc) for doc in memory["docs"])
    assert_inference_matches_the_training_forward(model, memory, store)


def test_global_position_appending_equals_encoding_at_once():
    model = tiny_msa(7, top_k_docs=2, chunk_size=4, document_positions=False)
    memory = random_memory(7, num_docs=10)
    at_once = MemoryEncoder(model, max_batch_tokens=40, show_progress=False)
    store = at_once.new_store(memory["prefix"])
    at_once.add_documents(store, memory["docs"])
    appending = MemoryEncoder(model, max_batch_tokens=16, show_progress=False)  # other batches too
    grown = appending.new_store(memory["prefix"])
    for part in (memory["docs"][:4], memory["docs"][4:5], memory["docs"][5:]):
        appending.add_documents(grown, part)
    assert torch.equal(grown.doc_chunk_offsets, store.doc_chunk_offsets)
    for name in ("keys", "values", "routing_keys"):
        for a, b in zip(getattr(grown, name), getattr(store, name)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The positions matter: the same weights with document-wise positions encode other keys.
    document_wise = encoded_store(tiny_msa(7, top_k_docs=2, chunk_size=4), memory)
    assert not torch.allclose(document_wise.keys[0], store.keys[0], rtol=1e-3, atol=1e-4)


def test_a_memory_of_the_other_position_mode_is_refused(tmp_path):
    memory = random_memory(8)
    document_wise = tiny_msa(8, top_k_docs=2, chunk_size=4)
    global_positions = tiny_msa(8, top_k_docs=2, chunk_size=4, document_positions=False)
    store = encoded_store(global_positions, memory)
    store.save(tmp_path / "memory")
    message = r"encoded with global positions \(document_positions=False.*the model uses document-wise positions"
    with pytest.raises(ValueError, match=message):
        MemoryStore.load(tmp_path / "memory", config=document_wise.config)
    with pytest.raises(ValueError, match=message):
        MSAGenerator(document_wise, store)
    with pytest.raises(ValueError, match=message):
        MemoryEncoder(document_wise, show_progress=False).add_documents(store, memory["docs"][:1])
    with pytest.raises(ValueError, match="encoded with document-wise positions"):
        MSAGenerator(global_positions, encoded_store(document_wise, memory))
    assert (
        MemoryStore.load(tmp_path / "memory", config=global_positions.config).signature["document_positions"] is False
    )


def test_a_manifest_without_a_position_mode_loads_as_document_wise(tmp_path):
    """Memories saved before the mode was recorded were all encoded with document-wise positions."""
    model = tiny_msa(9, top_k_docs=2, chunk_size=4)
    encoded_store(model, random_memory(9)).save(tmp_path / "memory")
    manifest_path = tmp_path / "memory" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["signature"]["document_positions"]
    manifest_path.write_text(json.dumps(manifest))
    assert MemoryStore.load(tmp_path / "memory", config=model.config).num_docs == 7
    with pytest.raises(ValueError, match="encoded with document-wise positions"):
        MemoryStore.load(
            tmp_path / "memory", config=tiny_msa(9, top_k_docs=2, chunk_size=4, document_positions=False).config
        )


@pytest.mark.parametrize(("family", "seed"), [("qwen3", 0), ("qwen3", 1), ("llama", 2), ("gemma3_text", 3)])
def test_extending_a_segment_with_routing_equals_a_full_prefill(family, seed):
    """A memory-interleave round: the grown segment routes again; the incremental path
    (lower layers for the new tokens only, router half re-run) equals prefilling it whole."""
    model = tiny_msa(seed, family=family, top_k_docs=2, chunk_size=4, query_position_offset=3)
    memory = random_memory(seed, num_docs=9)
    generator = MSAGenerator(model, encoded_store(model, memory), trace_k=4)
    first, _ = generator.generate(memory["question"], max_new_tokens=3)
    selections_changed = 0
    for doc in memory["docs"]:
        # The round's stop token, an injected document and the delimiter.
        appended = [first.token_ids[-1], *doc, 5]
        _, cache = generator.generate(memory["question"], max_new_tokens=2)  # holds the question + 2 tokens
        grown = memory["question"] + first.token_ids[:2] + appended
        assert cache.token_ids == grown[: cache.length]
        logits = generator.extend(cache, appended)
        expected, full = generator.prefill(grown)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
        assert [(r.layer, r.docs.tolist()) for r in cache.routing] == [(r.layer, r.docs.tolist()) for r in full.routing]
        selections_changed += any(
            not torch.equal(a.docs[:2].sort().values, b.docs[:2].sort().values)
            for a, b in zip(first.routing, full.routing)
        )
        for token in (7, 11, 13):  # decoding goes on identically on both caches
            torch.testing.assert_close(
                generator.decode(cache, token), generator.decode(full, token), rtol=1e-4, atol=1e-5
            )
        assert cache.length == full.length and cache.token_ids == full.token_ids
    assert selections_changed, "no appended document changed a selection: the test would not cover re-routing"


def test_only_the_masked_tokens_route():
    """A prefill whose routing mask routes the question and not what follows it selects as the
    question alone does (a causal token's states never see later tokens), while routing every
    token selects otherwise for some tail."""
    model = tiny_msa(4, top_k_docs=2, chunk_size=4, query_position_offset=3)
    memory = random_memory(4, num_docs=9)
    generator = MSAGenerator(model, encoded_store(model, memory), trace_k=9)
    question = memory["question"]
    _, alone = generator.prefill(question)
    unmasked_differs = 0
    for tail in memory["docs"]:
        mask = [True] * len(question) + [False] * len(tail)
        _, masked = generator.prefill(question + tail, routing_mask=mask)
        _, unmasked = generator.prefill(question + tail)
        for a, b in zip(masked.routing, alone.routing):
            assert a.docs.tolist() == b.docs.tolist()
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
        unmasked_differs += any(
            not torch.allclose(a.scores, b.scores) or a.docs.tolist() != b.docs.tolist()
            for a, b in zip(unmasked.routing, alone.routing)
        )
    assert unmasked_differs, "no tail changed the unmasked routing: the test would not cover the mask"


def test_a_routing_mask_must_fit_a_prefill_and_route_some_token():
    model = tiny_msa(4, top_k_docs=2, chunk_size=4)
    memory = random_memory(4)
    generator = MSAGenerator(model, encoded_store(model, memory))
    question = memory["question"]
    with pytest.raises(ValueError, match="routes no token"):
        generator.prefill(question, routing_mask=[False] * len(question))
    with pytest.raises(ValueError, match="flags for"):
        generator.prefill(question, routing_mask=[True])
    _, cache = generator.prefill(question)
    with pytest.raises(ValueError, match="applies to a prefill"):
        generator.generate([5], 1, cache=cache, route=True, routing_mask=[True])


def test_decoding_past_the_reserved_capacity_grows_the_cache():
    model = tiny_msa(6, top_k_docs=2, chunk_size=4)
    memory = random_memory(6)
    generator = MSAGenerator(model, encoded_store(model, memory))
    _, small = generator.prefill(memory["question"])
    _, roomy = generator.prefill(memory["question"], reserve=16)
    assert small.capacity == len(memory["question"]) and roomy.capacity == len(memory["question"]) + 16
    for token in range(3, 15):
        torch.testing.assert_close(generator.decode(small, token), generator.decode(roomy, token))
    assert small.capacity >= small.length == roomy.length


def test_inference_attention_never_runs_cudnn(monkeypatch):
    """cuDNN's SDPA plans every new key length (about 3 ms of host time per layer and decode step
    on an H100, for a kernel of microseconds): inference attends with the other backends only."""
    import torch.nn.functional as F

    cudnn_allowed = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        cudnn_allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    model = tiny_msa(6, top_k_docs=2, chunk_size=4)
    memory = random_memory(6)
    generator = MSAGenerator(model, encoded_store(model, memory))
    _, cache = generator.prefill(memory["question"])
    generator.decode(cache, 3)
    assert cudnn_allowed and not any(cudnn_allowed)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the caller's setting is back


def test_generation_with_an_empty_memory_equals_the_backbone():
    model = tiny_msa(3)
    memory = random_memory(3)
    encoder = MemoryEncoder(model, show_progress=False)
    generator = MSAGenerator(model, encoder.new_store(memory["prefix"]))
    output, _ = generator.generate(memory["question"], max_new_tokens=3)
    row = training_row({**memory, "docs": [], "answer": output.token_ids})
    with torch.no_grad():
        trained = model(**row, return_logits=True)
    predicted = trained.logits[0, -4:-1].argmax(-1).tolist()
    assert output.token_ids == predicted


def test_trace_k_ranks_more_documents_than_are_attended():
    model = tiny_msa(4, top_k_docs=2, chunk_size=4)
    memory = random_memory(4)
    store = encoded_store(model, memory)
    plain, _ = MSAGenerator(model, store).generate(memory["question"], 4)
    traced, _ = MSAGenerator(model, store, trace_k=5).generate(memory["question"], 4)
    assert traced.token_ids == plain.token_ids
    assert all(len(r.docs) == 5 for r in traced.routing)
    assert all(torch.equal(a.docs, b.docs[:2]) for a, b in zip(plain.routing, traced.routing))


def test_top_k_breaks_ties_towards_the_lower_index():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1, 0.5])
    values, index = top_k_lowest_index_first(scores, 3)
    assert index.tolist() == [1, 3, 0]
    merged_scores, merged_docs = merge_top_k(torch.tensor([0.5, 0.9, 0.9, 0.5]), torch.tensor([7, 5, 2, 3]), 3)
    assert merged_docs.tolist() == [2, 5, 3]


def test_top_k_matches_a_stable_sort_on_many_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (200,), generator=generator).float() / 4  # many ties, -0.0 and 0.0 among them
    scores[::7] = -scores[::7]
    reference = sorted(range(200), key=lambda i: (-float(scores[i]), i))
    values, index = top_k_lowest_index_first(scores, 50)
    assert index.tolist() == reference[:50] and torch.equal(values, scores[index])
    docs = torch.randperm(200, generator=generator)
    _, merged = merge_top_k(scores, docs, 30)
    assert merged.tolist() == sorted(docs.tolist(), key=lambda d: (-float(scores[(docs == d).nonzero()]), d))[:30]


def test_sharded_index_agrees_with_one_shard():
    model = tiny_msa(5, top_k_docs=3, chunk_size=4)
    store = encoded_store(model, random_memory(5, num_docs=11))
    one = RoutingIndex.from_store(store, ["cpu"], tile_size=5)
    three = RoutingIndex.from_store(store, ["cpu", "cpu", "cpu"], tile_size=2)
    assert [s.num_docs for s in three.shards if s.num_docs] and sum(s.num_docs for s in three.shards) == 11
    queries = torch.randn(5, store.routing_keys[0].shape[1], generator=torch.Generator().manual_seed(0))
    for slot in range(len(store.router_layers)):
        assert torch.equal(one.top_documents(slot, queries, 4)[1], three.top_documents(slot, queries, 4)[1])
    assert isinstance(three.shards[0], IndexShard)


def test_the_staging_buffer_is_reused_and_grows():
    from msa_modeling.inference.encoder import _PinnedStaging

    staging = _PinnedStaging(pin=False)
    first = torch.arange(12.0).view(2, 6)
    assert torch.equal(staging.copy("k", first), first)
    buffer = staging.buffers["k"]
    smaller = torch.arange(6.0).view(2, 3) + 100
    assert torch.equal(staging.copy("k", smaller), smaller) and staging.buffers["k"] is buffer
    larger = torch.arange(30.0).view(2, 15)
    assert torch.equal(staging.copy("k", larger), larger) and staging.buffers["k"].numel() == 30
    halves = torch.ones(4, dtype=torch.bfloat16)  # another dtype gets its own buffer
    assert torch.equal(staging.copy("k", halves), halves) and staging.buffers["k"].dtype == torch.bfloat16
