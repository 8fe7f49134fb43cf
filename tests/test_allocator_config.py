"""Launches give the CUDA allocator expandable segments, and never override the user's own settings."""

from __future__ import annotations

import os

import pytest

from train.distributed import use_expandable_segments


def test_expandable_segments_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    use_expandable_segments()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("variable", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_user_allocator_settings_are_kept(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv(variable, "max_split_size_mb:512")
    use_expandable_segments()
    assert os.environ[variable] == "max_split_size_mb:512"
    other = {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} - {variable}
    assert not any(name in os.environ for name in other)
