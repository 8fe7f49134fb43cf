"""Atomic, rotating DeepSpeed checkpoints with everything a bit-exact resume needs.

Layout under a stage's `checkpoints/` folder:

    step_00000040/          one complete checkpoint: DeepSpeed's model/optimizer/scheduler
                            files plus `trainer_state_rank{r}.pt` per rank
    latest                  the tag of the newest complete checkpoint
    .partial/               where a checkpoint is written before it is complete

A checkpoint is written under `.partial/`, every rank adds its own trainer state, and only
after a barrier does rank 0 rename it into place and then replace `latest` (write + rename).
A crash at any moment leaves `latest` pointing at a complete checkpoint. This relies on
all ranks sharing the checkpoint folder (one file system across nodes).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .distributed import DistributedContext, barrier

logger = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL = ".partial"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, on this rank."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


class CheckpointManager:
    """Saves and finds the checkpoints of one stage, keeping the newest `keep_last`."""

    def __init__(self, root: Path, keep_last: int, context: DistributedContext) -> None:
        self.root = root
        self.keep_last = keep_last
        self.context = context

    def latest_tag(self) -> str | None:
        latest = self.root / LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return tag if (self.root / tag).is_dir() else None

    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` (a collective call: every rank must enter it)."""
        tag = step_tag(step)
        final = self.root / tag
        if final.is_dir():
            return final
        partial_root = self.root / PARTIAL
        if self.context.is_main:
            shutil.rmtree(partial_root / tag, ignore_errors=True)  # debris of a crashed save
            partial_root.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(partial_root), tag=tag, save_latest=False)
        state_path = partial_root / tag / f"trainer_state_rank{self.context.rank}.pt"
        torch.save(trainer_state, state_path.with_suffix(".tmp"))
        os.replace(state_path.with_suffix(".tmp"), state_path)
        barrier()
        if self.context.is_main:
            os.rename(partial_root / tag, final)
            _write_atomically(self.root / LATEST, tag)
            self._remove_old(keep=tag)
            logger.info("checkpoint %s saved", final)
        barrier()
        return final

    def load(self, engine: Any) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint into `engine`; return this rank's trainer state."""
        tag = self.latest_tag()
        if tag is None:
            return None
        engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        state = torch.load(self.root / tag / f"trainer_state_rank{self.context.rank}.pt", weights_only=False)
        logger.info("resumed from checkpoint %s (step %d)", self.root / tag, state["step"])
        return state

    def _remove_old(self, keep: str) -> None:
        tags = sorted(p.name for p in self.root.glob("step_*") if p.is_dir())
        for tag in tags[: max(len(tags) - self.keep_last, 0)]:
            if tag != keep:
                shutil.rmtree(self.root / tag)
