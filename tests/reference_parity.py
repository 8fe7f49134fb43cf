"""The fast MSA forward against the loop-by-loop reference (`msa_reference.py`): hidden states,
logits, document scores, selections, losses, recall and gradients, in fp32."""

from __future__ import annotations

import torch
from msa_reference import reference_forward

TOLERANCE = 1e-4


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def compare(model, batch):
    model.zero_grad(set_to_none=True)
    fast = model(**batch, output_hidden_states=True, return_logits=True)
    fast_total = model.config.lm_loss_weight * fast.lm_loss + model.config.aux_loss_weight * fast.aux_loss
    fast_total.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    ref = reference_forward(model, **batch)
    ref_total = model.config.lm_loss_weight * ref.lm_loss + model.config.aux_loss_weight * ref.aux_loss
    ref_total.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    real = batch["doc_ids"] != -1
    for layer, (h_fast, h_ref) in enumerate(zip(fast.hidden_states, ref.hidden_states, strict=True)):
        assert relative_error(h_fast[real], h_ref[real]) < TOLERANCE, f"hidden states of layer input {layer}"
    assert relative_error(fast.logits[real], ref.logits[real]) < TOLERANCE
    assert relative_error(fast.doc_scores, ref.doc_scores) < TOLERANCE
    assert torch.equal(fast.selected_docs, ref.selected_docs)
    assert relative_error(fast.lm_loss, ref.lm_loss) < TOLERANCE
    assert relative_error(fast.aux_loss, ref.aux_loss) < TOLERANCE
    for k in (1, 5, 10):
        torch.testing.assert_close(fast.router_recall[f"recall@{k}"], ref.recall[k])
    assert fast_grads.keys() == ref_grads.keys()
    for name in fast_grads:
        assert relative_error(fast_grads[name], ref_grads[name]) < TOLERANCE, f"gradient of {name}"
    return fast
