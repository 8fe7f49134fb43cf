"""MSA model behaviour: isolation, conversion, gradient flow, loading, losses, bad inputs."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from batches import VOCAB, document_token_mask, random_packed_batch, tiny_msa, tiny_qwen3
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from msa_modeling import MSAConfig, MSAForCausalLM, build_packed_layout, compute_position_ids
from msa_modeling.execution import (
    activation_offload_of,
    apply_activation_checkpointing,
    apply_activation_offload,
    apply_compile,
    decoder_layer,
)
from msa_modeling.modeling_msa import MSAModel
from msa_modeling.offload import ActivationOffload
from msa_modeling.routing import rank_documents, select_documents


def doc_index(model: MSAForCausalLM, batch: dict, mask: torch.Tensor) -> int:
    """Batch-wide index of the document whose tokens `mask` marks."""
    layout = model.build_layout(batch["doc_ids"], batch["example_ids"], batch["labels"], batch["aux_labels"])
    first = int(mask.flatten().nonzero()[0])
    return int(layout.chunk_doc[layout.token_chunk[first]])


def all_documents(batch: dict) -> list[tuple[int, int, int]]:
    found = []
    for row in range(batch["doc_ids"].shape[0]):
        pairs = torch.stack([batch["example_ids"][row], batch["doc_ids"][row]], 1)
        for example, doc in torch.unique(pairs, dim=0).tolist():
            if doc > 0:
                found.append((row, example, doc))
    return found


def change_tokens(batch: dict, mask: torch.Tensor, seed: int) -> dict:
    changed = {k: v.clone() for k, v in batch.items()}
    generator = torch.Generator().manual_seed(seed)
    new_ids = torch.randint(3, VOCAB, changed["input_ids"].shape, generator=generator)
    changed["input_ids"] = torch.where(mask, new_ids, changed["input_ids"])
    return changed


def run(model: MSAForCausalLM, batch: dict):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, return_logits=True)


# ---------------------------------------------------------------- isolation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_changing_a_document_changes_no_other_document(seed):
    model = tiny_msa(seed)
    batch = random_packed_batch(seed)
    before = run(model, batch)
    for row, example, doc in all_documents(batch)[:4]:
        mask = document_token_mask(batch, row, example, doc)
        after = run(model, change_tokens(batch, mask, seed + 100))
        other_docs = (batch["doc_ids"] > 0) & ~mask
        for layer, (h0, h1) in enumerate(zip(before.hidden_states, after.hidden_states)):
            assert torch.equal(h0[other_docs], h1[other_docs]), f"layer {layer}: doc ({row},{example},{doc}) leaked"
        assert not torch.equal(before.hidden_states[-1][mask], after.hidden_states[-1][mask])


@pytest.mark.parametrize("seed", [0, 1])
def test_lower_layers_never_see_the_memory(seed):
    model = tiny_msa(seed)
    batch = random_packed_batch(seed)
    first_router = min(model.config.router_layers)
    is_query = batch["doc_ids"] == 0
    before = run(model, batch)
    after = run(model, change_tokens(batch, batch["doc_ids"] > 0, seed + 7))
    for layer in range(first_router + 1):  # hidden_states[i] is the input of layer i
        assert torch.equal(before.hidden_states[layer][is_query], after.hidden_states[layer][is_query])
    assert not torch.equal(before.hidden_states[-1][is_query], after.hidden_states[-1][is_query])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_router_layers_see_only_selected_documents(seed):
    model = tiny_msa(seed)
    batch = random_packed_batch(seed, docs_per_example=(5, 6))
    before = run(model, batch)
    selected_anywhere = before.selected_docs.any(0)
    is_query = batch["doc_ids"] == 0
    checked_unselected = checked_selected = 0
    for row, example, doc in all_documents(batch):
        mask = document_token_mask(batch, row, example, doc)
        index = doc_index(model, batch, mask)
        query_of_example = (
            is_query & (batch["example_ids"] == example) & (torch.arange(batch["doc_ids"].shape[0])[:, None] == row)
        )
        for attempt in range(5):
            after = run(model, change_tokens(batch, mask, 1000 * seed + attempt))
            if torch.equal(after.selected_docs, before.selected_docs):
                break
        else:
            continue  # every perturbation moved the selection: nothing clean to compare
        changed = not torch.equal(before.logits[query_of_example], after.logits[query_of_example])
        if selected_anywhere[index]:
            assert changed, f"selected doc ({row},{example},{doc}) did not reach its query"
            checked_selected += 1
        else:
            assert not changed, f"unselected doc ({row},{example},{doc}) reached its query"
            checked_unselected += 1
    assert checked_selected > 0 and checked_unselected > 0


def test_examples_packed_in_one_row_do_not_interact():
    model = tiny_msa(3)
    batch = random_packed_batch(3, batch_size=1)
    first_example = batch["example_ids"] == 0
    before = run(model, batch)
    after = run(model, change_tokens(batch, batch["example_ids"] == 1, 5))
    assert torch.equal(before.logits[first_example], after.logits[first_example])


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("offset", [0, 16])
def test_empty_memory_matches_backbone(tied, offset):
    backbone = tiny_qwen3(4, tie_word_embeddings=tied)
    model = MSAForCausalLM.from_backbone(backbone, query_position_offset=offset, top_k_docs=2, chunk_size=4).eval()
    input_ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone(input_ids).logits
        got = model(input_ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


def test_labelled_row_without_documents_has_no_aux_loss():
    """A row of prefix and question only, with the all-zero aux labels a loader emits for it,
    trains exactly like the same row without aux labels: LM loss only."""
    model = MSAForCausalLM.from_backbone(tiny_qwen3(4), top_k_docs=2, chunk_size=4)
    input_ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[-2] * 4 + [0] * 16])
    labels = torch.full_like(input_ids, -100)
    labels[:, -5:] = input_ids[:, -5:]
    out = model(input_ids, doc_ids=doc_ids, labels=labels, aux_labels=torch.zeros_like(doc_ids))
    without = model(input_ids, doc_ids=doc_ids, labels=labels)
    assert out.aux_loss is None and torch.isfinite(out.loss)
    assert torch.equal(out.loss, without.loss)


def test_conversion_copies_every_backbone_weight_and_inits_router():
    backbone = tiny_qwen3(5)
    model = MSAForCausalLM.from_backbone(backbone)
    ours = model.state_dict()
    for name, weight in backbone.state_dict().items():
        assert torch.equal(ours[name], weight), name
    router = [n for n in ours if ".router_" in n]
    expected_layers = [2, 3]  # the upper half of 4 layers
    assert sorted({int(n.split(".")[2]) for n in router}) == expected_layers
    assert len(router) == 2 * len(expected_layers)
    assert all(ours[n].std() > 0 for n in router)

    qk = MSAForCausalLM.from_backbone(backbone, router_init="qk")
    for layer in expected_layers:
        attention = qk.model.layers[layer].self_attn
        assert torch.equal(attention.router_q_proj.weight, attention.q_proj.weight)
        assert torch.equal(attention.router_k_proj.weight, attention.k_proj.weight)


def test_tied_router_init_copies_each_kv_group_of_router_keys_to_its_query_heads():
    backbone = tiny_qwen3(8)
    before = {name: weight.clone() for name, weight in backbone.state_dict().items()}
    model = MSAForCausalLM.from_backbone(backbone, router_init="tied")
    assert model.config.router_init == "tied"
    ours = model.state_dict()
    for name, weight in before.items():
        assert torch.equal(ours[name], weight), name
        assert torch.equal(backbone.state_dict()[name], weight), name
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    assert heads > kv_heads > 1  # several groups of several query heads: a wrong mapping cannot pass
    layers = [i for i, layer in enumerate(model.model.layers) if layer.self_attn.is_router]
    assert layers == [2, 3]
    for index in layers:
        attention = model.model.layers[index].self_attn
        head_dim = attention.head_dim
        keys = attention.router_k_proj.weight.view(kv_heads, head_dim, -1)
        queries = attention.router_q_proj.weight.view(heads, head_dim, -1)
        assert keys.std() > 0
        for head in range(heads):
            assert torch.equal(queries[head], keys[head // (heads // kv_heads)]), (index, head)
        assert not torch.equal(keys[0], keys[1])
        assert not torch.equal(attention.router_k_proj.weight, attention.k_proj.weight)
    with pytest.raises(ValueError, match="router_init"):
        MSAForCausalLM.from_backbone(backbone, router_init="tie")


def test_conversion_from_checkpoint_directory(tmp_path):
    backbone = tiny_qwen3(6)
    backbone.save_pretrained(tmp_path / "qwen3")
    model = MSAForCausalLM.from_backbone(tmp_path / "qwen3", top_k_docs=3).eval()
    assert model.config.top_k_docs == 3
    assert model.config.hidden_size == backbone.config.hidden_size
    assert model.config.rms_norm_eps == backbone.config.rms_norm_eps
    input_ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, backbone(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_sliding_window_backbone_is_rejected():
    backbone = tiny_qwen3(0, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(ValueError, match="sliding"):
        MSAForCausalLM.from_backbone(backbone)


# ---------------------------------------------------------------- gradients


def test_router_learns_from_aux_loss_only():
    model = tiny_msa(7).train()
    batch = random_packed_batch(7)
    router_params = [p for n, p in model.named_parameters() if ".router_" in n]

    out = model(**batch)
    out.lm_loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in router_params)

    model.zero_grad(set_to_none=True)
    model(**batch).aux_loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in router_params)


def test_lm_loss_reaches_lower_layer_kv_through_selected_documents_only():
    model = tiny_msa(8).train()
    batch = random_packed_batch(8, docs_per_example=(5, 6))
    captured = {}

    def keep(name):
        def hook(_module, _inputs, output):
            output.retain_grad()
            captured[name] = output

        return hook

    model.model.layers[0].self_attn.k_proj.register_forward_hook(keep("k"))
    model.model.layers[0].self_attn.v_proj.register_forward_hook(keep("v"))
    out = model(**batch)
    out.lm_loss.backward()
    selected_anywhere = out.selected_docs.any(0)
    assert selected_anywhere.any() and not selected_anywhere.all()
    for row, example, doc in all_documents(batch):
        mask = document_token_mask(batch, row, example, doc)
        for name in ("k", "v"):
            grad = captured[name].grad[mask]
            if selected_anywhere[doc_index(model, batch, mask)]:
                assert grad.abs().sum() > 0, f"{name}: selected doc ({row},{example},{doc}) got no LM gradient"
            else:
                assert torch.count_nonzero(grad) == 0, f"{name}: unselected doc ({row},{example},{doc}) got LM gradient"


def test_detached_router_input_keeps_aux_gradient_in_the_router():
    model = tiny_msa(9, detach_router_input=True).train()
    batch = random_packed_batch(9)
    model(**batch).aux_loss.backward()
    backbone_grads = [p.grad for n, p in model.named_parameters() if ".router_" not in n]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in backbone_grads)
    assert model.model.layers[2].self_attn.router_q_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- loading


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny_msa(10, aux_loss_type="infonce", routing_tokens="query")
    batch = random_packed_batch(10)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "msa"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MSAForCausalLM
    assert loaded.config.aux_loss_type == "infonce" and loaded.config.routing_tokens == "query"
    assert loaded.config.router_layers == model.config.router_layers
    assert torch.equal(run(model, batch).logits, run(loaded, batch).logits)


# ---------------------------------------------------------------- losses and outputs


def test_chunked_lm_loss_equals_full_cross_entropy():
    model = tiny_msa(11, lm_loss_chunk_size=3)
    batch = random_packed_batch(11)
    out = run(model, batch)
    logits, labels, examples = out.logits[:, :-1], batch["labels"][:, 1:], batch["example_ids"]
    # Never predict across a packed example boundary.
    labels = torch.where(examples[:, 1:] == examples[:, :-1], labels, torch.full_like(labels, -100))
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, expected, rtol=1e-6, atol=1e-6)
    assert out.loss is not None and out.aux_loss is not None
    torch.testing.assert_close(out.loss, 1.0 * out.lm_loss + 0.1 * out.aux_loss)


def test_aux_loss_is_none_without_positives_and_recall_is_reported_per_layer():
    model = tiny_msa(12)
    batch = random_packed_batch(12)
    no_positives = dict(batch, aux_labels=torch.zeros_like(batch["aux_labels"]))
    out = run(model, no_positives)
    assert out.aux_loss is None
    assert torch.isnan(out.router_recall["recall@1"]).all()
    out = run(model, batch)
    for k in ("recall@1", "recall@5", "recall@10"):
        assert out.router_recall[k].shape == (len(model.config.router_layers),)
        assert ((out.router_recall[k] >= 0) & (out.router_recall[k] <= 1)).all()
    # With at most 6 documents per example, the top 10 hold every positive.
    assert torch.equal(out.router_recall["recall@10"], torch.ones(2))


def test_positions_follow_the_spec():
    doc_ids = torch.tensor([-2, -2, -2, 1, 1, 1, 2, 2, 0, 0, 0, -1])
    expected = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3 + 16, 4 + 16, 5 + 16, 0])
    assert torch.equal(compute_position_ids(doc_ids, query_position_offset=16), expected)
    packed = torch.tensor([[1, 1, 0, 1, 2, 0, 0]])
    examples = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    assert compute_position_ids(packed, examples, query_position_offset=4).tolist() == [[0, 1, 4, 0, 0, 4, 5]]
    assert compute_position_ids(packed, examples, document_positions=False).tolist() == [[0, 1, 2, 0, 1, 2, 3]]


def test_bf16_forward_and_backward_on_cpu():
    model = tiny_msa(13).train()
    batch = random_packed_batch(13)
    reference = model(**batch)
    model = model.to(torch.bfloat16)
    out = model(**batch)
    out.loss.backward()
    assert out.lm_loss.dtype == torch.float32 and out.aux_loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
    assert abs(out.lm_loss.item() - reference.lm_loss.item()) < 0.05 * reference.lm_loss.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = random_packed_batch(14)
    grads, forward_calls = [], []
    for checkpointing, checkpointed_layers in ((False, None), (True, None), (True, 1)):
        model = tiny_msa(14).train()
        calls = [0] * len(model.model.layers)
        for index, layer in enumerate(model.model.layers):

            def counted(hidden, index=index, feed_forward=layer.feed_forward):
                calls[index] += 1
                return feed_forward(hidden)

            layer.feed_forward = counted
        if checkpointing:
            apply_activation_checkpointing(model, layers=checkpointed_layers)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        forward_calls.append(calls)
    # A recomputed layer runs its forward twice: once in the forward pass, once in backward.
    layers = len(forward_calls[0])
    assert forward_calls == [[1] * layers, [2] * layers, [2] + [1] * (layers - 1)]
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], other[name], rtol=1e-5, atol=1e-7)


def test_saved_attention_layers_skip_the_kernel_in_backward_with_the_same_gradients():
    from torch.utils._python_dispatch import TorchDispatchMode

    from msa_modeling.attention import ATTENTION_KERNEL_OPS

    class CountAttentionKernels(TorchDispatchMode):
        """Pushed before the checkpoint's own mode, so it sees only kernels that really run."""

        def __init__(self) -> None:
            super().__init__()
            self.runs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.runs += func.name() in ATTENTION_KERNEL_OPS
            return func(*args, **(kwargs or {}))

    batch = random_packed_batch(14)
    grads, runs = [], []
    for saved in (0, 1, len(tiny_msa(14).model.layers)):
        model = tiny_msa(14, attn_backend="sdpa").train()
        apply_activation_checkpointing(model, keep_attention_layers=saved)
        with CountAttentionKernels() as counter:
            model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        runs.append(counter.runs)
    layers = model.config.num_hidden_layers
    # Forward and recompute run the kernel once per layer each; a saved layer skips the recompute.
    assert runs == [2 * layers, 2 * layers - 1, layers]
    for other in grads[1:]:
        assert grads[0].keys() == other.keys()
        for name in grads[0]:
            assert torch.equal(grads[0][name], other[name]), name


def test_identical_documents_score_alike_wherever_they_sit():
    model = tiny_msa(15, top_k_docs=2)
    doc = torch.randint(3, VOCAB, (5,))
    input_ids = torch.cat([doc, doc, doc, torch.tensor([5, 6, 7])]).unsqueeze(0)
    doc_ids = torch.tensor([[1] * 5 + [2] * 5 + [3] * 5 + [0] * 3])
    out = run(model, {"input_ids": input_ids, "doc_ids": doc_ids})
    # Equal up to float reduction order: document-wise positions make a document's keys
    # independent of where it is packed, but kernels may tile its rows differently.
    torch.testing.assert_close(out.doc_scores[:, 0], out.doc_scores[:, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.doc_scores[:, 0], out.doc_scores[:, 2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_offloaded_layers_match_kept_activations_and_are_prefetched(compiled):
    batch = random_packed_batch(16)
    grads, losses, offloads = [], [], []
    for offloaded in (0, 2):
        model = tiny_msa(16).train()
        apply_activation_checkpointing(model, layers=1, start=offloaded)
        # Every saved tensor of the tiny model is small; offload them all.
        apply_activation_offload(model, layers=offloaded, min_bytes=0)
        if compiled:
            apply_compile(model)
        calls = [0] * len(model.model.layers)
        for index, layer in enumerate(model.model.layers):
            layer = decoder_layer(layer)

            def counted(hidden, attended, index=index, after=layer.after_attention):
                calls[index] += 1
                return after(hidden, attended)

            layer.after_attention = counted
        out = model(**batch)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        offloads.append((calls, activation_offload_of(model)))
    layers = len(offloads[0][0])
    # Without offload layer 0 is recomputed; with 2 offloaded, layers 0-1 run once and layer 2 is recomputed.
    assert offloads[0][0] == [2] + [1] * (layers - 1)
    assert offloads[1][0] == [1, 1, 2] + [1] * (layers - 3)
    offload = offloads[1][1]
    assert offload.offloaded_bytes > 0 and sorted(offload.layers) == [0, 1]
    assert all(offload.layers[i] for i in (0, 1))
    assert offload.late_fetches == 0  # both layers were brought back ahead of their backward
    assert all(entry.on_device is None for i in (0, 1) for entry in offload.layers[i])
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7)


def test_offload_prefetch_depth_follows_the_setting_and_is_off_outside_training():
    batch = random_packed_batch(16)
    model = tiny_msa(16).train()
    apply_activation_offload(model, layers=2, prefetch_layers=1)
    model(**batch).loss.backward()
    offload = activation_offload_of(model)
    assert offload.prefetch_layers == 1
    hidden = torch.zeros(2, requires_grad=True) * 1.0
    offload.prefetch_hook(hidden, 3)
    offload.layers = {1: [], 2: []}
    fetched = []
    offload._prefetch = fetched.extend
    hidden.sum().backward()
    assert fetched == [2]  # layer 3's backward brings back only layer 2
    offload.offloaded_bytes = -1  # a training forward would reset it
    with torch.no_grad():
        model(**batch)
    model.eval()
    model(**batch)
    assert offload.offloaded_bytes == -1 and activation_offload_of(model) is offload


def test_offload_keeps_parameters_and_small_tensors_in_place():
    weight = nn.Parameter(torch.randn(8, 8))
    small = torch.randn(4, requires_grad=True)

    def loss_of(offload: ActivationOffload | None) -> torch.Tensor:
        with offload.layer(0) if offload else contextlib.nullcontext():
            rows = (small * 2).repeat(8).view(4, 8)
            return ((rows @ weight.t()) ** 2).sum() + (small * small).sum()

    expected = torch.autograd.grad(loss_of(None), (small, weight))
    offload = ActivationOffload(torch.device("cpu"), min_bytes=64)
    loss = loss_of(offload)
    # Offloaded: the matmul's input and the square's input (4x8 floats each). Kept: the weight
    # (a parameter, saved transposed) and `small` (16 bytes, under the threshold).
    assert len(offload.layers[0]) == 2 and offload.offloaded_bytes == 2 * 4 * 8 * 4
    got = torch.autograd.grad(loss, (small, weight))
    assert offload.late_fetches == 2  # no later layer's hook prefetched them: fetched on demand
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_top_k_ties_break_towards_lower_document_id():
    # Two examples packed in one row: three documents, then two.
    doc_ids = torch.tensor([[1, 1, 2, 2, 3, 3, 0, 0, 1, 2, 2, 0]])
    example_ids = torch.tensor([[0] * 8 + [1] * 4])
    layout = build_packed_layout(doc_ids, chunk_size=2, query_position_offset=0, example_ids=example_ids)
    doc_scores = torch.tensor([0.5, 0.5, 0.5, -0.25, -0.25])
    ranks = rank_documents(doc_scores, layout)
    assert ranks.tolist() == [0, 1, 2, 0, 1]
    assert select_documents(ranks, 2).tolist() == [True, True, False, True, True]
    # A strictly higher later document still wins.
    doc_scores[2] = 0.75
    assert rank_documents(doc_scores, layout).tolist() == [1, 2, 0, 0, 1]


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "doc_ids, message",
    [
        ([[1, 1, 2, 2, -1]], "no query tokens"),
        ([[1, 1, 2, 1, 0]], "not contiguous"),
        ([[2, 2, 1, 1, 0]], "must increase"),
        ([[1, 1, 0, 2, 0]], "out of order"),
        ([[0, -2, 1, 0, 0]], "out of order"),
        ([[1, 1, -1, 0, 0]], "padding must come at the end"),
        ([[1, 1, 0, 0, -5]], "doc_ids must be"),
    ],
)
def test_malformed_rows_raise_value_error(doc_ids, message):
    model = tiny_msa(0)
    doc_ids = torch.tensor(doc_ids)
    with pytest.raises(ValueError, match=message):
        model(torch.ones_like(doc_ids), doc_ids=doc_ids)


def test_mismatched_shapes_raise_value_error():
    model = tiny_msa(0)
    input_ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="doc_ids has shape"):
        model(input_ids, doc_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels has shape"):
        model(input_ids, doc_ids=torch.zeros(1, 6, dtype=torch.long), labels=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, row_length\]"):
        model(torch.ones(6, dtype=torch.long))
    with pytest.raises(ValueError, match="unexpected arguments"):
        model(input_ids, doc_idz=torch.zeros(1, 6, dtype=torch.long))


def test_example_without_routing_tokens_is_rejected():
    model = tiny_msa(0)
    doc_ids = torch.tensor([[1, 1, 0, 0]])
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(ValueError, match="no routing tokens"):
        model(input_ids, doc_ids=doc_ids, labels=input_ids.clone())


def test_bad_aux_labels_raise_value_error():
    doc_ids = torch.tensor([[1, 1, 2, 0]])
    for aux, message in (([[1, 0, 0, 0]], "constant over each document"), ([[0, 0, 0, 1]], "0 outside documents")):
        with pytest.raises(ValueError, match=message):
            build_packed_layout(doc_ids, chunk_size=2, query_position_offset=0, aux_labels=torch.tensor(aux))


@pytest.mark.parametrize(
    "field, value",
    [
        ("top_k_docs", 0),
        ("chunk_size", 0),
        ("chunk_size", -3),
        ("aux_loss_type", "contrastive"),
        ("router_layers", [9]),
    ],
)
def test_bad_config_raises_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        MSAConfig(num_hidden_layers=4, **{field: value})


def test_misspelt_msa_setting_is_rejected_but_backbone_extras_are_kept():
    with pytest.raises(ValueError, match="did you mean 'top_k_docs'"):
        MSAConfig(num_hidden_layers=4, top_k_doc=8)
    config = MSAConfig(num_hidden_layers=4, quantization_note="kept")
    assert config.quantization_note == "kept"


def test_compiled_dense_blocks_match_eager_and_keep_parameter_names():
    batch = random_packed_batch(3)
    eager = tiny_msa(3).train()
    compiled = tiny_msa(3).train()
    apply_activation_checkpointing(eager, layers=1)
    # Selective checkpointing around compiled blocks too.
    apply_activation_checkpointing(compiled, layers=1, keep_attention_layers=1)
    apply_compile(compiled)
    losses = []
    for model in (eager, compiled):
        out = model(**batch)
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), (other_name, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert name == other_name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    assert list(eager.state_dict()) == list(compiled.state_dict())


def test_model_forward_is_a_plain_loop_without_execution_policy():
    source = inspect.getsource(MSAModel.forward).lower()
    for word in ("checkpoint", "offload", "compile"):
        assert word not in source, word


def test_wrapped_layers_keep_parameter_names_state_dict_and_module_moves():
    plain = tiny_msa(17)
    wrapped = tiny_msa(17)
    apply_activation_checkpointing(wrapped, layers=2, start=1, keep_attention_layers=1)
    apply_activation_offload(wrapped, layers=1)
    assert [type(layer).__name__ for layer in wrapped.model.layers[:4]] == [
        "OffloadedLayer",
        "CheckpointedLayer",
        "CheckpointedLayer",
        "MSADecoderLayer",
    ]
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [name for name, _ in wrapped.named_parameters()] == [name for name, _ in plain.named_parameters()]
    # The wrapper's parameters are the layer's own tensors, and module-wide moves reach them.
    inner = decoder_layer(wrapped.model.layers[1])
    assert wrapped.model.layers[1].self_attn is inner.self_attn
    wrapped.to(torch.float64).eval()
    assert inner.self_attn.q_proj.weight.dtype == torch.float64 and not inner.training
    assert not inner.self_attn.training
    plain.load_state_dict({k: v.float() for k, v in wrapped.state_dict().items()}, strict=True)


def test_layers_take_one_execution_policy_within_the_model():
    model = tiny_msa(18)
    apply_activation_checkpointing(model, layers=1)
    with pytest.raises(ValueError, match="already wrapped"):
        apply_activation_offload(model, layers=1)
    layers = len(model.model.layers)
    with pytest.raises(ValueError, match=f"the model has {layers} layers"):
        apply_activation_checkpointing(model, layers=layers, start=1)
    with pytest.raises(ValueError, match="keep_attention_layers=3"):
        apply_activation_checkpointing(model, layers=2, start=1, keep_attention_layers=3)


def test_compile_leaves_module_hooks_outside_the_compiled_code() -> None:
    """DeepSpeed ZeRO-3 hooks the final norm as a module of its own; `apply_compile` must not trace
    such hooks (dynamo traced ZeRO-3's parameter release through `nn.Module.compile`)."""
    model = tiny_msa(16).train()
    apply_compile(model)
    seen = []
    norms = [model.model.norm] + [decoder_layer(layer).input_layernorm for layer in model.model.layers]
    for norm in norms:
        norm.register_forward_pre_hook(lambda module, args: seen.append(torch.compiler.is_compiling()))
        norm.register_forward_hook(lambda module, args, out: seen.append(torch.compiler.is_compiling()))
    batch = random_packed_batch(16)
    model(**batch).loss.backward()
    assert len(seen) == 2 * len(norms)
    assert not any(seen)
