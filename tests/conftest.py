"""Fixtures shared by several test modules. Helpers that are plain functions live in their own
modules beside this one (`batches`, `memories`, `data_fixtures`, `train_runs`, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from data_fixtures import train_sentencepiece
from train_runs import single_process_world


@pytest.fixture(scope="module")
def context() -> Iterator[object]:
    """A world of one process for in-process trainer tests (a `DistributedContext`)."""
    with single_process_world() as world:
        yield world


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small sentencepiece model trained on the spot, for data builds."""
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))
