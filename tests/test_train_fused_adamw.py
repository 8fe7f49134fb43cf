"""On GPUs, `deepspeed.torch_adam` builds torch's fused AdamW (one pass over the fp32 master state
instead of the multi-tensor path's eight); CPU runs keep the multi-tensor path. DeepSpeed hands the
key through to AdamW, and the fused kernel trains as the multi-tensor one does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from train_runs import make_stage_trainer, step_losses

from train.config import load_recipe
from train.distributed import DistributedContext
from train.engine import deepspeed_config

STEPS = 3  # fp32 weights (the tiny recipe): the two kernels agree to about 1e-7
RECIPE_1B = Path(__file__).resolve().parents[1] / "recipes" / "qwen3_1b_synthetic.yaml"


@pytest.mark.parametrize("on_cpu", [False, True])
def test_fused_kernel_on_gpus_only(on_cpu: bool) -> None:
    recipe = load_recipe(RECIPE_1B)
    config = deepspeed_config(recipe, recipe.stage("cpt_synthetic"), 1, 4, 1, on_cpu)
    params = config["optimizer"]["params"]
    assert params["torch_adam"] is True
    assert params.get("fused", False) is not on_cpu


def train_stage(run_dir: Path, context: DistributedContext) -> tuple[Any, list[float], dict[str, torch.Tensor]]:
    trainer = make_stage_trainer(
        run_dir, context, [f"stages.cpt_warmup.budget.steps={STEPS}", "checkpoint.save_final=false"]
    )
    trainer.train()
    losses = list(step_losses(run_dir / "stages/cpt_warmup/metrics.jsonl").values())
    weights = {
        name: p.detach().float().clone() for name, p in trainer.engine.module.named_parameters() if p.requires_grad
    }
    return trainer.engine.optimizer.optimizer, losses, weights


def fused_config(*args: Any) -> dict[str, Any]:
    """The stage's config with the GPU's optimizer kernel, on the CPU."""
    config = deepspeed_config(*args)
    config["optimizer"]["params"]["fused"] = True
    return config


def test_fused_adamw_trains_as_the_multi_tensor_path(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, reference_losses, reference_weights = train_stage(tmp_path / "multi_tensor", context)
    assert isinstance(reference, torch.optim.AdamW)
    assert not reference.defaults["fused"]
    monkeypatch.setattr("train.trainer.deepspeed_config", fused_config)
    optimizer, losses, weights = train_stage(tmp_path / "fused", context)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference_losses, rel=1e-6)
    for name, value in reference_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
