"""A CPU launch never waits on a stale torch-extensions build lock: the shm op is not built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from train_runs import REPO, launcher_env


@pytest.mark.integration
def test_stale_shm_comm_build_lock_does_not_hang_a_cpu_launch(tmp_path: Path) -> None:
    lock = tmp_path / "deepspeed_shm_comm" / "lock"  # left by a launch killed mid-build
    lock.parent.mkdir()
    lock.touch()
    env = {**launcher_env(), "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    code = "from train.distributed import init_distributed; print(init_distributed().world_size)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "1"
