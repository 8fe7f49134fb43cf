"""One launch per run folder: a live holder stops a second launch at once; a stale lock is taken over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_runs import run_launcher

from train.run_lock import LOCK_FILE, RunFolderLock, RunFolderLockedError


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_holder_is_refused_and_release_frees_the_folder(tmp_path: Path) -> None:
    with RunFolderLock(tmp_path), pytest.raises(RunFolderLockedError, match=f"in use by process {os.getpid()}"):
        RunFolderLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with RunFolderLock(tmp_path):
        assert (tmp_path / LOCK_FILE).is_file()


def test_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    import socket

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    with RunFolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("content", [{"host": "another-host", "pid": 1}, "garbage"])
def test_lock_that_cannot_be_judged_is_refused(tmp_path: Path, content: object) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps(content) if isinstance(content, dict) else content)
    with pytest.raises(RunFolderLockedError, match=f"{LOCK_FILE}.*delete"):
        RunFolderLock(tmp_path).acquire()


@pytest.mark.integration
def test_second_launch_on_a_locked_folder_fails_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with RunFolderLock(tmp_path):
        result = run_launcher("pretrain", ["--stage", "cpt_warmup", f"run.output_dir={tmp_path}"], timeout=120)
    assert result.returncode == 4
    assert not (tmp_path / "tokenizer").exists() and not (tmp_path / "stages").exists()  # nothing was touched
    assert time.monotonic() - started < 120
