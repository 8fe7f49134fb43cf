"""Every value that would train wrongly or fail late is a `RecipeError` at load time, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import TINY_RECIPE

from train.config import (
    RecipeError,
    check_local_paths,
    check_world_size,
    load_recipe,
)


@pytest.mark.parametrize(
    "override, key",
    [
        ("stages.cpt_warmup.budget.steps=0", "budget.steps"),
        ("stages.cpt_warmup.budget.steps=-3", "budget.steps"),
        ("stages.cpt_warmup.micro_batch_tokens=0", "micro_batch_tokens"),
        ("stages.cpt_warmup.row_length=0", "row_length"),
        ("stages.cpt_warmup.global_batch_tokens=-1024", "global_batch_tokens"),
        ("stages.cpt_warmup.checkpoint_every_steps=0", "checkpoint_every_steps"),
        ("tracking.log_every_steps=0", "tracking.log_every_steps"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("stages.cpt_warmup.schedule.final_lr_ratio=-2", "final_lr_ratio"),
        ("stages.cpt_warmup.schedule.final_lr_ratio=1.5", "final_lr_ratio"),
        ("stages.cpt_warmup.schedule.warmup_steps=-1", "warmup_steps"),
        ("stages.cpt_warmup.param_groups.0.lr=0", "param_groups"),
        ("stages.cpt_warmup.divergence.loss_spike_factor=0.5", "loss_spike_factor"),
        ("stages.cpt_warmup.divergence.max_grad_norm=0", "max_grad_norm"),
    ],
)
def test_bad_values_are_rejected_with_their_key(override: str, key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        load_recipe(TINY_RECIPE, [override])


def test_unknown_stage_name_in_an_override_suggests_the_closest() -> None:
    with pytest.raises(RecipeError, match="no stage named 'cpt_mian'.*did you mean 'cpt_main'"):
        load_recipe(TINY_RECIPE, ["stages.cpt_mian.budget.steps=5"])


def test_removed_memory_id_stride_max_is_an_unknown_key() -> None:
    with pytest.raises(RecipeError, match="data.sources.kv_retrieval.memory.*id_stride_max"):
        load_recipe(TINY_RECIPE, ["data.sources.kv_retrieval.memory.id_stride_max=8"])


def test_optimizer_lr_override_shadowed_by_group_lrs_is_an_error() -> None:
    with pytest.raises(RecipeError, match="optimizer.lr has no effect.*param_groups.0.lr"):
        load_recipe(TINY_RECIPE, ["stages.0.optimizer.lr=3e-4"])
    recipe = load_recipe(TINY_RECIPE, ["stages.0.param_groups.0.lr=3e-4"])
    assert recipe.stages[0].param_groups[0].lr == 3e-4


def test_ranks_that_do_not_divide_the_global_batch_are_rejected() -> None:
    recipe = load_recipe(TINY_RECIPE)
    check_world_size(recipe, recipe.stages[:1], 2)
    with pytest.raises(RecipeError, match="micro_batch_tokens x ranks = 512 x 3"):
        check_world_size(recipe, recipe.stages[:1], 3)


def test_missing_backbone_folder_is_named_never_looked_up(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    recipe = load_recipe(TINY_RECIPE, ["model.inline_config=null", f"model.backbone={missing}"])
    with pytest.raises(RecipeError, match="model.backbone: no such folder"):
        check_local_paths(recipe, recipe.stages[:1])
    recipe = load_recipe(TINY_RECIPE, ["model.inline_config=null", "model.backbone=Qwen/Qwen3-0.6B"])
    with pytest.raises(RecipeError, match="no such folder 'Qwen/Qwen3-0.6B'"):
        check_local_paths(recipe, recipe.stages[:1])
    recipe = load_recipe(TINY_RECIPE, [f"tokenizer.path={missing}"])
    with pytest.raises(RecipeError, match="tokenizer.path: no such folder"):
        check_local_paths(recipe, recipe.stages)
