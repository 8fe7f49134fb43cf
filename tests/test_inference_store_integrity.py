"""A saved memory is verified on load: shard checksums, counts against the manifest, files named in
every error, and the weights that encoded it (another model's memory is refused unless allowed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batches import tiny_msa
from memories import random_memory

from msa_modeling.inference import MemoryEncoder, MemoryStore


@pytest.fixture
def saved(tmp_path: Path) -> tuple[object, Path]:
    model = tiny_msa(0, top_k_docs=2, chunk_size=4)
    memory = random_memory(0, num_docs=6)
    encoder = MemoryEncoder(model, max_batch_tokens=30, show_progress=False)
    store = encoder.new_store(memory["prefix"])
    encoder.add_documents(store, memory["docs"])
    store.save(tmp_path / "memory", docs_per_shard=4)
    return model, tmp_path / "memory"


def shard_path(directory: Path, index: int = 0) -> Path:
    return directory / json.loads((directory / "manifest.json").read_text())["shards"][index]["file"]


def test_flipped_bytes_in_a_shard_are_caught(saved: tuple[object, Path]) -> None:
    model, directory = saved
    shard = shard_path(directory)
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # tensor bytes, not the header: still loads as safetensors
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}: a document shard does not match its SHA-256"):
        MemoryStore.load(directory, model=model)


def test_truncated_shard_error_names_the_file(saved: tuple[object, Path]) -> None:
    model, directory = saved
    shard = shard_path(directory, 1)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shard.name}: a document shard has 100 bytes"):
        MemoryStore.load(directory, model=model)


def test_manifest_count_that_disagrees_with_the_shard_is_an_error(saved: tuple[object, Path]) -> None:
    model, directory = saved
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][0]["num_docs"] += 1
    manifest["num_docs"] += 1
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="the shard holds {'num_docs': 4}, the manifest says {'num_docs': 5}"):
        MemoryStore.load(directory, model=model)


def test_memory_of_other_weights_of_the_same_shape_is_refused_unless_allowed(saved: tuple[object, Path]) -> None:
    model, directory = saved
    assert MemoryStore.load(directory, model=model).num_docs == 6
    other = tiny_msa(1, top_k_docs=2, chunk_size=4)  # same shape, other weights
    with pytest.raises(ValueError, match="encoded by other weights"):
        MemoryStore.load(directory, model=other)
    assert MemoryStore.load(directory, model=other, allow_other_model=True).num_docs == 6
