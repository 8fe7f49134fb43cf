"""A NaN loss stops the stage with a checkpoint and a clear message (nan_policy: stop), or its
update is discarded and training goes on (nan_policy: skip). In-process, one rank."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from msa_train.data.tokenization import load_tokenizer
from msa_train.train import trainer as trainer_module
from msa_train.train.config import load_recipe
from msa_train.train.distributed import DistributedContext, init_distributed
from msa_train.train.runner import prepare_run
from msa_train.train.trainer import NonFiniteLossError, StageTrainer
from train_runs import TINY_RECIPE

POISONED_STEP = 2


@pytest.fixture(scope="module")
def context() -> DistributedContext:
    return init_distributed()


def make_trainer(run_dir: Path, policy: str, context: DistributedContext) -> StageTrainer:
    recipe = load_recipe(TINY_RECIPE, [
        f"run.output_dir={run_dir}",
        "stages.cpt_warmup.budget.steps=3",
        "stages.cpt_warmup.checkpoint_every_steps=100",
        "stages.cpt_warmup.eval.sources={}",
        f"stages.cpt_warmup.nan_policy={policy}",
        "tracking.progress_bar=false",
    ])
    stage = recipe.stage("cpt_warmup")
    tokenizer_dir = prepare_run(recipe, [stage], run_dir, context)
    return StageTrainer(recipe, stage, run_dir, tokenizer_dir, load_tokenizer(tokenizer_dir).vocab_size, None, context)


def poison_step(monkeypatch: pytest.MonkeyPatch, trainer: StageTrainer, step: int) -> None:
    """Make the loss NaN in every micro-batch of optimizer step `step` (1-based)."""
    micro_batches = itertools.count()
    original = trainer_module.weighted_loss

    def poisoned(output, weights):  # noqa: ANN001, ANN202
        loss = original(output, weights)
        return loss * float("nan") if next(micro_batches) // trainer.accumulation == step - 1 else loss

    monkeypatch.setattr(trainer_module, "weighted_loss", poisoned)


def test_nan_loss_stops_with_a_checkpoint(tmp_path: Path, context: DistributedContext,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, "stop", context)
    poison_step(monkeypatch, trainer, POISONED_STEP)
    with pytest.raises(NonFiniteLossError, match=f"non-finite loss nan at step {POISONED_STEP}.*checkpoint saved"):
        trainer.run()
    checkpoints = tmp_path / "stages/cpt_warmup/checkpoints"
    assert (checkpoints / "latest").read_text() == f"step_{POISONED_STEP:08d}"
    assert trainer.engine.skipped_steps == 1  # the poisoned update never reached the weights
    assert not (tmp_path / "stages/cpt_warmup/export").exists()


def test_nan_loss_skips_the_step_when_configured(tmp_path: Path, context: DistributedContext,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = make_trainer(tmp_path, "skip", context)
    poison_step(monkeypatch, trainer, POISONED_STEP)
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / "stages/cpt_warmup/metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records}
    assert losses[POISONED_STEP] is None and losses[1] is not None and losses[3] is not None
    assert records[-1]["skipped_steps"] == 1
    assert trainer.engine.skipped_steps == 1
    assert (tmp_path / "stages/cpt_warmup/export/model.safetensors").is_file()
