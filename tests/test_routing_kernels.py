"""The gather-based chunk pooling and key regrouping against their plain autograd versions."""

from __future__ import annotations

import pytest
import torch
from batches import random_packed_batch

from msa_modeling import build_packed_layout
from msa_modeling.attention import gather_varlen_keys, varlen_key_order
from msa_modeling.routing import pool_chunks


def layout_of(seed: int, chunk_size: int):
    batch = random_packed_batch(seed, doc_length=(1, 3 * chunk_size + 1))
    return build_packed_layout(
        batch["doc_ids"], chunk_size=chunk_size, query_position_offset=2, example_ids=batch["example_ids"]
    )


def reference_pool(token_states: torch.Tensor, layout) -> torch.Tensor:
    """One chunk at a time: the mean of its tokens, in fp32."""
    rows = []
    for chunk in range(layout.num_chunks):
        members = (layout.token_chunk == chunk).nonzero().flatten()
        rows.append(token_states[members].float().mean(0))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed,chunk_size", [(0, 4), (1, 3), (2, 8)])
def test_pool_chunks_matches_a_per_chunk_mean_and_its_gradient(seed: int, chunk_size: int, dtype: torch.dtype) -> None:
    layout = layout_of(seed, chunk_size)
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(layout.num_tokens, 3, 5, generator=generator).to(dtype)
    upstream = torch.randn(layout.num_chunks, 3, 5, generator=generator)

    ours = states.clone().requires_grad_(True)
    pooled = pool_chunks(ours, layout)
    (pooled * upstream).sum().backward()
    theirs = states.clone().requires_grad_(True)
    expected = reference_pool(theirs, layout)
    (expected * upstream).sum().backward()

    assert pooled.dtype == torch.float32 and ours.grad.dtype == dtype
    torch.testing.assert_close(pooled, expected, rtol=1e-6, atol=1e-6)
    # Each token gets its chunk's gradient / length once; tokens outside documents get zero.
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
    assert not ours.grad[layout.token_chunk < 0].any()


def test_regrouped_keys_match_plain_indexing_and_its_gradient() -> None:
    layout = layout_of(3, 4)
    generator = torch.Generator().manual_seed(3)
    selected = torch.rand(layout.num_chunks, generator=generator) < 0.5
    keys = varlen_key_order(layout, selected)
    assert torch.equal(keys.order[keys.inverse], torch.arange(keys.order.numel()))
    tokens = torch.randn(layout.num_tokens, 2, 4, generator=generator, requires_grad=True)
    pooled = torch.randn(layout.num_chunks, 2, 4, generator=generator, requires_grad=True)
    upstream = torch.randn(keys.order.numel(), 2, 4, generator=generator)

    (gather_varlen_keys(tokens, layout, keys, pooled) * upstream).sum().backward()
    ours = tokens.grad.clone(), pooled.grad.clone()
    tokens.grad = pooled.grad = None
    plain = torch.cat([tokens, tokens[layout.prefix_token_index], pooled])[keys.order]
    (plain * upstream).sum().backward()

    assert torch.equal(gather_varlen_keys(tokens, layout, keys, pooled), plain)
    torch.testing.assert_close(ours[0], tokens.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], pooled.grad, rtol=0, atol=0)
