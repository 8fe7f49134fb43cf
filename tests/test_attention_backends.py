"""The varlen backends' key regrouping, checked on CPU with a loop-per-segment kernel.

The real kernels (flash-attn, torch varlen_attn, FlexAttention) need CUDA; the
regrouping and the bottom-right causal convention they rely on are the same for all of
them, so a slow kernel with that convention proves the plumbing here. The GPU kernels
themselves are checked by `eval/check_backends.py` on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from batches import random_packed_batch, tiny_msa

from msa_modeling.attention import VarlenBackend, make_attention_backend, varlen_key_order


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
            q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1),
            attn_mask=visible, scale=scale, enable_gqa=True,
        ).transpose(0, 1)
    return out


def run_with_backend(model, backend, batch):
    model.model._attention_backends = {"cpu": backend}
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_hidden_states=True, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("seed", [0, 1])
def test_varlen_regrouping_matches_masked_sdpa(seed):
    model = tiny_msa(seed, chunk_size=3).train()
    batch = random_packed_batch(seed, batch_size=2, examples_per_row=2)
    dense, dense_grads = run_with_backend(model, make_attention_backend("sdpa", torch.device("cpu")), batch)
    backend = VarlenBackend("loop", loop_varlen_kernel)
    varlen, varlen_grads = run_with_backend(model, backend, batch)
    real = batch["doc_ids"] != -1
    for h_dense, h_varlen in zip(dense.hidden_states, varlen.hidden_states, strict=True):
        torch.testing.assert_close(h_varlen[real], h_dense[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(dense.selected_docs, varlen.selected_docs)
    torch.testing.assert_close(varlen.loss, dense.loss)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(varlen_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


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
    with pytest.raises(ValueError, match="attention backend must be one of"):
        make_attention_backend("xformers", cpu)
