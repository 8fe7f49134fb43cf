"""What a stage export holds beside the Hugging Face checkpoint: the one home of these names,
importable without DeepSpeed (evaluation reads exports; `train.export` writes them)."""

from __future__ import annotations

from pathlib import Path

RECIPE_FILE = "recipe.yaml"  # the recipe the stage was trained with, overrides applied
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's, in the export of a stage with `lora.export: adapter`
ADAPTER_BASE_DIR = "base"  # the adapter's base model, when the stage started from one not on disk


def is_complete_export(path: Path) -> bool:
    """An export is complete once its folder exists: it is renamed into place as the last step."""
    has_model = (path / "config.json").is_file() or (path / ADAPTER_CONFIG_FILE).is_file()
    return has_model and (path / RECIPE_FILE).is_file()
