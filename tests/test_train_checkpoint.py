"""A crash in the middle of a checkpoint save leaves the previous checkpoint as `latest`, the
next run resumes from it (W&B run included), and only the newest `keep_last` checkpoints are kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import failure_report, launcher_env, make_stage_trainer

from train.distributed import DistributedContext

OVERRIDES = [
    "stages.cpt_warmup.budget.steps=4",
    "stages.cpt_warmup.checkpoint_every_steps=1",
    "checkpoint.keep_last=2",
    "tracking.wandb=offline",
]


class SimulatedCrash(RuntimeError):
    pass


def test_crash_mid_save_keeps_latest_good_checkpoint(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = make_stage_trainer(tmp_path, context, OVERRIDES)
    save = trainer.engine.save_checkpoint

    def save_then_crash_at_step_3(save_dir: str, tag: str, **kwargs: object) -> None:
        save(save_dir, tag=tag, **kwargs)  # DeepSpeed's files are written, the checkpoint is not complete
        if tag == "step_00000003":
            raise SimulatedCrash(tag)

    monkeypatch.setattr(trainer.engine, "save_checkpoint", save_then_crash_at_step_3)
    with pytest.raises(SimulatedCrash):
        trainer.run()
    checkpoints = tmp_path / "stages/cpt_warmup/checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000002"
    assert not (checkpoints / "step_00000003").exists()
    assert (checkpoints / ".partial/step_00000003").is_dir()
    assert (checkpoints / "step_00000002/trainer_state_rank0.json").is_file()

    first_wandb_run = trainer.state.wandb_run_id
    assert first_wandb_run

    resumed = make_stage_trainer(tmp_path, context, OVERRIDES)
    resumed.run()
    assert resumed.state.step == 4
    assert resumed.state.wandb_run_id == first_wandb_run  # the W&B run id travels in the checkpoint
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert (checkpoints / "latest").read_text() == "step_00000004"
    assert not (checkpoints / ".partial/step_00000003").exists()
    assert (tmp_path / "stages/cpt_warmup/export/model.safetensors").is_file()


def test_deepspeed_recovery_script_lands_beside_the_checkpoints(tmp_path: Path, context: DistributedContext) -> None:
    """`zero_to_fp32.py` sits in `checkpoints/`, where it finds the checkpoints by `latest`, and
    consolidates the newest one into the weights the stage exported."""
    trainer = make_stage_trainer(tmp_path, context, ["stages.cpt_warmup.budget.steps=1", "tracking.wandb=disabled"])
    trainer.run()
    checkpoints = tmp_path / "stages/cpt_warmup/checkpoints"
    assert not list((checkpoints / ".partial").glob("*.py"))
    script = checkpoints / "zero_to_fp32.py"
    assert script.is_file() and (checkpoints / "zero_to_torch.py").is_file()

    # A pickle, not safetensors: the tied embedding and LM head share their storage there.
    result = subprocess.run(
        [sys.executable, script.name, ".", str(tmp_path / "fp32")],
        cwd=checkpoints,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, failure_report(result)
    consolidated = torch.load(tmp_path / "fp32/pytorch_model.bin", weights_only=True)
    exported = load_file(tmp_path / "stages/cpt_warmup/export/model.safetensors")
    assert exported.keys() <= consolidated.keys()
    for name, tensor in exported.items():
        assert torch.equal(consolidated[name], tensor), name
