"""Learning-rate schedule: linear warm-up, then a cosine or linear anneal to a final ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ScheduleConfig


@dataclass
class LRMultiplier:
    """Multiplier of every group's peak LR at a given optimizer step (a `LambdaLR` lambda).

    Warm-up rises linearly from 1/warmup to 1 over `warmup_steps`; the anneal then goes from
    1 to `final_ratio` at `total_steps`, so each group ends at `final_ratio` times its own LR.
    A plain object (not a closure) so that `LambdaLR.state_dict()` can store it.
    """

    total_steps: int
    warmup_steps: int
    anneal: str
    final_ratio: float

    @classmethod
    def from_config(cls, config: ScheduleConfig, total_steps: int) -> LRMultiplier:
        return cls(total_steps, config.warmup_steps, config.anneal, config.final_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.anneal == "constant":
            return 1.0
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.anneal == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.final_ratio + (1.0 - self.final_ratio) * shape
