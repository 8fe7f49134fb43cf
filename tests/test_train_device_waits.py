"""The training loop does not make the host wait for the device inside an optimizer step.

A wait drains the queued kernels, so the launches that follow run with the device idle; in a
host-bound step (1.2B model, 8K rows on one H100) every wait is lost device time. The trainer
reads its metrics once per optimizer step; nothing else may synchronise. In-process, one rank,
ZeRO-2 (the tiny recipe's), two micro-batches per optimizer step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deepspeed.accelerator import get_accelerator
from train_runs import make_stage_trainer

from train.distributed import DistributedContext

STEPS = 4


def test_no_device_synchronisation_per_micro_batch(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_stage_trainer(
        tmp_path, context, [f"stages.cpt_warmup.budget.steps={STEPS}", "checkpoint.save_final=false"]
    )
    assert trainer.accumulation == 2
    accelerator = get_accelerator()
    waits = []
    original = accelerator.synchronize

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        waits.append(trainer.state.step)
        return original(*args, **kwargs)

    monkeypatch.setattr(accelerator, "synchronize", counted)
    trainer.train()
    assert trainer.state.step == STEPS
    assert waits == [], f"device synchronised during optimizer steps {sorted(set(waits))}"
