"""With `deepspeed.torch_adam` the engine's optimizer is torch's fused AdamW (one pass over the fp32
master state instead of the multi-tensor path's eight), and it trains as the multi-tensor AdamW does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from train_runs import make_stage_trainer

from train.distributed import DistributedContext
from train.engine import deepspeed_config

STEPS = 3  # fp32 weights (the tiny recipe): the two kernels agree to about 1e-7


def train_stage(run_dir: Path, context: DistributedContext) -> tuple[Any, list[float], dict[str, torch.Tensor]]:
    trainer = make_stage_trainer(
        run_dir, context, [f"stages.cpt_warmup.budget.steps={STEPS}", "checkpoint.save_final=false"]
    )
    trainer.train()
    lines = (run_dir / "stages/cpt_warmup/metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "grad_norm" in r]
    weights = {
        name: p.detach().float().clone() for name, p in trainer.engine.module.named_parameters() if p.requires_grad
    }
    return trainer.engine.optimizer.optimizer, losses, weights


def multi_tensor_config(*args: Any) -> dict[str, Any]:
    config = deepspeed_config(*args)
    del config["optimizer"]["params"]["fused"]
    return config


def test_torch_adamw_is_fused_and_trains_as_the_multi_tensor_path(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    optimizer, losses, weights = train_stage(tmp_path / "fused", context)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    monkeypatch.setattr("train.trainer.deepspeed_config", multi_tensor_config)
    reference, reference_losses, reference_weights = train_stage(tmp_path / "multi_tensor", context)
    assert not reference.defaults["fused"]
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference_losses, rel=1e-6)
    for name, value in reference_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
