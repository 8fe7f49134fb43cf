"""`tracking.profile_steps` profiles a window of a stage's steps on rank 0 and writes a trace and
a summary of wall clock against device time. In-process, one rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_runs import TINY_RECIPE, make_stage_trainer

from train.config import RecipeError, load_recipe
from train.distributed import DistributedContext


@pytest.mark.parametrize("start, steps, window", [(2, 2, "steps 2-3"), (3, 5, "steps 3-3")])
def test_profile_window_writes_trace_and_summary(
    tmp_path: Path, context: DistributedContext, start: int, steps: int, window: str
) -> None:
    trainer = make_stage_trainer(
        tmp_path,
        context,
        [
            "stages.cpt_warmup.budget.steps=3",
            "stages.cpt_warmup.checkpoint_every_steps=100",
            f"tracking.profile_start_step={start}",
            f"tracking.profile_steps={steps}",
        ],
    )
    trainer.run()
    profile = tmp_path / "stages/cpt_warmup/profile"
    summary = (profile / "summary.txt").read_text()
    # A window running past the stage's last step ends with the stage.
    assert summary.startswith(f"{window}: ") and "ms of wall clock a step" in summary
    trace = json.loads((profile / "trace.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])


def test_profile_settings_are_checked() -> None:
    with pytest.raises(RecipeError, match="tracking.profile_steps must be >= 0"):
        load_recipe(TINY_RECIPE, ["tracking.profile_steps=-1"])
    with pytest.raises(RecipeError, match="profile_start_step >= 1"):
        load_recipe(TINY_RECIPE, ["tracking.profile_start_step=0"])


def test_a_failing_profile_does_not_stop_training(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from train import profiling

    def fail(self, profiler, wall_s: float) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(profiling.StepProfiler, "_write_profile", fail)
    trainer = make_stage_trainer(
        tmp_path,
        context,
        [
            "stages.cpt_warmup.budget.steps=3",
            "stages.cpt_warmup.checkpoint_every_steps=100",
            "tracking.profile_start_step=1",
            "tracking.profile_steps=1",
        ],
    )
    trainer.run()
    assert trainer.state.step == 3
    assert not list(tmp_path.rglob("trace.json"))
    # A profiler left running crashes the interpreter when it exits.
    assert not torch.autograd.profiler._is_profiler_enabled


def test_device_time_counts_kernels_once() -> None:
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    from train.profiling import device_kernel_ms

    op = FunctionEvent(id=0, name="aten::mm", thread=0, start_us=0, end_us=900, use_device="cuda")
    kernel = FunctionEvent(id=1, name="gemm_kernel", thread=0, start_us=100, end_us=800, device_type=DeviceType.CUDA)
    op.append_kernel("gemm_kernel", 0, 700)  # the op's self device time is that kernel again
    other = FunctionEvent(id=2, name="flash_bwd", thread=0, start_us=800, end_us=1100, device_type=DeviceType.CUDA)
    assert op.self_device_time_total == 700
    assert device_kernel_ms([op, kernel, other]) == pytest.approx(1.0)
