"""The varlen backends' key handling, checked on CPU with loop-per-segment kernels.

The real kernels (flash-attn, ATen's flash kernels, FlexAttention) need CUDA; the key
regrouping, the two-call split and the bottom-right causal convention they rely on are the
same for all of them, so slow kernels with that convention prove the plumbing here. The GPU
kernels themselves are checked by `eval/check_backends.py` on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from batches import random_packed_batch, tiny_msa

from msa_modeling.attention import (
    QueryContextVarlenBackend,
    VarlenBackend,
    VarlenKernelOps,
    make_attention_backend,
    query_context_keys,
    varlen_key_order,
)
from msa_modeling.execution import apply_activation_checkpointing


class _LoopVarlen(torch.autograd.Function):
    """Like the real kernels, leaves rows outside every segment unwritten in backward (NaN here)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = _loop_varlen(*inputs, cu_q, cu_k, max_q, max_k, scale)
        ctx.save_for_backward(*inputs, out, cu_k)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, cu_k = ctx.saved_tensors
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad, allow_unused=True)
        end = int(cu_k[-1])
        dk, dv = dk.clone(), dv.clone()
        dk[end:], dv[end:] = float("nan"), float("nan")
        return dq, dk, dv, None, None, None, None, None


def loop_varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    return _LoopVarlen.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def _loop_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """Causal varlen attention, bottom-right aligned, one SDPA call per segment."""
    out = torch.zeros_like(q)
    for s in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        lq, lk = q1 - q0, k1 - k0
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        out[q0:q1] = F.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),
            k[k0:k1].transpose(0, 1),
            v[k0:k1].transpose(0, 1),
            attn_mask=visible,
            scale=scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out


def _segment_scores(q, k, scale, lq, lk):
    """fp32 scores [H, lq, lk] with GQA and the bottom-right causal mask, as the flash kernels."""
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(group, dim=1)) * scale
    visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    return scores.masked_fill(~visible, float("-inf"))


def _reference_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
    """FlashAttention's forward math per segment: the output and the log-sum-exp [H, Nq]."""
    out, lse = torch.zeros_like(q), torch.full((q.shape[1], q.shape[0]), float("inf"))
    group = q.shape[1] // k.shape[1]
    for s in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        assert q1 - q0 <= max_q and k1 - k0 <= max_k
        if q1 == q0 or k1 == k0:
            continue
        scores = _segment_scores(q[q0:q1], k[k0:k1], scale, q1 - q0, k1 - k0)
        lse[:, q0:q1] = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[:, q0:q1, None])
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v[k0:k1].float().repeat_interleave(group, dim=1)).to(q.dtype)
    return out, (lse,)


def _reference_flash_backward(grad_out, q, k, v, out, state, cu_q, cu_k, max_q, max_k, scale):
    """FlashAttention's backward math: probabilities from the saved log-sum-exp and D = rowsum(dO * O)
    from the saved output, as the real kernels compute them. dK/dV rows outside every segment are
    left unwritten (NaN here), as the real kernels leave them."""
    (lse,) = state
    group = q.shape[1] // k.shape[1]
    dq = torch.zeros_like(q)
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    for s in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if k1 == k0:
            continue
        dk[k0:k1], dv[k0:k1] = 0.0, 0.0
        if q1 == q0:
            continue
        scores = _segment_scores(q[q0:q1], k[k0:k1], scale, q1 - q0, k1 - k0)
        probs = torch.exp(scores - lse[:, q0:q1, None])
        d_out = grad_out[q0:q1].float()
        delta = (d_out * out[q0:q1].float()).sum(-1).transpose(0, 1)  # [H, lq]
        d_probs = torch.einsum("qhd,khd->hqk", d_out, v[k0:k1].float().repeat_interleave(group, dim=1))
        d_scores = probs * (d_probs - delta[..., None])
        grouped = lambda x: x.unflatten(1, (-1, group)).sum(2)  # noqa: E731  [lk, H, D] -> [lk, Hkv, D]
        dq[q0:q1] = (
            torch.einsum("hqk,khd->qhd", d_scores, k[k0:k1].float().repeat_interleave(group, dim=1)) * scale
        ).to(q.dtype)
        dk[k0:k1] = grouped(torch.einsum("hqk,qhd->khd", d_scores, q[q0:q1].float()) * scale).to(k.dtype)
        dv[k0:k1] = grouped(torch.einsum("hqk,qhd->khd", probs, d_out)).to(v.dtype)
    return dq, dk, dv


REFERENCE_FLASH_OPS = VarlenKernelOps(forward=_reference_flash_forward, backward=_reference_flash_backward)


def run_with_backend(model, backend, batch):
    model.model._attention_backends = {"cpu": backend}
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_hidden_states=True, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


VARLEN_BACKENDS = {
    "one_call_regrouped": lambda: VarlenBackend("loop", loop_varlen_kernel),
    "two_calls": lambda: QueryContextVarlenBackend("reference", REFERENCE_FLASH_OPS),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend_name", sorted(VARLEN_BACKENDS))
def test_varlen_backends_match_masked_sdpa(seed, backend_name):
    model = tiny_msa(seed, chunk_size=3).train()
    batch = random_packed_batch(seed, batch_size=2, examples_per_row=2)
    dense, dense_grads = run_with_backend(model, make_attention_backend("sdpa", torch.device("cpu")), batch)
    varlen, varlen_grads = run_with_backend(model, VARLEN_BACKENDS[backend_name](), batch)
    real = batch["doc_ids"] != -1
    for h_dense, h_varlen in zip(dense.hidden_states, varlen.hidden_states, strict=True):
        torch.testing.assert_close(h_varlen[real], h_dense[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(dense.selected_docs, varlen.selected_docs)
    torch.testing.assert_close(varlen.loss, dense.loss)
    for name, grad in dense_grads.items():
        assert torch.isfinite(varlen_grads[name]).all(), name
        torch.testing.assert_close(varlen_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_two_call_varlen_under_selective_checkpointing_keeps_the_same_gradients(monkeypatch):
    """The kernel output that call 2 rewrites in place is what a selective-checkpoint cache hands
    back on recomputation; rewriting it again must give the same gradients as no cache."""
    import msa_modeling.attention as attention

    @torch.library.custom_op("msa_test::reference_flash_forward", mutates_args=())
    def cached_forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, (lse,) = _reference_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        return out, lse

    def forward(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        out, lse = cached_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        return out, (lse,)

    monkeypatch.setattr(
        attention, "ATTENTION_KERNEL_OPS", attention.ATTENTION_KERNEL_OPS | {"msa_test::reference_flash_forward"}
    )
    backend = QueryContextVarlenBackend(
        "reference", VarlenKernelOps(forward=forward, backward=_reference_flash_backward)
    )
    batch = random_packed_batch(3, batch_size=2, examples_per_row=2)
    grads = []
    for saved in (0, len(tiny_msa(3).model.layers)):
        model = tiny_msa(3, chunk_size=2).train()
        apply_activation_checkpointing(model, keep_attention_layers=saved)
        grads.append(run_with_backend(model, backend, batch)[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_query_context_keys_hold_prefix_chunks_then_query_per_example():
    model = tiny_msa(0, chunk_size=2)
    doc_ids = torch.tensor([[-2, -2, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0]])
    example_ids = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    layout = model.build_layout(doc_ids, example_ids=example_ids)
    assert layout.query_token_index.tolist() == [5, 6, 9, 10, 11] and layout.max_query_length == 3
    # Sources: prefix tokens 0-1 (0, 1); query tokens 5, 6, 9, 10, 11 (2-6); chunks (7-9):
    # example 0's doc (tokens 2-3, token 4), example 1's doc (tokens 7-8).
    keys = query_context_keys(layout, torch.tensor([True, False, True]))
    segments = [keys.order[int(a) : int(b)].tolist() for a, b in zip(keys.cu_seqlens[:-1], keys.cu_seqlens[1:])]
    assert segments == [[0, 1, 7, 2, 3], [9, 4, 5, 6]]
    assert keys.order[int(keys.cu_seqlens[-1]) :].tolist() == [8]
    assert keys.cu_queries.tolist() == [0, 2, 5]
    assert torch.equal(keys.order[keys.inverse], torch.arange(keys.order.numel()))


def test_key_order_puts_prefix_chunks_then_query_and_drops_unselected_chunks():
    model = tiny_msa(0, chunk_size=2)
    doc_ids = torch.tensor([[-2, -2, 1, 1, 1, 2, 2, 0, 0, 0]])
    layout = model.build_layout(doc_ids)
    # Tokens 0-9; prefix copies 10-11; chunks 12 (doc 1: tokens 2-3), 13 (doc 1: 4), 14 (doc 2).
    keys = varlen_key_order(layout, torch.tensor([True, True, False]))
    segments = [keys.order[int(a) : int(b)].tolist() for a, b in zip(keys.cu_seqlens[:-1], keys.cu_seqlens[1:])]
    assert segments == [[0, 1], [2, 3, 4], [5, 6], [10, 11, 12, 13, 7, 8, 9]]
    assert keys.order[int(keys.cu_seqlens[-1]) :].tolist() == [14]
    assert layout.cu_seqlens.tolist() == [0, 2, 5, 7, 10]


def test_backend_choice():
    cpu = torch.device("cpu")
    assert make_attention_backend("auto", cpu).name == "sdpa"
    # torch's varlen kernels are the two-call backend (they need CUDA to run, not to be chosen).
    assert isinstance(make_attention_backend("varlen", cpu), QueryContextVarlenBackend)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        make_attention_backend("xformers", cpu)
