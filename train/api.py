"""The trainer's public API for code outside `train/` (experiment drivers, notebooks).

A driver loads a recipe (changing it between stages with overrides if it likes), prepares the
tokenizer and data, then calls `run_stage` per stage: the same step the launchers take through
`runner.run_stages`, so no driver copies the stage loop. Anything not listed here is internal.
"""

from .config import Recipe, RecipeError, StageConfig, load_recipe
from .data_stream import build_config_for, source_build_dir
from .distributed import DistributedContext, init_distributed
from .export_files import RECIPE_FILE, is_complete_export
from .runner import prepare_recipe_tokenizer, run_stage, tokenizer_texts
from .tracking import read_metrics, read_stage_metrics, stage_curves
from .trainer import NonFiniteLossError, export_dir, stage_dir, total_steps

__all__ = [
    "RECIPE_FILE",
    "DistributedContext",
    "NonFiniteLossError",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "build_config_for",
    "export_dir",
    "init_distributed",
    "is_complete_export",
    "load_recipe",
    "prepare_recipe_tokenizer",
    "read_metrics",
    "read_stage_metrics",
    "run_stage",
    "source_build_dir",
    "stage_curves",
    "stage_dir",
    "tokenizer_texts",
    "total_steps",
]
