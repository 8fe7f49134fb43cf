"""Memory readings for the trainer's metrics (FLOPs: `msa_modeling.flops`, one accounting for all)."""

from __future__ import annotations

import resource

import torch


def memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (GPU), or the process's peak resident set (CPU), in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux
