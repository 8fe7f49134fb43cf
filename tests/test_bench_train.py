"""The training benchmark's optimizer-in-backward: the plain optimizer's update, and no leak once its hooks are removed."""

from __future__ import annotations

import gc
import weakref

import torch
from batches import random_packed_batch, tiny_msa

from benchmarks.bench_train import optimizer_in_backward
from msa_modeling.execution import apply_activation_checkpointing


def test_optimizer_in_backward_matches_the_plain_step_and_frees_every_gradient() -> None:
    batches = [random_packed_batch(seed) for seed in (3, 4, 5)]
    make_optimizer = lambda params: torch.optim.AdamW(params, lr=1e-2)  # noqa: E731
    models = []
    for in_backward in (False, True):
        # Tied embeddings: one parameter used twice must still step once per backward.
        model = tiny_msa(7, backbone_overrides={"tie_word_embeddings": True}).train()
        apply_activation_checkpointing(model)
        optimizer = None if in_backward else make_optimizer(model.parameters())
        if in_backward:
            optimizer_in_backward(model.parameters(), make_optimizer)
        for batch in batches:
            model(**batch).loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                assert all(p.grad is None for p in model.parameters())
        models.append(model)
    assert models[0].lm_head.weight is models[0].model.embed_tokens.weight
    initial = dict(tiny_msa(7, backbone_overrides={"tie_word_embeddings": True}).named_parameters())
    plain, stepped_in_backward = (dict(m.named_parameters()) for m in models)
    for name, param in plain.items():
        torch.testing.assert_close(stepped_in_backward[name], param, rtol=1e-6, atol=1e-6, msg=name)
    moved = sum(not torch.equal(param, initial[name]) for name, param in plain.items())
    assert moved > len(plain) // 2, "the steps moved the parameters"


def test_removing_the_hooks_releases_the_model_and_its_optimizer_state() -> None:
    model = tiny_msa(7).train()
    hooks = optimizer_in_backward(model.parameters(), lambda params: torch.optim.AdamW(params, lr=1e-2))
    model(**random_packed_batch(3)).loss.backward()
    weight = weakref.ref(model.model.embed_tokens.weight)
    kept = weakref.ref(tiny_msa(7).model.embed_tokens.weight)  # control: no hooks, freed at once
    for hook in hooks:
        hook.remove()
    del model, hooks
    gc.collect()
    assert kept() is None
    assert weight() is None, "the parameter (and its optimizer state) outlived the model"
