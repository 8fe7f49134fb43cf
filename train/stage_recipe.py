"""What a stage was trained with, kept beside its checkpoints, so that a rerun with another recipe
is refused with the keys that differ instead of resuming (or skipping) as if nothing changed.

Recorded: the stage's fields that decide its training trajectory (data mix, batch geometry,
budget, optimizer, schedule, parameter groups, loss weights, starting point, chunk size), the
model settings, the seed and the configs of the stage's data sources. Not recorded, so free to
change on a resume: checkpoint and evaluation intervals, NaN and divergence policies, tracking
and the DeepSpeed memory settings.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .config import Recipe, StageConfig

STAGE_RECIPE_FILE = "stage_recipe.json"
UNRECORDED_STAGE_FIELDS = ("name", "checkpoint_every_steps", "eval", "nan_policy", "divergence")


class StageRecipeChangedError(RuntimeError):
    """A stage folder was made with another recipe; the message lists the keys that differ."""


def stage_recipe(recipe: Recipe, stage: StageConfig) -> dict[str, Any]:
    """The recorded settings of `stage` as plain JSON values."""
    fields = {key: value for key, value in dataclasses.asdict(stage).items() if key not in UNRECORDED_STAGE_FIELDS}
    return json.loads(
        json.dumps(
            {
                "stage": fields,
                "model": dataclasses.asdict(recipe.model),
                "seed": recipe.run.seed,
                "sources": {name: recipe.data.sources[name] for name in stage.sources},
            },
            sort_keys=True,
        )
    )


def differences(saved: Any, current: Any, path: str = "") -> list[str]:
    """Dotted keys whose values differ, as `key: saved -> current`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current), key=str):
            found += differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return found
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [
            line
            for index, (old, new) in enumerate(zip(saved, current))
            for line in differences(old, new, f"{path}.{index}")
        ]
    return [] if saved == current else [f"{path}: {saved!r} -> {current!r}"]


def check_stage_recipe(stage_folder: Path, recipe: Recipe, stage: StageConfig) -> None:
    """Refuse a stage folder recorded with other settings (a folder without a record passes)."""
    path = stage_folder / STAGE_RECIPE_FILE
    if not path.is_file():
        return
    changed = differences(json.loads(path.read_text()), stage_recipe(recipe, stage))
    if changed:
        raise StageRecipeChangedError(
            f"stage {stage.name}: {stage_folder} was trained with other settings ({'; '.join(changed)}). "
            f"Restore them to resume or reuse it, or set run.output_dir to a new folder (or move "
            f"{stage_folder} away) to train the stage with the new ones"
        )


def record_stage_recipe(stage_folder: Path, recipe: Recipe, stage: StageConfig) -> None:
    """Write the stage's record when it starts training (kept if it exists)."""
    path = stage_folder / STAGE_RECIPE_FILE
    if path.is_file():
        return
    stage_folder.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(stage_recipe(recipe, stage), indent=1, sort_keys=True))
    staging.replace(path)
