"""A crash in the middle of a checkpoint save leaves the previous checkpoint as `latest`, the
next run resumes from it (W&B run included), and only the newest `keep_last` checkpoints are kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import make_stage_trainer

from train.distributed import DistributedContext

OVERRIDES = ["stages.cpt_warmup.budget.steps=4", "stages.cpt_warmup.checkpoint_every_steps=1", "checkpoint.keep_last=2",
             "tracking.wandb=offline"]


class SimulatedCrash(RuntimeError):
    pass


def test_crash_mid_save_keeps_latest_good_checkpoint(tmp_path: Path, context: DistributedContext,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
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
