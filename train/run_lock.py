"""One launch per run folder: `run.lock` holds the owner's host and pid while a launch runs.

The lock file is created atomically (written under a private name, then hard-linked into place,
which fails if it exists). A lock left by a process that no longer runs on this host is stale and
taken over; a lock held by a live process, or by another host, stops the launch at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunFolderLockedError(RuntimeError):
    """Another launch holds the run folder; the message names it and says what to do."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunFolderLock:
    """`with RunFolderLock(run_dir):` holds the run folder for this process."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f"{LOCK_FILE}.{self.owner['host']}.{self.owner['pid']}")
        staging.write_text(json.dumps({**self.owner, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        try:
            for _ in range(2):  # a second try after removing a stale lock
                try:
                    os.link(staging, self.path)
                    return
                except FileExistsError:
                    self._remove_if_stale()
            raise RunFolderLockedError(f"{self.path}: could not take the lock (another launch raced for it)")
        finally:
            staging.unlink(missing_ok=True)

    def _remove_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid = str(holder["host"]), int(holder["pid"])
        except FileNotFoundError:
            return  # released in the meantime
        except (ValueError, KeyError, TypeError) as error:
            raise RunFolderLockedError(
                f"{self.path} is not a lock this program wrote ({error}); if no launch uses {self.path.parent}, "
                "delete that file and launch again"
            ) from error
        if host == self.owner["host"] and not _process_alive(pid):
            logger.warning("%s: removing the stale lock of process %d, which no longer runs", self.path, pid)
            self.path.unlink(missing_ok=True)
            return
        where = "this host" if host == self.owner["host"] else f"host {host}"
        raise RunFolderLockedError(
            f"{self.path.parent} is in use by process {pid} on {where} (lock file {self.path}). Wait for that launch "
            f"to finish or stop it; if it is gone (say, its host crashed), delete {self.path} and launch again"
        )

    def release(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return
        if holder.get("host") == self.owner["host"] and holder.get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()
