"""On-disk shard formats: documents stored once by document, examples stored by reference.

Document shard ``docs/shard-NNNNN/``:
  ``tokens.bin`` raw token ids (dtype in shard.json), ``offsets.npy`` int64 [n+1],
  ``ids.txt`` the corpus's document ids, one a line, ``shard.json`` counts.
Example shard ``examples/shard-NNNNN/``:
  ``memory.npy`` int32 (int64 past 2^31 documents) corpus document indices, ``positive.npy`` uint8 (same length),
  ``memory_offsets.npy`` int64 [E+1], ``tail_tokens.npy``, ``tail_labelled.npy`` uint8,
  ``tail_offsets.npy`` int64 [E+1], ``example_tokens.npy`` int64 [E] assembled lengths,
  ``example_origin.npy`` int64 [E, 2] (source record index, retrieval step), ``id_offsets.npy``
  int64 [E] (memory document i is rendered with ID offset + i; absent in older builds: offset 0),
  ``shard.json`` counts.

A shard is written into a hidden ``.tmp-*`` folder and renamed into place, so a visible
shard folder is always complete, and a killed build leaves only hidden leftovers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

TEMP_PREFIX = ".tmp-"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def shard_name(index: int) -> str:
    """Folder name of shard ``index``."""
    return f"shard-{index:05d}"


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder next to ``final``; rename it to ``final`` on success."""
    temp = final.parent / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir(parents=True)
    try:
        yield temp
        for child in temp.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
        os.rename(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    temp = path.parent / f"{TEMP_PREFIX}{path.name}-{os.getpid()}"
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def remove_stale_temporaries(directory: Path) -> int:
    """Delete leftovers of killed writes under ``directory``; return how many."""
    removed = 0
    if not directory.exists():
        return 0
    for path in directory.rglob(f"{TEMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def finished_shards(directory: Path) -> list[Path]:
    """Complete shard folders in index order."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("shard-"))


def write_document_shard(
    final: Path, token_lists: Sequence[Sequence[int]], doc_ids: Sequence[str], dtype: np.dtype, stats: dict
) -> None:
    """Store tokenised documents of one shard."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((token for tokens in token_lists for token in tokens), dtype=dtype, count=int(offsets[-1]))
    with atomic_directory(final) as temp:
        flat.tofile(temp / "tokens.bin")
        np.save(temp / "offsets.npy", offsets)
        (temp / "ids.txt").write_text("".join(f"{doc_id}\n" for doc_id in doc_ids), encoding="utf-8")
        (temp / "shard.json").write_text(json.dumps({**stats, "dtype": dtype.name}, indent=1))


def write_example_shard(
    final: Path, plans: Sequence, example_tokens: Sequence[int], dtype: np.dtype, stats: dict
) -> None:
    """Store example plans (see ``samples.ExamplePlan``) of one shard."""

    def offsets_of(arrays: Sequence[np.ndarray]) -> np.ndarray:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        return offsets

    def concat(arrays: list[np.ndarray], array_dtype: np.dtype) -> np.ndarray:
        return np.concatenate(arrays).astype(array_dtype) if arrays else np.zeros(0, dtype=array_dtype)

    with atomic_directory(final) as temp:
        memory = concat([p.memory for p in plans], np.dtype(np.int64))
        # Memory references are the bulk of an example shard: 4 bytes each while the corpus allows.
        reference_dtype = (
            np.dtype(np.int32) if not len(memory) or memory.max() < np.iinfo(np.int32).max else memory.dtype
        )
        np.save(temp / "memory.npy", memory.astype(reference_dtype))
        np.save(temp / "positive.npy", concat([p.positive for p in plans], np.dtype(np.uint8)))
        np.save(temp / "memory_offsets.npy", offsets_of([p.memory for p in plans]))
        np.save(temp / "tail_tokens.npy", concat([p.tail_tokens for p in plans], dtype))
        np.save(temp / "tail_labelled.npy", concat([p.tail_labelled for p in plans], np.dtype(np.uint8)))
        np.save(temp / "tail_offsets.npy", offsets_of([p.tail_tokens for p in plans]))
        np.save(temp / "example_tokens.npy", np.asarray(example_tokens, dtype=np.int64))
        np.save(
            temp / "example_origin.npy",
            np.asarray([[p.record_index, p.step] for p in plans], dtype=np.int64).reshape(len(plans), 2),
        )
        np.save(temp / "id_offsets.npy", np.asarray([p.id_offset for p in plans], dtype=np.int64))
        (temp / "shard.json").write_text(json.dumps(stats, indent=1))


def _map(path: Path) -> np.ndarray:
    """A read-only memory map of a .npy file as a plain ndarray (indexing a ``np.memmap``
    goes through Python-level overrides that dominate row assembly)."""
    try:
        return np.load(path, mmap_mode="r").view(np.ndarray)
    except ValueError:  # numpy cannot memory-map an empty array
        return np.load(path)


class DocumentStore:
    """All document shards of a build, addressed by global corpus index.

    Everything is memory-mapped, so the data-parallel ranks and build workers of one machine
    share one copy in the page cache.
    """

    LENGTHS_FILE = "lengths.npy"

    def __init__(self, docs_dir: Path) -> None:
        self.docs_dir = docs_dir
        self.shards = finished_shards(docs_dir)
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        for shard in self.shards:
            dtype = np.dtype(json.loads((shard / "shard.json").read_text())["dtype"])
            size = (shard / "tokens.bin").stat().st_size // dtype.itemsize
            tokens = (
                np.memmap(shard / "tokens.bin", dtype=dtype, mode="r", shape=(size,)).view(np.ndarray)
                if size
                else np.zeros(0, dtype)
            )
            self._tokens.append(tokens)
            self._offsets.append(_map(shard / "offsets.npy"))
        counts = [len(o) - 1 for o in self._offsets]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document: the shared ``lengths.npy`` when the build wrote it."""
        if self._lengths is None:
            path = self.docs_dir / self.LENGTHS_FILE
            mapped = _map(path) if path.is_file() else None
            if mapped is not None and len(mapped) == len(self):
                self._lengths = mapped
            else:
                self._lengths = self.compute_lengths()
        return self._lengths

    def compute_lengths(self) -> np.ndarray:
        """Tokens per document, from the offsets (int32: no document has 2^31 tokens)."""
        if not self._offsets:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([np.diff(offsets).astype(np.int32) for offsets in self._offsets])

    def write_lengths(self) -> None:
        """Store ``lengths.npy`` (atomically) for build workers to share."""
        temp = self.docs_dir / f"{TEMP_PREFIX}{self.LENGTHS_FILE}-{os.getpid()}.npy"
        np.save(temp, self.compute_lengths())
        os.replace(temp, self.docs_dir / self.LENGTHS_FILE)
        self._lengths = None

    def locate(self, index: int) -> tuple[np.ndarray, int, int]:
        """(token array, start, end) of document ``index``."""
        shard = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        local = index - int(self.shard_starts[shard])
        offsets = self._offsets[shard]
        return self._tokens[shard], int(offsets[local]), int(offsets[local + 1])

    def tokens(self, index: int) -> np.ndarray:
        """Token ids of document ``index``."""
        array, start, end = self.locate(index)
        return np.array(array[start:end])

    def doc_ids(self) -> list[str]:
        """The corpus's own ids, in index order."""
        ids: list[str] = []
        for shard in self.shards:
            ids += (shard / "ids.txt").read_text(encoding="utf-8").splitlines()
        return ids


class ExampleShard:
    """One example shard, memory-mapped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.memory = _map(directory / "memory.npy")
        self.positive = _map(directory / "positive.npy")
        self.memory_offsets = np.load(directory / "memory_offsets.npy")
        self.tail_tokens = _map(directory / "tail_tokens.npy")
        self.tail_labelled = _map(directory / "tail_labelled.npy")
        self.tail_offsets = np.load(directory / "tail_offsets.npy")
        self.example_tokens = np.load(directory / "example_tokens.npy")
        self.example_origin = np.load(directory / "example_origin.npy")
        offsets_path = directory / "id_offsets.npy"
        self.id_offsets = (
            np.load(offsets_path) if offsets_path.is_file() else np.zeros(len(self.example_tokens), dtype=np.int64)
        )
        _refuse_id_strides(directory)

    def __len__(self) -> int:
        return len(self.example_tokens)


def _refuse_id_strides(directory: Path) -> None:
    """Shards of builds made with the removed ``memory.id_stride_max`` hold ``id_strides.npy``; with a
    stride other than 1 their rendered IDs can no longer be reproduced, so such a build is refused."""
    strides_path = directory / "id_strides.npy"
    if strides_path.is_file() and bool((np.load(strides_path) != 1).any()):
        raise ValueError(
            f"{strides_path}: this build spaces document IDs by strides (memory.id_stride_max), "
            "which is no longer supported; rebuild it without id_stride_max (--overwrite)"
        )
