"""One FLOP accounting for MSA and dense training, so that every MFU the project prints compares.

Model FLOPs of a training step are three times the forward's (backward costs twice the forward;
activation recomputation is not counted: it is overhead, not model work). The forward counts:

- 2 FLOPs per weight per token that goes through it. The decoder layers' weight matrices see every
  real token; padding counts nothing. The LM head (vocab x hidden) counts only the tokens it runs on:
  an MSA model runs it on labelled tokens alone, a Hugging Face model on every real token. The
  router projections count where they run: `router_k_proj` on every real token, `router_q_proj` on
  the routing tokens. Embedding lookups are no matmuls and count nothing. Biases and norms are
  left out (under 0.1% of the matmuls).
- 4 x heads x head_dim FLOPs per (query, key) pair that attention computes (QK^T and PV): the causal
  pairs inside each attention segment, each example's question tokens against its prefix and, in
  router layers, its question tokens against the pooled chunks of the documents actually selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import ROLE_PAD, ROLE_PREFIX, ROLE_QUERY, PackedLayout


@dataclass(frozen=True)
class MicroBatchWork:
    """What one micro-batch asks of the model, counted on the host before the step runs."""

    tokens: int  # real (non-padding) tokens: each goes through every decoder layer
    head_tokens: int  # tokens the LM head runs on
    routing_tokens: int  # tokens that go through `router_q_proj` in each router layer
    token_pairs: int  # (query, key) pairs among the row's own tokens, per layer
    # [D] (query token, pooled chunk) pairs of each document of the batch if it is selected, per
    # router layer; `memory_pairs(selected_docs)` turns the model's selection into the count.
    doc_memory_pairs: torch.Tensor

    def memory_pairs(self, selected_docs: torch.Tensor | None) -> torch.Tensor | float:
        """(query token, chunk) pairs computed over all router layers, from `selected_docs` [router layers, D].

        Stays on the selection's device (no host sync); the caller adds it up with its other metrics.
        """
        if selected_docs is None or selected_docs.numel() == 0:
            return 0.0
        weights = self.doc_memory_pairs.to(selected_docs.device, non_blocking=True)
        return (selected_docs.to(weights.dtype) * weights).sum()


def _causal_pairs(lengths: torch.Tensor) -> int:
    lengths = lengths.to(torch.float64)
    return int((lengths * (lengths + 1) / 2).sum())


def msa_work(layout: PackedLayout) -> MicroBatchWork:
    """The work of an MSA micro-batch from its layout (CPU tensors; a few bincounts)."""
    real = layout.role != ROLE_PAD
    # Padding tokens are segments of their own; count only the real tokens' segments.
    segments = layout.token_segment[real]
    token_pairs = _causal_pairs(torch.bincount(segments)) if segments.numel() else 0
    examples = max(layout.num_examples, 1)
    valid = layout.token_example >= 0
    example = layout.token_example[valid]
    role = layout.role[valid]
    query_tokens = torch.bincount(example[role == ROLE_QUERY], minlength=examples).double()
    prefix_tokens = torch.bincount(example[role == ROLE_PREFIX], minlength=examples).double()
    token_pairs += int((query_tokens * prefix_tokens).sum())
    chunks_per_doc = torch.bincount(layout.chunk_doc, minlength=layout.doc_example.numel()).double()
    doc_memory_pairs = (
        chunks_per_doc * query_tokens[layout.doc_example]
        if layout.doc_example.numel()
        else (torch.zeros(0, dtype=torch.float64))
    )
    return MicroBatchWork(
        tokens=int(real.sum()),
        head_tokens=int(layout.lm_token_index.numel()),
        routing_tokens=int(layout.routing_token_index.numel()),
        token_pairs=token_pairs,
        doc_memory_pairs=doc_memory_pairs,
    )


def dense_work(doc_ids: torch.Tensor, document_mask: bool = False) -> MicroBatchWork:
    """The work of a Hugging Face causal LM on packed rows `doc_ids` [B, L] (-1 = padding, at the end).

    The head runs on every real token. Attention is causal over each row's real tokens, or, with
    `document_mask`, over each run of equal `doc_ids` (prefix, each document, the question).
    """
    real = doc_ids != -1
    lengths = real.sum(dim=1)
    if document_mask:
        runs = []
        for row in doc_ids:
            row = row[row != -1]
            if row.numel():
                runs.append(torch.unique_consecutive(row, return_counts=True)[1])
        token_pairs = sum(_causal_pairs(r) for r in runs)
    else:
        token_pairs = _causal_pairs(lengths)
    tokens = int(real.sum())
    return MicroBatchWork(
        tokens=tokens,
        head_tokens=tokens,
        routing_tokens=0,
        token_pairs=token_pairs,
        doc_memory_pairs=torch.zeros(0, dtype=torch.float64),
    )


def _matrix_numel(module: torch.nn.Module, skip: str = "") -> int:
    """Elements of the 2-D weights under `module` (biases and norms excluded), skipping names containing `skip`."""
    # Under ZeRO-3 a parameter's own tensor is an empty shard; `ds_shape`/`ds_numel` keep the full one.
    return sum(
        getattr(p, "ds_numel", p.numel())
        for name, p in module.named_parameters()
        if len(getattr(p, "ds_shape", p.shape)) == 2 and not (skip and skip in name)
    )


@dataclass(frozen=True)
class FlopModel:
    """Forward and training FLOPs of a model's micro-batches (see the module docstring)."""

    layer_matmul_parameters: int  # all decoder layers' weight matrices, router projections excluded
    head_parameters: int  # vocab x hidden
    router_key_parameters: int  # `router_k_proj` weights summed over router layers
    router_query_parameters: int  # `router_q_proj` weights summed over router layers
    attention_width: int  # heads x head_dim
    num_layers: int
    num_router_layers: int

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> FlopModel:
        """From an `MSAForCausalLM` or a Hugging Face causal LM (layers under `model.model.layers`)."""
        config = model.config
        layers = model.model.layers
        router_keys = router_queries = 0
        for name, param in layers.named_parameters():
            if "router_k_proj" in name:
                router_keys += getattr(param, "ds_numel", param.numel())
            elif "router_q_proj" in name:
                router_queries += getattr(param, "ds_numel", param.numel())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            layer_matmul_parameters=_matrix_numel(layers, skip="router_"),
            head_parameters=config.vocab_size * config.hidden_size,
            router_key_parameters=router_keys,
            router_query_parameters=router_queries,
            attention_width=config.num_attention_heads * head_dim,
            num_layers=config.num_hidden_layers,
            num_router_layers=len(getattr(config, "router_layers", []) or []),
        )

    def forward_flops(self, work: MicroBatchWork, memory_pairs: float = 0.0) -> float:
        """Forward FLOPs of a micro-batch; `memory_pairs` over all router layers (`work.memory_pairs`)."""
        matmul = (
            self.layer_matmul_parameters * work.tokens
            + self.head_parameters * work.head_tokens
            + self.router_key_parameters * work.tokens
            + self.router_query_parameters * work.routing_tokens
        )
        pairs = self.num_layers * work.token_pairs + memory_pairs
        return 2.0 * matmul + 4.0 * self.attention_width * pairs

    def training_flops(self, work: MicroBatchWork, memory_pairs: float = 0.0) -> float:
        """Forward and backward: three times the forward."""
        return 3.0 * self.forward_flops(work, memory_pairs)

    def memory_pair_training_flops(self, memory_pairs: float) -> float:
        """The training FLOPs of `memory_pairs` router-layer (query token, chunk) pairs alone."""
        return 3.0 * 4.0 * self.attention_width * memory_pairs
