"""FLOP accounting for MFU, and memory readings."""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs of a micro-batch: 6·N·tokens for the weights plus the attention matmuls.

    N counts every parameter except the input embedding table (a lookup, not a matmul).
    Attention costs 4·head_dim FLOPs per (query, key) pair and head forward (QK^T and AV),
    three times that with the backward pass, hence 12·heads·head_dim per pair per layer.
    """

    matmul_parameters: int
    attention_width: int  # heads x head_dim
    num_layers: int
    num_router_layers: int

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "FlopModel":
        config = model.config
        embedding = model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters() if p is not embedding)
        if getattr(config, "tie_word_embeddings", False):
            total += embedding.numel()  # the tied LM head is a matmul over the same table
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        router_layers = getattr(config, "router_layers", [])  # none in a dense backbone
        return cls(total, config.num_attention_heads * head_dim, config.num_hidden_layers, len(router_layers))

    def training_flops(self, tokens: int, token_pairs: int, memory_pairs: int) -> float:
        attention_pairs = self.num_layers * token_pairs + self.num_router_layers * memory_pairs
        return 6.0 * self.matmul_parameters * tokens + 12.0 * self.attention_width * attention_pairs


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (GPU), or the process's peak resident set (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
