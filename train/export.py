"""End-of-stage consolidated Hugging Face export: safetensors, tokenizer and the recipe used."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from .distributed import DistributedContext, barrier
from .export_files import RECIPE_FILE

logger = logging.getLogger(__name__)

def consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere); a collective call under ZeRO-3."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {name: tensor.detach().cpu() for name, tensor in engine.module.state_dict().items()}


def export_stage(
    engine: Any,
    zero_stage: int,
    destination: Path,
    tokenizer_dir: Path,
    recipe_yaml: str,
    context: DistributedContext,
) -> Path:
    """Write the stage's model as a Hugging Face checkpoint at `destination` (collective call).

    Tied embeddings are written once (the LM head is re-tied on load). The folder is built
    under a temporary name and renamed into place, so a complete-looking export is complete.
    """
    state_dict = consolidated_state_dict(engine, zero_stage)
    if context.is_main:
        model = engine.module
        if getattr(model.config, "tie_word_embeddings", False):
            state_dict.pop("lm_head.weight", None)
        staging = destination.with_name(destination.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        for item in tokenizer_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        (staging / RECIPE_FILE).write_text(recipe_yaml)
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
        logger.info("exported %s", destination)
    barrier()
    return destination
