"""What a stage export holds beside the Hugging Face checkpoint: the one home of these names,
importable without DeepSpeed (evaluation reads exports; `train.export` writes them)."""

from __future__ import annotations

from pathlib import Path

RECIPE_FILE = "recipe.yaml"  # the recipe the stage was trained with, overrides applied


def is_complete_export(path: Path) -> bool:
    """An export is complete once its folder exists: it is renamed into place as the last step."""
    return (path / "config.json").is_file() and (path / RECIPE_FILE).is_file()
