"""`MSAForCausalLM` through transformers' own generation API: `generate()` with and without a
memory, left-padded batches, sampling, beam search, streaming, stop strings and `pipeline`."""

from __future__ import annotations

import threading

import pytest
import torch
from batches import FAMILIES, VOCAB, tiny_backbone, tiny_msa
from memories import encoded_store, random_memory
from transformers import DynamicCache, GenerationConfig, TextIteratorStreamer, pipeline

from msa_modeling import MSAForCausalLM
from msa_modeling.execution import CheckpointedLayer
from msa_modeling.inference import MSAGenerator

PAD = 0


def greedy(max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding of exactly `max_new_tokens` tokens (no end-of-sequence stop)."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD)


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def random_prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_an_empty_memory_equals_the_backbone(family):
    backbone = tiny_backbone(family, 11)
    model = MSAForCausalLM.from_backbone(backbone, top_k_docs=2, chunk_size=4).eval()
    assert model.can_generate()
    for prompt in random_prompts(11, (5, 9)):
        ids = torch.tensor([prompt])
        expected = backbone.generate(ids, generation_config=greedy(10))
        assert model.generate(ids, generation_config=greedy(10)).tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(family):
    model = tiny_msa(12, family=family)
    prompts = random_prompts(12, (3, 8, 5))
    ids, mask = left_padded(prompts)
    batched = model.generate(ids, attention_mask=mask, generation_config=greedy(8))[:, ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), generation_config=greedy(8))[0, len(prompt) :]
        assert batched[row].tolist() == alone.tolist(), row


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_a_memory_equals_msa_generator(family):
    model = tiny_msa(13, family=family, top_k_docs=2, chunk_size=4)
    memory = random_memory(13)
    store = encoded_store(model, memory)
    questions = [memory["question"], random_prompts(13, (6,))[0]]
    ids, mask = left_padded(questions)
    output = model.generate(
        ids, attention_mask=mask, memory=store, generation_config=greedy(7), return_dict_in_generate=True
    )
    generator = MSAGenerator(model, store)
    for row, question in enumerate(questions):
        expected, cache = generator.generate(question, max_new_tokens=7)
        assert output.sequences[row, ids.shape[1] :].tolist() == expected.token_ids, row
        # The selection the cache keeps is the one MSAGenerator routed to, per router layer.
        routed = output.cache.msa_memory.routing[row]
        assert [r.docs.tolist() for r in routed] == [r.docs.tolist() for r in cache.routing]
    # A store that holds documents and a non-trivial selection: not every document is attended.
    assert store.num_docs > model.config.top_k_docs


def test_memory_generate_reuses_a_generator_and_its_routing_index():
    model = tiny_msa(14)
    memory = random_memory(14)
    generator = MSAGenerator(model, encoded_store(model, memory))
    ids = torch.tensor([memory["question"]])
    from_store = model.generate(ids, memory=generator.store, generation_config=greedy(5))
    from_generator = model.generate(ids, memory=generator, generation_config=greedy(5))
    assert from_store.tolist() == from_generator.tolist()
    with pytest.raises(ValueError, match="another model"):
        model.generate(ids, memory=MSAGenerator(tiny_msa(14), generator.store), generation_config=greedy(2))
    with pytest.raises(TypeError, match="MemoryStore or an MSAGenerator"):
        model(ids, memory="not a store")


def test_cached_forward_matches_the_full_forward_and_takes_the_standard_arguments():
    model = tiny_msa(15)
    ids = torch.tensor(random_prompts(15, (9,)))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :6], use_cache=True)
        rest = model(ids[:, 6:], past_key_values=first.cache, attention_mask=torch.ones(1, 9, dtype=torch.long))
        assert isinstance(first.cache, DynamicCache)
        torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=1e-5, atol=1e-5)
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, full)
        last = model(ids, logits_to_keep=1, return_dict=False)[0]
        torch.testing.assert_close(last, full[:, -1:])
        # The packed training path agrees on a plain row (every token a query token).
        packed = model(ids, doc_ids=torch.zeros_like(ids), return_logits=True).logits
        torch.testing.assert_close(packed, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(ids, doc_ids=torch.zeros_like(ids), use_cache=True)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        # The mask covers the cached tokens too: 9, not the 3 new ones.
        model(ids[:, 6:], cache=model(ids[:, :6], use_cache=True).cache, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention weights"):
        model(ids, output_attentions=True)


def test_a_binding_sliding_window_is_rejected_while_decoding():
    model = tiny_msa(16, family="mistral", backbone_overrides=dict(sliding_window=8))
    ids = torch.tensor(random_prompts(16, (6,)))
    with pytest.raises(ValueError, match="sliding window"):
        model.generate(ids, generation_config=greedy(6))


def test_sampling_and_beam_search_run_and_sampling_follows_the_seed():
    model = tiny_msa(17)
    ids, mask = left_padded(random_prompts(17, (4, 6)))
    sample = lambda: model.generate(
        ids, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=6, pad_token_id=PAD, eos_token_id=None
    )
    torch.manual_seed(0)
    first = sample()
    torch.manual_seed(0)
    assert sample().tolist() == first.tolist()
    beams = model.generate(ids, attention_mask=mask, num_beams=3, num_return_sequences=2, generation_config=greedy(5))
    assert beams.shape == (4, ids.shape[1] + 5)
    # Beam search with one beam is greedy search.
    one_beam = model.generate(ids, attention_mask=mask, num_beams=1, generation_config=greedy(5))
    assert one_beam.tolist() == model.generate(ids, attention_mask=mask, generation_config=greedy(5)).tolist()


def test_beam_search_over_a_memory_keeps_each_prompts_selection():
    model = tiny_msa(18)
    memory = random_memory(18)
    store = encoded_store(model, memory)
    ids, mask = left_padded([memory["question"], random_prompts(18, (3,))[0]])
    output = model.generate(
        ids, attention_mask=mask, memory=store, num_beams=2, generation_config=greedy(4), return_dict_in_generate=True
    )
    assert output.sequences.shape == (2, ids.shape[1] + 4)
    generator = MSAGenerator(model, store)
    for row, question in enumerate([memory["question"], random_prompts(18, (3,))[0]]):
        _, cache = generator.prefill(question)
        for beam in range(2):
            routed = output.cache.msa_memory.routing[2 * row + beam]
            assert [r.docs.tolist() for r in routed] == [r.docs.tolist() for r in cache.routing]


@pytest.fixture(scope="module")
def text_model():
    from train.tokenizer import train_tiny_tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park", "memory sparse attention reads documents"] * 20
    tokenizer = train_tiny_tokenizer(texts, vocab_size=300, special_tokens=[])
    backbone = tiny_backbone("qwen3", 19, vocab_size=len(tokenizer))
    return MSAForCausalLM.from_backbone(backbone, top_k_docs=2, chunk_size=4).eval(), tokenizer


def test_text_generation_pipeline_streamer_and_stop_strings(text_model):
    model, tokenizer = text_model
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    result = generate("the cat", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("the cat")
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    expected = model.generate(ids, generation_config=greedy(5))
    assert result[0]["generated_text"] == tokenizer.decode(expected[0])

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(
        target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer, generation_config=greedy(5))
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(expected[0, ids.shape[1] :])

    # Stop at the first generated token that decodes to clean text: generation ends right after it.
    generated = expected[0, ids.shape[1] :].tolist()
    first_clean = next(
        i for i, t in enumerate(generated) if tokenizer.decode([t]).strip().isascii() and tokenizer.decode([t]).strip()
    )
    stop = tokenizer.decode([generated[first_clean]]).strip()
    stopped = model.generate(ids, stop_strings=[stop], tokenizer=tokenizer, max_new_tokens=5, do_sample=False)
    assert stopped[0].tolist() == expected[0, : ids.shape[1] + first_clean + 1].tolist()
    assert first_clean < len(generated) - 1  # the stop string cut generation short


def test_reentrant_gradient_checkpointing_is_refused_and_the_default_enables_it():
    model = tiny_msa(20)
    with pytest.raises(ValueError, match="non-reentrant"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert not model.is_activation_checkpointing
    keys = list(model.state_dict())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    assert all(isinstance(layer, CheckpointedLayer) for layer in model.model.layers)
    assert list(model.state_dict()) == keys
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    assert not any(isinstance(layer, CheckpointedLayer) for layer in model.model.layers)
