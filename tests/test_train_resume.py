"""A stage killed with SIGKILL and resumed gives exactly the per-step losses of an uninterrupted
run, under DeepSpeed on 2 CPU ranks, with ZeRO-2 and ZeRO-3, even with `latest` gone and the last
metrics line torn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import failure_report, kill_group, run_launcher, start_launcher, step_losses, wait_for

pytestmark = pytest.mark.integration

STEPS = 6


def stage_overrides(output_dir: Path, zero_stage: int) -> list[str]:
    return [
        "--stage",
        "cpt_warmup",
        f"run.output_dir={output_dir}",
        f"deepspeed.zero_stage={zero_stage}",
        f"stages.cpt_warmup.budget.steps={STEPS}",
        "stages.cpt_warmup.checkpoint_every_steps=2",
        "stages.cpt_warmup.eval.sources={}",
        "tracking.progress_bar=false",
    ]


def metric_lines_up_to(metrics: Path, step: int) -> list[str]:
    return [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= step]


def latest_checkpoint_step(checkpoints: Path) -> int:
    latest = checkpoints / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.is_file() else 0


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_sigkill_mid_stage_then_resume_matches_uninterrupted(tmp_path: Path, zero_stage: int) -> None:
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = run_launcher("pretrain", stage_overrides(reference_dir, zero_stage), ranks=2)
    assert reference.returncode == 0, failure_report(reference)
    expected = step_losses(reference_dir / "stages/cpt_warmup/metrics.jsonl")
    assert sorted(expected) == list(range(1, STEPS + 1))

    stage = killed_dir / "stages/cpt_warmup"
    process = start_launcher("pretrain", stage_overrides(killed_dir, zero_stage), 2, tmp_path / "killed.log")
    try:
        # Kill once a checkpoint exists and at least one later step has run: that step's work is lost.
        def checkpoint_and_lost_step() -> bool:
            saved = latest_checkpoint_step(stage / "checkpoints")
            metrics = stage / "metrics.jsonl"
            return saved >= 2 and metrics.is_file() and max(step_losses(metrics), default=0) > saved

        wait_for(checkpoint_and_lost_step, timeout=300, process=process, poll=0.05)
    finally:
        kill_group(process)
    killed_at = latest_checkpoint_step(stage / "checkpoints")
    assert killed_at < STEPS, "the run finished before it could be killed"
    assert not (stage / "export").exists()
    # A resumed run keeps the records of the steps it does not redo; a run started over would
    # rewrite them with new wall-clock figures (tokens/s, step time).
    saved_records = metric_lines_up_to(stage / "metrics.jsonl", killed_at)
    # Faults a kill can add: `latest` lost (it is only a hint) and a torn last metrics line.
    (stage / "checkpoints" / "latest").unlink()
    with open(stage / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 99, "loss"')

    resumed = run_launcher("pretrain", stage_overrides(killed_dir, zero_stage), ranks=2)
    assert resumed.returncode == 0, failure_report(resumed)
    assert metric_lines_up_to(stage / "metrics.jsonl", killed_at) == saved_records
    assert step_losses(stage / "metrics.jsonl") == expected
    # The consolidated exports agree too: same weights, bit for bit.
    exported = load_file(stage / "export/model.safetensors")
    reference_export = load_file(reference_dir / "stages/cpt_warmup/export/model.safetensors")
    assert exported.keys() == reference_export.keys() and "lm_head.weight" not in exported  # tied
    assert all(torch.equal(exported[name], reference_export[name]) for name in exported)
