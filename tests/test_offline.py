"""Runs stay offline unless the recipe opts in: a socket guard sees no connection attempt."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from data.offline import OFFLINE_ENVIRONMENT, stay_offline


@pytest.fixture
def socket_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every connection attempt of this process is recorded and refused."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # name lookups come first
    yield attempts


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """`stay_offline(False)`, undone after the test."""
    import huggingface_hub.constants as hub_constants

    for name in OFFLINE_ENVIRONMENT:
        monkeypatch.setenv(name, "")  # restored after the test
    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setattr(hub_constants, name, getattr(hub_constants, name))
    datasets_config = pytest.importorskip("datasets.config")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_UPDATE_DOWNLOAD_COUNTS"):
        monkeypatch.setattr(datasets_config, name, getattr(datasets_config, name))
    stay_offline(allow_network=False)


def test_hub_name_is_not_looked_up(offline: None, socket_guard: list[object]) -> None:
    from transformers import AutoConfig

    with pytest.raises(OSError):
        AutoConfig.from_pretrained("Qwen/Qwen3-0.6B")
    assert socket_guard == []


def test_local_datasets_folder_is_read_without_network(
    offline: None, socket_guard: list[object], tmp_path: Path
) -> None:
    import datasets

    from data.readers import load_local_hf_dataset

    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    assert len(load_local_hf_dataset(tmp_path / "ds")) == 2
    assert socket_guard == []


def test_opt_in_leaves_the_environment_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    stay_offline(allow_network=True)
    assert "HF_HUB_OFFLINE" not in __import__("os").environ


def test_the_data_build_command_is_offline_unless_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`python -m data.build` switches the Hub off before it reads a source; `--allow-network` leaves it on."""
    import data.build as build_module

    seen = []
    monkeypatch.setattr(build_module, "stay_offline", lambda allow_network: seen.append(allow_network))
    monkeypatch.setattr(build_module, "build_dataset", lambda *args: (_ for _ in ()).throw(SystemExit(0)))
    config = tmp_path / "source.json"
    config.write_text(
        '{"tokenizer": "tok", "source": {"kind": "records", "path": "r.jsonl", "corpus_path": "c.jsonl"}}'
    )
    for extra in ([], ["--allow-network"]):
        with pytest.raises(SystemExit):
            build_module.main(["--config", str(config), "--output", str(tmp_path / "out"), *extra])
    assert seen == [False, True]
