"""Launches give the CUDA allocator expandable segments, and never override the user's own settings."""

from __future__ import annotations

import os

import pytest

from train.distributed import ALLOCATOR_VARIABLES, use_expandable_segments


def clear_allocator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_expandable_segments_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_allocator_settings(monkeypatch)
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("variable", ALLOCATOR_VARIABLES)
def test_user_allocator_settings_are_kept(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    clear_allocator_settings(monkeypatch)
    monkeypatch.setenv(variable, "max_split_size_mb:512")
    use_expandable_segments()
    assert os.environ[variable] == "max_split_size_mb:512"
    assert not any(name in os.environ for name in ALLOCATOR_VARIABLES if name != variable)
