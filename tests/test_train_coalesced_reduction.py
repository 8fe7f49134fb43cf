"""`deepspeed.coalesce_reduction` (one ZeRO-2 gradient reduction per optimizer step) trains exactly
as the per-micro-batch reduction does: same losses, gradient norms and weights, and one optimizer
update per step. In-process, one rank, two micro-batches per optimizer step."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from train_runs import make_stage_trainer

from train.distributed import DistributedContext

STEPS = 3


def train(run_dir: Path, context: DistributedContext, coalesce: bool) -> tuple[list, dict[str, torch.Tensor], int]:
    trainer = make_stage_trainer(
        run_dir,
        context,
        [
            f"stages.cpt_warmup.budget.steps={STEPS}",
            "checkpoint.save_final=false",
            f"deepspeed.coalesce_reduction={str(coalesce).lower()}",
        ],
    )
    assert trainer.accumulation == 2
    trainer.train()
    lines = (run_dir / "stages/cpt_warmup/metrics.jsonl").read_text().splitlines()
    records = [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "grad_norm" in r]
    weights = {name: p.detach().clone() for name, p in trainer.engine.module.named_parameters() if p.requires_grad}
    return records, weights, trainer.engine.global_steps


def test_coalesced_reduction_trains_identically(tmp_path: Path, context: DistributedContext) -> None:
    records, weights, updates = train(tmp_path / "per_micro_batch", context, coalesce=False)
    coalesced_records, coalesced_weights, coalesced_updates = train(tmp_path / "coalesced", context, coalesce=True)
    assert updates == coalesced_updates == STEPS
    assert coalesced_records == records
    assert len(records) == STEPS
    for name, value in weights.items():
        assert torch.equal(coalesced_weights[name], value), name
