"""The fast MSA forward against the loop-by-loop reference (`msa_reference.py`), in fp32."""

from __future__ import annotations

import pytest
import torch
from batches import random_packed_batch, tiny_msa
from reference_parity import compare, relative_error

from msa_modeling.layout import build_packed_layout


@pytest.mark.parametrize("routing_score", ["cosine", "scaled_dot"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fast_path_matches_reference(seed, routing_score):
    model = tiny_msa(seed, top_k_docs=2, chunk_size=3, routing_score=routing_score).train()
    batch = random_packed_batch(seed, docs_per_example=(2, 5), doc_length=(1, 10))
    fast = compare(model, batch)
    # The comparison means something only if routing actually left documents out.
    assert not fast.selected_docs.all()


def test_the_routing_scores_differ():
    """The two settings are different functions of the same weights (so each test above covers one)."""
    batch = random_packed_batch(0, docs_per_example=(2, 5), doc_length=(1, 10))
    with torch.no_grad():
        cosine = tiny_msa(0, top_k_docs=2, chunk_size=3)(**batch).doc_scores
        scaled = tiny_msa(0, top_k_docs=2, chunk_size=3, routing_score="scaled_dot")(**batch).doc_scores
    assert relative_error(scaled, cosine) > 0.1


@pytest.mark.parametrize(
    "settings",
    [
        dict(aux_loss_type="infonce"),
        dict(routing_tokens="query"),
        dict(document_positions=False),
        dict(router_layers=[1, 3], query_position_offset=0, chunk_size=1),
        dict(top_k_docs=16, lm_loss_weight=0.1, aux_loss_weight=1.0),
    ],
    ids=["infonce", "route-with-answers", "global-positions", "sparse-router-layers", "k-above-n"],
)
def test_fast_path_matches_reference_across_settings(settings):
    model = tiny_msa(11, **settings).train()
    compare(model, random_packed_batch(11))


def test_fast_path_matches_reference_with_text_injected_after_the_answer():
    model = tiny_msa(13, top_k_docs=1, chunk_size=2).train()
    batch = random_packed_batch(13, injected_length=(2, 6))
    compare(model, batch)


def test_injected_text_after_an_answer_does_not_route():
    """In a QA sample the retrieved document's text follows the ID unlabelled; routing with it
    would let the ID's selection see its own evidence, which inference's first round cannot."""
    batch = random_packed_batch(14, injected_length=(3, 3))
    model = tiny_msa(14)
    layout = build_packed_layout(
        batch["doc_ids"],
        example_ids=batch["example_ids"],
        labels=batch["labels"],
        chunk_size=model.config.chunk_size,
        query_position_offset=0,
    )
    flat_labels = batch["labels"].reshape(-1)
    row_length = batch["doc_ids"].shape[1]
    # Example ids restart in every row: key examples by (row, example).
    flat_example = batch["example_ids"].reshape(-1) + 1000 * (torch.arange(flat_labels.numel()) // row_length)
    flat_doc = batch["doc_ids"].reshape(-1)
    expected = []
    for index in range(flat_doc.numel()):
        if flat_doc[index] != 0 or flat_labels[index] != -100:
            continue
        same_example = (flat_example == flat_example[index]).nonzero().flatten()
        first_target = min(i for i in same_example.tolist() if flat_labels[i] != -100)
        if index < first_target:
            expected.append(index)
    assert layout.routing_token_index.tolist() == expected
    # The row does hold unlabelled query text after the first answer, so the rule excluded something.
    unlabelled_query = ((flat_doc == 0) & (flat_labels == -100)).sum().item()
    assert unlabelled_query > len(expected)


def test_fast_path_matches_reference_with_one_kv_head_and_no_prefix():
    model = tiny_msa(12, backbone_overrides=dict(num_key_value_heads=1, tie_word_embeddings=True)).train()
    compare(model, random_packed_batch(12, batch_size=1, examples_per_row=3, prefix_length=(0, 0)))
