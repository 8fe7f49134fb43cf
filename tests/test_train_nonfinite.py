"""A NaN loss stops the stage with a checkpoint and a clear message (nan_policy: stop), or its
update is discarded and training goes on (nan_policy: skip). In-process, one rank."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from train_runs import make_stage_trainer

from train import trainer as trainer_module
from train.distributed import DistributedContext
from train.trainer import NonFiniteLossError, StageTrainer

POISONED_STEP = 2


def overrides(policy: str) -> list[str]:
    return [
        "stages.cpt_warmup.budget.steps=3",
        "stages.cpt_warmup.checkpoint_every_steps=100",
        f"stages.cpt_warmup.nan_policy={policy}",
    ]


def poison_step(monkeypatch: pytest.MonkeyPatch, trainer: StageTrainer, step: int) -> None:
    """Make the loss NaN in every micro-batch of optimizer step `step` (1-based)."""
    micro_batches = itertools.count()
    original = trainer_module.weighted_loss

    def poisoned(output, weights):  # noqa: ANN001, ANN202
        loss = original(output, weights)
        return loss * float("nan") if next(micro_batches) // trainer.accumulation == step - 1 else loss

    monkeypatch.setattr(trainer_module, "weighted_loss", poisoned)


def test_nan_loss_stops_with_a_checkpoint(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_stage_trainer(tmp_path, context, overrides("stop"))
    poison_step(monkeypatch, trainer, POISONED_STEP)
    with pytest.raises(NonFiniteLossError, match=f"non-finite loss nan at step {POISONED_STEP}.*checkpoint saved"):
        trainer.run()
    checkpoints = tmp_path / "stages/cpt_warmup/checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{POISONED_STEP:08d}"
    assert trainer.engine.skipped_steps == 1  # the poisoned update never reached the weights
    assert not (tmp_path / "stages/cpt_warmup/export").exists()


def test_nan_loss_skips_the_step_when_configured(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_stage_trainer(tmp_path, context, overrides("skip"))
    poison_step(monkeypatch, trainer, POISONED_STEP)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "stages/cpt_warmup/metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records}
    assert losses[POISONED_STEP] is None and losses[1] is not None and losses[3] is not None
    assert records[-1]["skipped_steps"] == 1
    assert trainer.engine.skipped_steps == 1
    assert (tmp_path / "stages/cpt_warmup/export/model.safetensors").is_file()
