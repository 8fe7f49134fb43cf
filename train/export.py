"""End-of-stage consolidated Hugging Face export: safetensors, tokenizer and the recipe used."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from .distributed import DistributedContext, barrier
from .export_files import ADAPTER_BASE_DIR, RECIPE_FILE

logger = logging.getLogger(__name__)


def consolidated_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere); a collective call under ZeRO-3."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {name: tensor.detach().cpu() for name, tensor in engine.module.state_dict().items()}


def lora_scalings(model: PeftModel) -> dict[str, float]:
    """`alpha / rank` (peft's `scaling`) of each LoRA-adapted module, by its name in the base model."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.scaling["default"]
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.scaling
    }


def fold_lora(state_dict: dict[str, torch.Tensor], scalings: dict[str, float], merge: bool) -> dict[str, torch.Tensor]:
    """A peft LoRA model's state dict under the base model's names: each adapted weight is
    `W + scaling * B @ A` when `merge`, else `W` (the adapter dropped)."""
    prefix = "base_model.model."
    base: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        name = name.removeprefix(prefix)
        if ".lora_" not in name:
            base[name.replace(".base_layer.", ".")] = tensor
    if merge:
        for module, scaling in scalings.items():
            a = state_dict[f"{prefix}{module}.lora_A.default.weight"].float()
            b = state_dict[f"{prefix}{module}.lora_B.default.weight"].float()
            weight = base[f"{module}.weight"]
            # The order of peft's own merge (weight += delta), so that float32 gives the same bits.
            base[f"{module}.weight"] = (weight.float() + (b @ a) * scaling).to(weight.dtype)
    return base


def save_msa_model(model: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """`model`'s config and modelling files with `state_dict` as its weights (a tied LM head once)."""
    if getattr(model.config, "tie_word_embeddings", False):
        state_dict = {name: tensor for name, tensor in state_dict.items() if name != "lm_head.weight"}
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def save_lora_adapter(
    model: PeftModel,
    state_dict: dict[str, torch.Tensor],
    folder: Path,
    base_checkpoint: Path | None,
    final_folder: Path,
) -> None:
    """peft's adapter files in `folder`, over `base_checkpoint`; without one (the stage's starting
    model exists only in memory), the base model is written to `base/` beside the adapter."""
    if base_checkpoint is None:
        base_checkpoint = final_folder.resolve() / ADAPTER_BASE_DIR
        save_msa_model(model.get_base_model(), fold_lora(state_dict, {}, merge=False), folder / ADAPTER_BASE_DIR)
    config = model.peft_config["default"]
    saved_base = config.base_model_name_or_path
    config.base_model_name_or_path = str(base_checkpoint)
    try:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    finally:
        config.base_model_name_or_path = saved_base


def export_stage(
    engine: Any,
    zero_stage: int,
    destination: Path,
    tokenizer_dir: Path,
    recipe_yaml: str,
    context: DistributedContext,
    lora_export: Literal["merged", "adapter"] | None = None,
    base_checkpoint: Path | None = None,
) -> Path:
    """Write the stage's model as a Hugging Face checkpoint at `destination` (collective call).

    Tied embeddings are written once (the LM head is re-tied on load). A LoRA stage's model (a
    peft model) is written with its adapters merged (`lora_export: merged`), or as peft's adapter
    over `base_checkpoint` (`adapter`). The folder is built under a temporary name and renamed
    into place, so a complete-looking export is complete.
    """
    state_dict = consolidated_state_dict(engine, zero_stage)
    if context.is_main:
        model = engine.module
        staging = destination.with_name(destination.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        if not isinstance(model, PeftModel):
            save_msa_model(model, state_dict, staging)
        elif lora_export == "adapter":
            save_lora_adapter(model, state_dict, staging, base_checkpoint, destination)
        elif lora_export == "merged":
            merged = fold_lora(state_dict, lora_scalings(model), merge=True)
            save_msa_model(model.get_base_model(), merged, staging)
        else:
            raise ValueError(f"a LoRA model needs lora_export 'merged' or 'adapter', got {lora_export!r}")
        for item in tokenizer_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        (staging / RECIPE_FILE).write_text(recipe_yaml)
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)
        logger.info("exported %s", destination)
    barrier()
    return destination
