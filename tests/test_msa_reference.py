"""Self-checks of the slow MSA reference (tests/msa_reference.py).

The reference must be trustworthy before it can judge the fast model, so it is
checked here against plain HF Qwen3 wherever MSA reduces to ordinary causal
attention, and against hand-computed numbers for routing and the aux loss.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msa_reference import (  # noqa: E402
    ReferenceOutput,
    chunk_means,
    reference_forward,
    select_top_docs,
)

VOCAB = 128


class MSAStandIn(nn.Module):
    """Minimal object with the MSA model's naming contract, over a HF Qwen3."""

    def __init__(self, hf: Qwen3ForCausalLM, **msa_fields: object) -> None:
        super().__init__()
        self.model = hf.model
        self.lm_head = hf.lm_head
        # A copy, so that the MSA fields never leak into the HF model's config.
        self.config = copy.deepcopy(hf.config)
        defaults = dict(
            router_layers=[2, 3],
            top_k_docs=2,
            chunk_size=2,
            routing_tokens="prompt",
            query_position_offset=2,
            document_positions=True,
            aux_loss_type="decoupled_infonce",
            aux_temperature=0.1,
        )
        defaults.update(msa_fields)
        for name, value in defaults.items():
            setattr(self.config, name, value)
        c = self.config
        for i in c.router_layers:
            attn = self.model.layers[i].self_attn
            attn.router_q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
            attn.router_k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)


def make_hf(
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = VOCAB,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    model = Qwen3ForCausalLM(cfg).eval()
    # HF initialises norms to ones; random scales make the plumbing checks stricter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_run(
    hf: Qwen3ForCausalLM, ids: list[int], position_ids: list[int] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """HF Qwen3 on one unpadded sequence: per-layer outputs (before the final
    norm; HF's own hidden_states tuple puts the normed state last) and logits."""
    captured: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in hf.model.layers]
    inp = torch.tensor([ids])
    kwargs = {}
    if position_ids is not None:
        kwargs["position_ids"] = torch.tensor([position_ids])
        # An explicit all-ones mask stops HF from reading a position jump as a
        # packed-sequence boundary.
        kwargs["attention_mask"] = torch.ones_like(inp)
    with torch.no_grad():
        out = hf(inp, **kwargs)
        embeds = hf.model.embed_tokens(inp)
    for h in hooks:
        h.remove()
    return [embeds[0]] + [c[0] for c in captured], out.logits[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build_row(segments: list[tuple[int, int, list[int]]], length: int) -> tuple[list[int], list[int], list[int]]:
    """segments: (example_id, doc_id, token ids) in order; the row is right-padded."""
    ids, docs, exs = [], [], []
    for ex, doc, toks in segments:
        ids += toks
        docs += [doc] * len(toks)
        exs += [ex] * len(toks)
    pad = length - len(ids)
    return ids + [0] * pad, docs + [-1] * pad, exs + [-1] * pad


def rand_tokens(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


# ----------------------------------------------------------------------------
# (1) query tokens only: MSA == plain Qwen3 (RoPE is relative, so the offset
#     must not matter)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 7])
def test_query_only_matches_qwen3(offset: int) -> None:
    hf = make_hf()
    model = MSAStandIn(hf, query_position_offset=offset)
    gen = torch.Generator().manual_seed(1)
    row0 = rand_tokens(12, gen)
    row1 = rand_tokens(9, gen)
    input_ids = torch.tensor([row0, row1 + [0] * 3])
    doc_ids = torch.tensor([[0] * 12, [0] * 9 + [-1] * 3])
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = 5  # labels on padding must be ignored

    with torch.no_grad():
        out = reference_forward(model, input_ids, doc_ids, labels=labels)
    assert isinstance(out, ReferenceOutput)
    assert len(out.hidden_states) == 5
    assert out.doc_scores.shape == (2, 0) and out.selected_docs.shape == (2, 0)
    assert out.aux_loss is None and out.recall == {}

    expected_ce = []
    for r, toks in enumerate([row0, row1]):
        layers, logits = hf_run(hf, toks)
        n = len(toks)
        assert rel_err(out.logits[r, :n], logits) < 1e-5
        for i in range(5):
            assert rel_err(out.hidden_states[i][r, :n], layers[i]) < 1e-5
        tgt = labels[r, 1:n]
        expected_ce.append(nn.functional.cross_entropy(logits[:-1], tgt, reduction="none")[tgt != -100])
    expected = torch.cat(expected_ce).mean()
    assert abs(out.lm_loss.item() - expected.item()) < 1e-5 * float(expected)


# ----------------------------------------------------------------------------
# (2) prefix + query, no documents: positions 0..T-1 then T+offset+j
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("document_positions", [True, False])
def test_prefix_and_query_match_qwen3_with_offset_positions(document_positions: bool) -> None:
    hf = make_hf(seed=1)
    offset = 5
    model = MSAStandIn(hf, query_position_offset=offset, document_positions=document_positions)
    gen = torch.Generator().manual_seed(2)
    # Row 0: two packed examples; row 1: one example, example_ids left implicit
    # in the second call.
    ex_a = (rand_tokens(3, gen), rand_tokens(5, gen))
    ex_b = (rand_tokens(2, gen), rand_tokens(4, gen))
    ex_c = (rand_tokens(4, gen), rand_tokens(6, gen))
    length = 16
    r0 = build_row([(0, -2, ex_a[0]), (0, 0, ex_a[1]), (1, -2, ex_b[0]), (1, 0, ex_b[1])], length)
    r1 = build_row([(0, -2, ex_c[0]), (0, 0, ex_c[1])], length)
    input_ids = torch.tensor([r0[0], r1[0]])
    doc_ids = torch.tensor([r0[1], r1[1]])
    example_ids = torch.tensor([r0[2], r1[2]])

    with torch.no_grad():
        out = reference_forward(model, input_ids, doc_ids, example_ids=example_ids)
        out_implicit = reference_forward(model, input_ids[1:], doc_ids[1:])

    cases = [(0, 0, ex_a), (0, 8, ex_b), (1, 0, ex_c)]
    for row, start, (prefix, query) in cases:
        t = len(prefix)
        if document_positions:
            positions = list(range(t)) + [t + offset + j for j in range(len(query))]
        else:
            positions = list(range(t + len(query)))
        layers, logits = hf_run(hf, prefix + query, positions)
        n = t + len(query)
        assert rel_err(out.logits[row, start : start + n], logits) < 1e-5
        for i in range(5):
            assert rel_err(out.hidden_states[i][row, start : start + n], layers[i]) < 1e-5
    n = len(ex_c[0]) + len(ex_c[1])
    assert rel_err(out_implicit.logits[0, :n], out.logits[1, :n]) < 1e-6


# ----------------------------------------------------------------------------
# (3) documents are encoded alone, with their own positions, in every layer
# ----------------------------------------------------------------------------


def _doc_batch(gen: torch.Generator):
    length = 40
    docs0 = [rand_tokens(n, gen) for n in (4, 5, 3)]
    docs1a = [rand_tokens(n, gen) for n in (3, 6)]
    docs1b = [rand_tokens(n, gen) for n in (2,)]
    pre0, q0 = rand_tokens(3, gen), rand_tokens(6, gen)
    pre1a, q1a = rand_tokens(2, gen), rand_tokens(4, gen)
    q1b = rand_tokens(5, gen)
    seg0 = [(0, -2, pre0)] + [(0, i + 1, d) for i, d in enumerate(docs0)] + [(0, 0, q0)]
    seg1 = (
        [(0, -2, pre1a)]
        + [(0, i + 1, d) for i, d in enumerate(docs1a)]
        + [(0, 0, q1a)]
        + [(1, i + 1, d) for i, d in enumerate(docs1b)]
        + [(1, 0, q1b)]
    )
    r0 = build_row(seg0, length)
    r1 = build_row(seg1, length)
    input_ids = torch.tensor([r0[0], r1[0]])
    doc_ids = torch.tensor([r0[1], r1[1]])
    example_ids = torch.tensor([r0[2], r1[2]])
    return input_ids, doc_ids, example_ids, (pre0, docs0, q0), (pre1a, docs1a, q1a), ([], docs1b, q1b)


def test_documents_match_qwen3_alone_in_every_layer() -> None:
    hf = make_hf(seed=2)
    model = MSAStandIn(hf, top_k_docs=2, chunk_size=2)
    gen = torch.Generator().manual_seed(3)
    input_ids, doc_ids, example_ids, *_ = _doc_batch(gen)
    # Query tokens are labelled except the first two of each example (the prompt).
    labels = torch.full_like(input_ids, -100)
    for row in range(2):
        seen: dict[int, int] = {}
        for col in range(input_ids.shape[1]):
            if int(doc_ids[row, col]) != 0:
                continue
            ex = int(example_ids[row, col])
            seen[ex] = seen.get(ex, 0) + 1
            if seen[ex] > 2:
                labels[row, col] = input_ids[row, col]

    with torch.no_grad():
        out = reference_forward(model, input_ids, doc_ids, example_ids=example_ids, labels=labels)

    checked = 0
    for row in range(2):
        for ex in example_ids[row].unique().tolist():
            if ex < 0:
                continue
            for d in doc_ids[row][example_ids[row] == ex].unique().tolist():
                if d <= 0:
                    continue
                cols = ((doc_ids[row] == d) & (example_ids[row] == ex)).nonzero().flatten()
                layers, _ = hf_run(hf, input_ids[row, cols].tolist())
                for i in range(5):
                    assert rel_err(out.hidden_states[i][row, cols], layers[i]) < 1e-5
                checked += 1
    assert checked == 6
    # Documents numbered row-major, example by example: 3 + 2 + 1.
    assert out.doc_scores.shape == (2, 6)
    per_example = [(0, 3), (3, 5), (5, 6)]
    for layer in range(2):
        for lo, hi in per_example:
            assert int(out.selected_docs[layer, lo:hi].sum()) == min(2, hi - lo)
            # Selected docs are exactly the top-scored ones of their example.
            chosen = select_top_docs(out.doc_scores[layer, lo:hi].tolist(), 2)
            assert out.selected_docs[layer, lo:hi].nonzero().flatten().tolist() == chosen
    assert out.lm_loss is not None and torch.isfinite(out.lm_loss)


def test_unselected_memory_is_invisible() -> None:
    """With top_k_docs = 0 the query sees no memory in any layer, so prefix and
    query must match Qwen3 run on them alone (positions as in test 2)."""
    hf = make_hf(seed=3)
    offset = 3
    model = MSAStandIn(hf, top_k_docs=0, query_position_offset=offset)
    gen = torch.Generator().manual_seed(4)
    input_ids, doc_ids, example_ids, ex0, ex1a, ex1b = _doc_batch(gen)
    with torch.no_grad():
        out = reference_forward(model, input_ids, doc_ids, example_ids=example_ids)
    assert not out.selected_docs.any()

    starts = [(0, 0, ex0), (1, 0, ex1a), (1, 2 + 3 + 6 + 4, ex1b)]
    for row, start, (prefix, docs, query) in starts:
        t = len(prefix)
        layers, logits = hf_run(hf, prefix + query, list(range(t)) + [t + offset + j for j in range(len(query))])
        q_start = start + t + sum(len(d) for d in docs)
        q_cols = list(range(q_start, q_start + len(query)))
        assert rel_err(out.logits[row, q_cols], logits[t:]) < 1e-5
        if t:
            assert rel_err(out.logits[row, start : start + t], logits[:t]) < 1e-5


def test_selected_memory_with_unit_chunks_matches_concatenation() -> None:
    """One router layer (the only layer), chunk_size 1, one selected document, no
    prefix: the query reads the document's own K/V at positions 0..n-1 and sits
    at n + j, which is exactly Qwen3 on [document ; query]."""
    hf = make_hf(layers=1, seed=4)
    gen = torch.Generator().manual_seed(5)
    doc, query = rand_tokens(5, gen), rand_tokens(4, gen)
    model = MSAStandIn(hf, router_layers=[0], top_k_docs=1, chunk_size=1, query_position_offset=len(doc))
    input_ids = torch.tensor([doc + query])
    doc_ids = torch.tensor([[1] * 5 + [0] * 4])
    with torch.no_grad():
        out = reference_forward(model, input_ids, doc_ids)
    assert out.selected_docs.tolist() == [[True]]
    layers, logits = hf_run(hf, doc + query)
    assert rel_err(out.logits[0], logits) < 1e-5
    assert rel_err(out.hidden_states[1][0], layers[1]) < 1e-5


# ----------------------------------------------------------------------------
# (4) hand-computed routing, tie-breaking, aux loss and recall
# ----------------------------------------------------------------------------


def _scoring_model(hidden: int, heads: int, kv_heads: int, head_dim: int, embeds: list[list[float]], **msa):
    hf = make_hf(hidden=hidden, layers=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=8, seed=5)
    model = MSAStandIn(hf, router_layers=[0], **msa)
    with torch.no_grad():
        # Unit-RMS embeddings and a unit input norm make X equal (up to one
        # common factor) to the embedding, so cosines can be worked out by hand.
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        for i, e in enumerate(embeds):
            model.model.embed_tokens.weight[i] = torch.tensor(e)
    return model


def test_chunk_means_average_the_short_last_chunk_over_its_real_tokens() -> None:
    x = torch.arange(10.0).reshape(5, 2)
    means = chunk_means(x, 2)
    assert [m.tolist() for m in means] == [[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]


def test_select_top_docs_ties_go_to_lower_id() -> None:
    assert select_top_docs([0.5, 0.9, 0.5, 0.5], 2) == [0, 1]
    assert select_top_docs([0.5, 0.5], 5) == [0, 1]
    assert select_top_docs([0.1, 0.3, 0.2], 0) == []


A, B, C, D = 0, 1, 2, 3  # token ids with one-hot unit-RMS embeddings
R = 1 / math.sqrt(2)


@pytest.mark.parametrize("routing_tokens", ["prompt", "query"])
def test_hand_scores_ties_aux_and_recall(routing_tokens: str) -> None:
    embeds = [[2.0 if j == i else 0.0 for j in range(4)] for i in range(4)]
    model = _scoring_model(4, 1, 1, 4, embeds, top_k_docs=2, chunk_size=2, routing_tokens=routing_tokens)
    with torch.no_grad():
        model.model.layers[0].self_attn.router_q_proj.weight.copy_(torch.eye(4))
        model.model.layers[0].self_attn.router_k_proj.weight.copy_(torch.eye(4))

    # Example 0: prefix [5], d1=[a,b], d2=[c,a,a], d3=[b,a], d4=[c,d,c],
    # query [a, d, a] where only the first a is prompt (unlabelled).
    # Example 1 (no positives): d1=[a], query [c].
    segs = [
        (0, -2, [5]),
        (0, 1, [A, B]),
        (0, 2, [C, A, A]),
        (0, 3, [B, A]),
        (0, 4, [C, D, C]),
        (0, 0, [A, D, A]),
        (1, 1, [A]),
        (1, 0, [C]),
    ]
    ids, docs, exs = build_row(segs, 20)
    input_ids, doc_ids, example_ids = torch.tensor([ids]), torch.tensor([docs]), torch.tensor([exs])
    labels = torch.full_like(input_ids, -100)
    labels[0, 12] = D
    labels[0, 13] = A
    aux_labels = torch.zeros_like(input_ids)
    aux_labels[0, 1:3] = 1  # d1
    aux_labels[0, 8:11] = 1  # d4

    out = reference_forward(model, input_ids, doc_ids, example_ids, labels=labels, aux_labels=aux_labels)

    # d1: mean(a,b) -> cos R with a.  d2: chunks [c,a] -> R, [a] -> 1.
    # d3: [b,a] -> R (exact tie with d1).  d4: [c,d],[c] -> 0 for a; with d
    # routing too ("query" mode) [c,d] gives R.  Example 1: [a] vs c -> 0.
    d4 = 0.0 if routing_tokens == "prompt" else R
    expected = torch.tensor([[R, 1.0, R, d4, 0.0]])
    assert torch.allclose(out.doc_scores.detach(), expected, atol=1e-6)
    # Top-2 of example 0: d2, then the d1/d3(/d4) tie goes to d1.
    assert out.selected_docs.tolist() == [[True, True, False, False, True]]

    tau = 0.1
    s = [R, 1.0, R, d4]
    pos, neg = [0, 3], [1, 2]
    decoupled = -sum(
        s[i] / tau - math.log(math.exp(s[i] / tau) + sum(math.exp(s[j] / tau) for j in neg)) for i in pos
    ) / len(pos)
    assert abs(out.aux_loss.item() - decoupled) < 1e-5
    # Recall: top-1 = {d2} finds no positive; top-5/10 cover all four docs.
    assert out.recall[1].tolist() == [0.0]
    assert out.recall[5].tolist() == [1.0]
    assert out.recall[10].tolist() == [1.0]

    model.config.aux_loss_type = "infonce"
    out_nce = reference_forward(model, input_ids, doc_ids, example_ids, labels=labels, aux_labels=aux_labels)
    log_z = math.log(sum(math.exp(x / tau) for x in s))
    infonce = -sum(s[i] / tau - log_z for i in pos) / len(pos)
    assert abs(out_nce.aux_loss.item() - infonce) < 1e-5

    model.config.top_k_docs = 1
    with torch.no_grad():
        out_top1 = reference_forward(model, input_ids, doc_ids, example_ids, labels=labels)
    assert out_top1.selected_docs.tolist() == [[False, True, False, False, True]]
    assert out_top1.aux_loss is None and out_top1.recall == {}

    # The aux loss trains the router (and, through it, the backbone).
    out.aux_loss.backward()
    assert model.model.layers[0].self_attn.router_q_proj.weight.grad.abs().sum() > 0


def test_hand_scores_scaled_dot() -> None:
    """routing_score="scaled_dot": mean over heads of <Q_R, K̄R> / sqrt(D), no normalisation.

    One head, D = 4, embeddings 2 * one-hot (unit RMS), identity router projections: the
    routing query is a = (2,0,0,0) and a chunk's key is the mean of its tokens' embeddings.
    """
    embeds = [[2.0 if j == i else 0.0 for j in range(4)] for i in range(4)]
    model = _scoring_model(4, 1, 1, 4, embeds, top_k_docs=2, chunk_size=2, routing_score="scaled_dot")
    with torch.no_grad():
        model.model.layers[0].self_attn.router_q_proj.weight.copy_(torch.eye(4))
        model.model.layers[0].self_attn.router_k_proj.weight.copy_(torch.eye(4))
    segs = [(0, -2, [5]), (0, 1, [A, B]), (0, 2, [C, A, A]), (0, 3, [B, A, A, A]), (0, 4, [C, D]), (0, 0, [A])]
    ids, docs, _ = build_row(segs, 16)
    with torch.no_grad():
        out = reference_forward(model, torch.tensor([ids]), torch.tensor([docs]))
    # d1: <a, (1,1,0,0)> / 2 = 1.  d2: chunks [c,a] -> 1, [a] -> <a, a> / 2 = 2.
    # d3: chunks [b,a] -> 1, [a,a] -> 2 (cosine would tie d2 at 1).  d4: [c,d] -> 0.
    expected = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert torch.allclose(out.doc_scores, expected, atol=1e-5)
    assert out.selected_docs.tolist() == [[False, True, True, False]]


def test_hand_scores_gqa_head_mapping_and_zero_norm() -> None:
    """H=4 query heads over Hkv=2 groups: heads 0,1 read KV head 0 and heads 2,3
    read KV head 1 (h // 2, not h % 2)."""
    s2 = math.sqrt(2)
    q = [s2, 0, s2, 0, 0, s2, 0, s2]  # query heads: (1,0) (1,0) (0,1) (0,1)
    u = [2, 0, 0, 0, 0, 2, 0, 0]  # KV heads: (1,0) (0,1) -> all four cos 1
    w = [0, 2, 0, 0, 2, 0, 0, 0]  # KV heads: (0,1) (1,0) -> all cos 0 (h%2 would give 0.5)
    z = [0, 0, 2, 0, 0, 0, 2, 0]  # KV heads both zero -> normalised to 0 -> 0
    y = [2, 0, 0, 0, 2, 0, 0, 0]  # KV heads (1,0) (1,0) -> heads 0,1 cos 1, heads 2,3 cos 0
    embeds = [[float(v) for v in e] for e in (q, u, w, z, y)]
    model = _scoring_model(8, 4, 2, 2, embeds, top_k_docs=1, chunk_size=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.router_q_proj.weight.copy_(torch.eye(8))
        model.model.layers[0].self_attn.router_k_proj.weight.copy_(torch.eye(8)[[0, 1, 4, 5]])
    Q, U, W, Z, Y = range(5)
    segs = [(0, 1, [U]), (0, 2, [W]), (0, 3, [Z]), (0, 4, [Y]), (0, 5, [W, W, U]), (0, 0, [Q])]
    ids, docs, _ = build_row(segs, 9)
    with torch.no_grad():
        out = reference_forward(model, torch.tensor([ids]), torch.tensor([docs]))
    expected = torch.tensor([[1.0, 0.0, 0.0, 0.5, 1.0]])
    assert torch.allclose(out.doc_scores, expected, atol=1e-6)
    assert out.selected_docs.tolist() == [[True, False, False, False, False]]


# ----------------------------------------------------------------------------
# Gradient routes of spec section 3.6
# ----------------------------------------------------------------------------


def test_gradient_routes() -> None:
    hf = make_hf(seed=6)
    model = MSAStandIn(hf, top_k_docs=1, chunk_size=2)
    # Disjoint vocabularies per segment so embedding-row gradients tell which
    # segment a gradient came through.
    prefix = [1, 2]
    docs = [[10, 11, 12], [20, 21, 22, 23], [30, 31]]
    query = [40, 41, 42, 43, 44]
    segs = [(0, -2, prefix)] + [(0, i + 1, d) for i, d in enumerate(docs)] + [(0, 0, query)]
    ids, doc_col, _ = build_row(segs, 16)
    input_ids, doc_ids = torch.tensor([ids]), torch.tensor([doc_col])
    labels = torch.full_like(input_ids, -100)
    labels[0, -3:] = input_ids[0, -3:]
    aux_labels = torch.zeros_like(input_ids)
    aux_labels[0, 2:5] = 1

    out = reference_forward(model, input_ids, doc_ids, labels=labels, aux_labels=aux_labels)
    out.lm_loss.backward(retain_graph=True)
    router = [p for n, p in model.named_parameters() if "router_" in n]
    assert len(router) == 4
    # The LM loss never reaches the router projections (selection is hard).
    assert all(p.grad is None or not p.grad.any() for p in router)
    emb_grad = model.model.embed_tokens.weight.grad
    selected_any = out.selected_docs.any(dim=0).tolist()
    assert not all(selected_any)  # 2 router layers, top-1 of 3 docs
    for d, toks in enumerate(docs):
        reached = bool(emb_grad[toks].abs().sum() > 0)
        # LM loss reaches a document through lower layers iff it was selected.
        assert reached == selected_any[d]

    model.zero_grad(set_to_none=True)
    out.aux_loss.backward()
    assert all(p.grad is not None and p.grad.any() for p in router)
    # The aux loss flows through the router input into the backbone.
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
