"""Ctrl-C on a launcher: exit code 130 and the run folder released (resuming is `test_train_resume`'s)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from train_runs import start_launcher, wait_for

from train.run_lock import RunFolderLock


@pytest.mark.integration
def test_ctrl_c_during_training_exits_130_and_releases_the_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A budget far beyond the first checkpoint, so that the stage is still training when Ctrl-C comes.
    args = ["--stage", "cpt_warmup", f"run.output_dir={run_dir}", "stages.cpt_warmup.budget.steps=100000"]
    process = start_launcher("pretrain", args, 1, tmp_path / "launcher.log")
    first_checkpoint = run_dir / "stages" / "cpt_warmup" / "checkpoints" / "step_00000003"
    try:
        wait_for(first_checkpoint.is_dir, timeout=300, process=process)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground group
        assert process.wait(timeout=120) == 130, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with RunFolderLock(run_dir):  # released on the way out
        pass
