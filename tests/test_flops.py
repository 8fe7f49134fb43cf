"""The one FLOP accounting (`msa_modeling.flops`): a hand-counted tiny case, the LM head on labelled
tokens only, padding counted as nothing, selected memory pairs, and MSA and dense models counted alike."""

from __future__ import annotations

import torch
from batches import tiny_backbone, tiny_msa

from msa_modeling.flops import FlopModel, dense_work, msa_work
from msa_modeling.layout import build_packed_layout

# prefix 2, doc 1 (3 tokens), doc 2 (2 tokens), question + answer 3, padding 2
DOC_IDS = [-2, -2, 1, 1, 1, 2, 2, 0, 0, 0, -1, -1]


def layout_of(doc_ids: list[int], labelled: list[int], chunk_size: int = 2):
    labels = torch.full((1, len(doc_ids)), -100)
    labels[0, labelled] = 5
    return build_packed_layout(
        torch.tensor([doc_ids]),
        chunk_size=chunk_size,
        query_position_offset=0,
        labels=labels,
        aux_labels=torch.zeros(1, len(doc_ids), dtype=torch.long),
    )


def test_work_of_a_hand_counted_row() -> None:
    work = msa_work(layout_of(DOC_IDS, labelled=[8, 9]))
    assert work.tokens == 10  # the two padding tokens count nothing
    assert work.head_tokens == 2  # one prediction per labelled token
    assert work.routing_tokens == 1  # the question's unlabelled token before the answer
    # causal pairs: prefix 3 + doc 1 6 + doc 2 3 + question 6, then question x prefix 3 x 2
    assert work.token_pairs == 3 + 6 + 3 + 6 + 6
    # doc 1 has 2 chunks of 2, doc 2 one; the question's 3 tokens see each selected chunk
    assert work.doc_memory_pairs.tolist() == [6.0, 3.0]
    assert float(work.memory_pairs(torch.tensor([[True, False], [True, True]]))) == 6 + 6 + 3
    assert work.memory_pairs(None) == 0.0


def test_flop_model_counts_the_matrices_by_hand() -> None:
    model = tiny_msa(0, top_k_docs=1, chunk_size=2)
    config = model.config
    h, heads, kv_heads, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * config.intermediate_size
    router_layers = len(config.router_layers)
    flops = FlopModel.from_model(model)
    assert flops.layer_matmul_parameters == config.num_hidden_layers * per_layer
    assert flops.head_parameters == config.vocab_size * h
    assert flops.router_key_parameters == router_layers * h * kv_heads * d
    assert flops.router_query_parameters == router_layers * h * heads * d

    work = msa_work(layout_of(DOC_IDS, labelled=[8, 9]))
    expected = 2 * (
        flops.layer_matmul_parameters * 10
        + flops.head_parameters * 2
        + flops.router_key_parameters * 10
        + flops.router_query_parameters * 1
    )
    expected += 4 * heads * d * (config.num_hidden_layers * 24 + 9)
    assert flops.forward_flops(work, memory_pairs=9) == expected
    assert flops.training_flops(work, memory_pairs=9) == 3 * expected
    assert flops.training_flops(work) + flops.memory_pair_training_flops(9) == 3 * expected


def test_the_head_counts_only_labelled_tokens_and_padding_counts_nothing() -> None:
    flops = FlopModel.from_model(tiny_msa(0, top_k_docs=1, chunk_size=2))
    two = msa_work(layout_of(DOC_IDS, labelled=[8, 9]))
    one = msa_work(layout_of(DOC_IDS, labelled=[9]))
    assert two.head_tokens - one.head_tokens == 1
    # One more labelled token adds exactly one token's head, and it routes one token less.
    difference = flops.forward_flops(two) - flops.forward_flops(one)
    assert difference == 2 * (flops.head_parameters - flops.router_query_parameters)
    padded = msa_work(layout_of(DOC_IDS + [-1] * 20, labelled=[8, 9]))
    assert flops.forward_flops(padded) == flops.forward_flops(two)
    assert torch.equal(padded.doc_memory_pairs, two.doc_memory_pairs)


def test_dense_and_msa_models_share_the_accounting() -> None:
    model = tiny_msa(0, top_k_docs=1, chunk_size=2)
    dense = FlopModel.from_model(tiny_backbone("qwen3", 0))
    msa = FlopModel.from_model(model)
    assert dense.layer_matmul_parameters == msa.layer_matmul_parameters
    assert dense.head_parameters == msa.head_parameters
    assert dense.router_key_parameters == dense.router_query_parameters == dense.num_router_layers == 0
    doc_ids = torch.tensor([DOC_IDS])
    causal = dense_work(doc_ids)
    assert (causal.tokens, causal.head_tokens, causal.token_pairs) == (10, 10, 55)  # 10 real tokens, causal
    masked = dense_work(doc_ids, document_mask=True)
    assert masked.token_pairs == 3 + 6 + 3 + 6
