"""Streaming loader: rank shards, byte-exact resume, per-epoch reshuffle, mixing, overlong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_fixtures import synthetic_build, train_sentencepiece

from data.errors import OverlongExampleError
from data.loader import ROW_FIELDS, PackedRowLoader

ROW_LENGTH = 1024


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sp_model = train_sentencepiece(tmp_path_factory.mktemp("sp"))
    root = tmp_path_factory.mktemp("builds")
    synthetic_build(
        root / "needles",
        sp_model,
        "retrieval",
        {"generator": "needles", "kind": "single", "num_samples": 40, "seed": 1, "haystack_docs": 4},
        memory={"memory_tokens": 300, "max_memory_docs": 32},
    )
    synthetic_build(
        root / "kv",
        sp_model,
        "qa",
        {"generator": "kv_facts", "num_facts": 50, "num_queries": 30, "seed": 2},
        memory={"memory_tokens": 250, "max_memory_docs": 32},
    )
    return {"needles": root / "needles", "kv": root / "kv"}


def examples_seen(loader: PackedRowLoader) -> list[tuple[int, int]]:
    seen = []
    for _ in loader:
        seen += loader.last_row_examples
    return seen


def row_bytes(row: dict[str, torch.Tensor]) -> bytes:
    return b"".join(row[name].numpy().tobytes() for name in ROW_FIELDS)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_everything(builds: dict[str, Path], world_size: int) -> None:
    per_rank = [
        examples_seen(
            PackedRowLoader(builds["needles"], ROW_LENGTH, seed=5, rank=rank, world_size=world_size, max_epochs=1)
        )
        for rank in range(world_size)
    ]
    total = len(PackedRowLoader(builds["needles"], ROW_LENGTH).datasets[0])
    everything = [example for rank in per_rank for example in rank]
    assert len(everything) == len(set(everything)) == total
    assert {example for _, example in everything} == set(range(total))


def test_packing_fills_rows_with_several_examples(builds: dict[str, Path]) -> None:
    loader = PackedRowLoader(builds["needles"], ROW_LENGTH, max_epochs=1)
    counts = [int(row["example_ids"].max()) + 1 for row in loader]
    assert max(counts) >= 2
    assert sum(counts) == loader.stats["examples"] == len(loader.datasets[0])


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_resume_from_state_dict_is_byte_exact(builds: dict[str, Path], stop_after: int) -> None:
    def make() -> PackedRowLoader:
        return PackedRowLoader(
            [builds["needles"], builds["kv"]],
            ROW_LENGTH,
            weights=[0.7, 0.3],
            seed=11,
            rank=1,
            world_size=2,
            max_epochs=3,
        )

    uninterrupted = [row_bytes(row) for row in make()]
    assert len(uninterrupted) > stop_after + 5
    first = make()
    head = [row_bytes(first.next_row()) for _ in range(stop_after)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = make()
    resumed.load_state_dict(state)
    tail = [row_bytes(row) for row in resumed]
    assert head + tail == uninterrupted


def test_state_from_another_rank_is_refused(builds: dict[str, Path]) -> None:
    state = PackedRowLoader(builds["needles"], ROW_LENGTH, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="rank"):
        PackedRowLoader(builds["needles"], ROW_LENGTH, rank=1, world_size=2).load_state_dict(state)


def test_seed_decides_order_and_epochs_reshuffle(builds: dict[str, Path]) -> None:
    def epochs(seed: int) -> list[list[int]]:
        loader = PackedRowLoader(builds["needles"], ROW_LENGTH, seed=seed, max_epochs=2)
        seen = [example for _, example in examples_seen(loader)]
        half = len(seen) // 2
        return [seen[:half], seen[half:]]

    first, second = epochs(3)
    assert sorted(first) == sorted(second) and first != second
    assert epochs(3) == [first, second]
    assert epochs(4)[0] != first


def test_mixing_follows_weights(builds: dict[str, Path]) -> None:
    loader = PackedRowLoader([builds["needles"], builds["kv"]], 4096, weights=[0.8, 0.2], seed=0)
    sources = []
    while len(sources) < 400:
        loader.next_row()
        sources += [source for source, _ in loader.last_row_examples]
    share = sources[:400].count(0) / 400
    assert 0.72 < share < 0.88
    only_kv = PackedRowLoader([builds["needles"], builds["kv"]], 4096, weights=[0.0, 1.0], max_epochs=1)
    assert {source for source, _ in examples_seen(only_kv)} == {1}


def test_overlong_example_is_reported_not_cut(builds: dict[str, Path]) -> None:
    lengths = PackedRowLoader(builds["needles"], ROW_LENGTH).datasets[0].example_tokens
    row_length = int(sorted(lengths)[len(lengths) // 2])
    loader = PackedRowLoader(builds["needles"], row_length, max_epochs=1)
    rows = list(loader)
    overlong = int((lengths > row_length).sum())
    assert overlong > 0 and loader.stats["overlong_skipped"] == overlong
    assert loader.stats["examples"] == len(lengths) - overlong
    for row in rows:
        assert (row["doc_ids"] != -1).sum() <= row_length
    strict = PackedRowLoader(builds["needles"], row_length, max_epochs=1, overlong="error")
    with pytest.raises(OverlongExampleError, match="tokens, more than the row length"):
        list(strict)


def test_builds_with_different_tokenizers_are_not_mixed(builds: dict[str, Path], tmp_path: Path) -> None:
    other = train_sentencepiece(tmp_path, vocab_size=500)
    synthetic_build(
        tmp_path / "other",
        other,
        "retrieval",
        {"generator": "needles", "kind": "single", "num_samples": 4, "seed": 1, "haystack_docs": 4},
    )
    with pytest.raises(ValueError, match="different tokenizers"):
        PackedRowLoader([builds["needles"], tmp_path / "other"], ROW_LENGTH)


def test_open_file_limit_is_raised_for_many_shards() -> None:
    import resource

    from data.loader import ensure_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip("hard open-file limit too low to test raising the soft one")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        ensure_open_file_limit(3000)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 3000
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
