"""Errors that point at the offending input, and the opt-in policy that skips bad records."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A malformed input record, located by file and 1-based line number."""

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        location = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{location}: {reason}")


class OverlongExampleError(ValueError):
    """An example does not fit the row it must be packed into; it is never cut silently."""


@dataclass
class BadRecordTally:
    """Decides what happens to a malformed record: stop (default) or skip and count it.

    Skipping is opt-in because a silently shrinking dataset is worse than a failed build;
    the counts end up in the manifest so the loss is visible afterwards.
    """

    skip_bad_records: bool = False
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)
    max_examples_kept: int = 20

    def handle(self, error: DataFormatError) -> None:
        """Raise ``error`` unless skipping is enabled, in which case count it."""
        if not self.skip_bad_records:
            raise error
        self.skipped += 1
        self.reasons[error.reason] = self.reasons.get(error.reason, 0) + 1
        if len(self.first_errors) < self.max_examples_kept:
            self.first_errors.append(str(error))
        logger.warning("skipping bad record: %s", error)

    def summary(self) -> dict:
        """What was skipped and why, for the manifest."""
        return {"skipped": self.skipped, "reasons": dict(self.reasons), "first_errors": list(self.first_errors)}


class MissingFileError(DataFormatError, FileNotFoundError):
    """An input file the layout requires is absent."""

    def __init__(self, path: str | Path, reason: str = "file not found") -> None:
        DataFormatError.__init__(self, path, None, reason)
