"""MSA losses (spec section 5): chunked next-token loss, InfoNCE routing loss, router recall."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .layout import PackedLayout

RECALL_KS = (1, 5, 10)


def _summed_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_lm_loss(
    hidden_states: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    layout: PackedLayout,
    chunk_size: int,
) -> torch.Tensor | None:
    """Mean next-token cross-entropy over the layout's LM targets.

    Only the tokens that predict a target go through the LM head, `chunk_size` at a time,
    and each chunk is recomputed in backward, so at most one chunk of logits
    ([chunk_size, vocab], fp32) is alive at once. Returns `None` when nothing is labelled.

    Args:
        hidden_states: [B, L, hidden] after the final norm.
        head: the LM head (hidden -> vocab logits).
    """
    num_targets = layout.lm_token_index.numel()
    if num_targets == 0:
        return None
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    total = hidden_states.new_zeros((), dtype=torch.float32)
    for start in range(0, num_targets, chunk_size):
        index = layout.lm_token_index[start : start + chunk_size]
        targets = layout.lm_targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_summed_cross_entropy, head, flat[index], targets, use_reentrant=False)
        else:
            total = total + _summed_cross_entropy(head, flat[index], targets)
    return total / num_targets


def routing_loss(
    doc_scores: torch.Tensor,
    layout: PackedLayout,
    temperature: float,
    loss_type: str = "decoupled_infonce",
) -> torch.Tensor | None:
    """InfoNCE over each example's documents, averaged over examples that have positives.

    `"decoupled_infonce"` (paper eq. 5): -(1/|P|) sum_{i in P} log(e^{s_i/t} / (e^{s_i/t} + sum_{j in N} e^{s_j/t})).
    `"infonce"`: the denominator sums over every document of the example.

    Args:
        doc_scores: [D] document scores s_i of one router layer.

    Returns:
        A scalar, or `None` when no example has a positive document.
    """
    if loss_type not in ("decoupled_infonce", "infonce"):
        raise ValueError(f"unknown aux loss type {loss_type!r}")
    if not layout.has_positives:
        return None
    present = layout.example_docs >= 0
    logits = doc_scores[layout.example_docs.clamp(min=0)] / temperature
    positive = layout.doc_positive[layout.example_docs.clamp(min=0)] & present
    positives_per_example = positive.sum(1)
    has_positive = positives_per_example > 0
    competitors = (present & ~positive) if loss_type == "decoupled_infonce" else present
    has_competitor = competitors.any(1, keepdim=True)
    # Rows without competitors get a dummy logsumexp over zeros, replaced by -inf, so that
    # no -inf - -inf reaches the backward pass.
    competitor_lse = torch.logsumexp(
        logits.masked_fill(~competitors, float("-inf")).masked_fill(~has_competitor, 0.0), 1, keepdim=True
    )
    competitor_lse = competitor_lse.masked_fill(~has_competitor, float("-inf"))
    if loss_type == "decoupled_infonce":
        log_denominator = torch.logaddexp(logits, competitor_lse)
    else:
        log_denominator = competitor_lse.expand_as(logits)
    per_positive = (log_denominator - logits).masked_fill(~positive, 0.0)
    per_example = per_positive.sum(1) / positives_per_example.clamp(min=1)
    return (per_example * has_positive).sum() / has_positive.sum()


def router_recall(
    doc_ranks: torch.Tensor, layout: PackedLayout, ks: tuple[int, ...] = RECALL_KS
) -> dict[int, torch.Tensor]:
    """recall@k = |top-min(k, n) ∩ P| / |P|, averaged over examples with positives.

    Returns {k: scalar tensor}; NaN when no example has positives.
    """
    positives = layout.doc_positive
    per_example_positives = torch.zeros(layout.num_examples, device=doc_ranks.device)
    per_example_positives.index_add_(0, layout.doc_example, positives.float())
    has_positive = per_example_positives > 0
    recalls = {}
    for k in ks:
        hits = torch.zeros(layout.num_examples, device=doc_ranks.device)
        hits.index_add_(0, layout.doc_example, (positives & (doc_ranks < k)).float())
        recall = hits / per_example_positives.clamp(min=1)
        # 0/0 gives NaN when no example has positives, as documented.
        recalls[k] = (recall * has_positive).sum() / has_positive.sum()
    return recalls
