"""Streaming loader: assembles packed training rows from a finished build.

Row format (int64 tensors of length ``row_length``; the constants are ``msa_modeling.layout``'s):

- ``input_ids``
- ``doc_ids``: -2 prefix, 1..n memory documents, 0 query/answer, -1 padding
- ``example_ids``: 0..E-1 per packed example, -1 padding (padding only at the end)
- ``labels``: input id where the model generates, -100 elsewhere (not shifted)
- ``aux_labels``: 1 on every token of a positive memory document, else 0

Rows carry no positions: the model's position rule (``msa_modeling.layout``) derives them from
``doc_ids`` and ``example_ids`` with the model's own settings.

Order is a pure function of (seed, epoch, rank, world size): each epoch permutes every
dataset's examples, rank r takes every ``world_size``-th of them from position r, and
examples are packed greedily in that order. ``state_dict()`` captures the position between
rows, so a resumed loader yields byte-identical rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from msa_modeling.layout import IGNORE_INDEX, PAD_ID, PREFIX_ID, QUERY_ID

from .errors import OverlongExampleError
from .store import DocumentStore, ExampleShard, finished_shards

logger = logging.getLogger(__name__)

ROW_FIELDS = ("input_ids", "doc_ids", "example_ids", "labels", "aux_labels")
_MIX_BLOCK = 4096


def ensure_open_file_limit(needed: int) -> None:
    """Raise the soft limit on open files so that ``needed`` more memory maps fit.

    Every memory-mapped shard array holds a file descriptor, and a full-size build has a few
    thousand of them, beyond the usual soft limit of 1024.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    wanted = open_now + needed + 256
    if wanted <= soft:
        return
    target = wanted * 2 if hard == resource.RLIM_INFINITY else min(hard, wanted * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logger.warning(
            "the open-file limit (hard %d) is below the %d memory maps needed; build with larger "
            "shards (docs_per_shard, records_per_shard)",
            hard,
            wanted,
        )


class PreparedDataset:
    """A finished build (see ``build.build_dataset``) opened for reading."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no manifest; the build is missing or unfinished")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        # One map per document shard, four per example shard.
        ensure_open_file_limit(self.manifest["document_shards"] + 4 * self.manifest["example_shards"])
        self.docs = DocumentStore(self.path / "docs")
        self.shards = [ExampleShard(p) for p in finished_shards(self.path / "examples")]
        if len(self.shards) != self.manifest["example_shards"]:
            raise ValueError(
                f"{self.path}: manifest lists {self.manifest['example_shards']} example shards, "
                f"found {len(self.shards)}"
            )
        counts = [len(shard) for shard in self.shards]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.example_tokens = (
            np.concatenate([s.example_tokens for s in self.shards]) if self.shards else np.zeros(0, dtype=np.int64)
        )
        template = self.manifest["template_tokens"]
        self.prefix = np.asarray(template["prefix"], dtype=np.int64)
        self.doc_suffix = np.asarray(template["doc_suffix"], dtype=np.int64)
        self.doc_id_prefix = [np.asarray(ids, dtype=np.int64) for ids in template["doc_id_prefix"]]
        self.pad_token_id = int(self.manifest["pad_token_id"])

    def __len__(self) -> int:
        return len(self.example_tokens)

    def _locate(self, index: int) -> tuple[ExampleShard, int]:
        """(shard, index within it) of example ``index``."""
        shard_index = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        return self.shards[shard_index], index - int(self.shard_starts[shard_index])

    def example_parts(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(memory document indices, positive flags, tail tokens, tail labelled flags) of an example."""
        return self._parts(*self._locate(index))

    @staticmethod
    def _parts(shard: ExampleShard, local: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        m0, m1 = int(shard.memory_offsets[local]), int(shard.memory_offsets[local + 1])
        t0, t1 = int(shard.tail_offsets[local]), int(shard.tail_offsets[local + 1])
        return shard.memory[m0:m1], shard.positive[m0:m1], shard.tail_tokens[t0:t1], shard.tail_labelled[t0:t1]

    def example_origin(self, index: int) -> tuple[int, int]:
        """(index of the source record or text, retrieval step) that example ``index`` came from."""
        shard, local = self._locate(index)
        return int(shard.example_origin[local][0]), int(shard.example_origin[local][1])

    def example_id_offset(self, index: int) -> int:
        """The ID offset of example ``index``: memory document i is shown as ID offset + i."""
        shard, local = self._locate(index)
        return int(shard.id_offsets[local])

    def write_example(self, index: int, row: dict[str, np.ndarray], start: int, example_id: int) -> int:
        """Write example ``index`` into ``row`` from ``start``; return the end position."""
        shard, local = self._locate(index)
        memory, positive, tail_tokens, tail_labelled = self._parts(shard, local)
        id_offset = int(shard.id_offsets[local])
        input_ids, doc_ids = row["input_ids"], row["doc_ids"]
        position = start
        prefix_length = len(self.prefix)
        if prefix_length:
            input_ids[position : position + prefix_length] = self.prefix
            doc_ids[position : position + prefix_length] = PREFIX_ID
            position += prefix_length
        suffix_length = len(self.doc_suffix)
        for memory_id, (doc, is_positive) in enumerate(zip(memory.tolist(), positive.tolist()), start=1):
            id_prefix = self.doc_id_prefix[id_offset + memory_id]
            tokens, begin, end = self.docs.locate(doc)
            head = len(id_prefix)
            body = end - begin
            length = head + body + suffix_length
            input_ids[position : position + head] = id_prefix
            input_ids[position + head : position + head + body] = tokens[begin:end]
            if suffix_length:
                input_ids[position + head + body : position + length] = self.doc_suffix
            doc_ids[position : position + length] = memory_id
            if is_positive:
                row["aux_labels"][position : position + length] = 1
            position += length
        tail_length = len(tail_tokens)
        input_ids[position : position + tail_length] = tail_tokens
        doc_ids[position : position + tail_length] = QUERY_ID
        labelled = np.asarray(tail_labelled, dtype=bool)
        row["labels"][position : position + tail_length] = np.where(
            labelled, input_ids[position : position + tail_length], IGNORE_INDEX
        )
        position += tail_length
        row["example_ids"][start:position] = example_id
        return position


class PackedRowLoader:
    """Yields packed rows (dicts of int64 tensors) for one data-parallel rank.

    ``datasets`` are build folders or opened ``PreparedDataset``s, mixed by ``weights``
    (each draw picks a dataset with probability proportional to its weight among those not
    yet exhausted). ``max_epochs=None`` streams forever, reshuffling every epoch.
    ``overlong`` decides what happens to an example longer than a row: ``skip`` logs and
    counts it (``stats``), ``error`` raises ``OverlongExampleError``; it is never cut.
    After each row, ``last_row_examples`` lists its examples as (dataset index, example index),
    for provenance (``PreparedDataset.example_origin``).
    """

    def __init__(
        self,
        datasets: Sequence[str | Path | PreparedDataset] | str | Path | PreparedDataset,
        row_length: int,
        *,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_epochs: int | None = None,
        overlong: Literal["skip", "error"] = "skip",
    ) -> None:
        if isinstance(datasets, (str, Path, PreparedDataset)):
            datasets = [datasets]
        self.datasets = [d if isinstance(d, PreparedDataset) else PreparedDataset(d) for d in datasets]
        tokenizers = {d.manifest["tokenizer_sha256"] for d in self.datasets}
        if len(tokenizers) > 1:
            raise ValueError(
                "datasets were built with different tokenizers; their token ids cannot be mixed: "
                + ", ".join(f"{d.path} ({d.manifest['tokenizer_sha256'][:12]})" for d in self.datasets)
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        weights = list(weights) if weights is not None else [1.0] * len(self.datasets)
        if len(weights) != len(self.datasets) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError("weights must be one non-negative number per dataset, not all zero")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.row_length = row_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.overlong = overlong
        self._order_cache: dict[int, tuple[int, np.ndarray]] = {}
        self._mix_cache: tuple[int, np.ndarray] | None = None
        self._state = self._initial_state()
        self.last_row_examples: list[tuple[int, int]] = []

    def _initial_state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "row_length": self.row_length,
            "sources": [{"epoch": 0, "cursor": 0} for _ in self.datasets],
            "draws": 0,
            "pending": None,
            "rows": 0,
            "examples": 0,
            "overlong_skipped": 0,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position between rows; a plain JSON-able dict."""
        return json.loads(json.dumps(self._state))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from a loader with the same datasets, seed, rank and row length)."""
        for key in ("seed", "rank", "world_size", "row_length"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state was saved with {key}={state[key]}, this loader has {getattr(self, key)}")
        if len(state["sources"]) != len(self.datasets):
            raise ValueError("state was saved for a different number of datasets")
        self._check_positions(state)
        self._state = json.loads(json.dumps(state))

    def _check_positions(self, state: dict[str, Any]) -> None:
        """Counters are non-negative integers and every cursor lies inside its epoch's order."""

        def count(value: Any, key: str) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"loader state: {key} = {value!r} is not a non-negative integer")
            return value

        for key in ("draws", "rows", "examples", "overlong_skipped"):
            count(state[key], key)
        for source, position in enumerate(state["sources"]):
            epoch = count(position["epoch"], f"sources[{source}].epoch")
            cursor = count(position["cursor"], f"sources[{source}].cursor")
            available = len(self._rank_order(source, epoch))
            if cursor > available:
                raise ValueError(
                    f"loader state: sources[{source}].cursor = {cursor} is past the end of "
                    f"{self.datasets[source].path} ({available} examples for this rank per epoch)"
                )
        pending = state["pending"]
        if pending is not None:
            source, example = (count(value, "pending") for value in pending)
            if source >= len(self.datasets) or example >= len(self.datasets[source]):
                raise ValueError(f"loader state: pending = {pending} names no example")

    @property
    def stats(self) -> dict[str, int]:
        """Rows and examples produced, overlong examples skipped."""
        return {key: self._state[key] for key in ("rows", "examples", "overlong_skipped")}

    def _rank_order(self, source: int, epoch: int) -> np.ndarray:
        cached = self._order_cache.get(source)
        if cached is None or cached[0] != epoch:
            permutation = np.random.default_rng([self.seed, source, epoch]).permutation(len(self.datasets[source]))
            cached = (epoch, permutation[self.rank :: self.world_size])
            self._order_cache[source] = cached
        return cached[1]

    def _uniform(self, draw: int) -> float:
        block = draw // _MIX_BLOCK
        if self._mix_cache is None or self._mix_cache[0] != block:
            self._mix_cache = (block, np.random.default_rng([self.seed, 1 << 20, block]).random(_MIX_BLOCK))
        return float(self._mix_cache[1][draw % _MIX_BLOCK])

    def _exhausted(self, source: int) -> bool:
        state = self._state["sources"][source]
        if len(self._rank_order(source, state["epoch"])) == 0:
            return True
        return self.max_epochs is not None and state["epoch"] >= self.max_epochs

    def _next_example(self) -> tuple[int, int] | None:
        while True:
            active = np.array([w > 0 and not self._exhausted(s) for s, w in enumerate(self.weights)])
            if not active.any():
                return None
            if len(self.datasets) == 1:
                source = 0
            else:
                weights = np.where(active, self.weights, 0.0)
                cumulative = np.cumsum(weights / weights.sum())
                source = int(
                    min(
                        np.searchsorted(cumulative, self._uniform(self._state["draws"]), side="right"),
                        len(cumulative) - 1,
                    )
                )
                self._state["draws"] += 1
            state = self._state["sources"][source]
            order = self._rank_order(source, state["epoch"])
            if state["cursor"] >= len(order):
                state["epoch"] += 1
                state["cursor"] = 0
                continue
            example = int(order[state["cursor"]])
            state["cursor"] += 1
            return source, example

    def next_row(self) -> dict[str, torch.Tensor] | None:
        """The next packed row, or None when every dataset is exhausted."""
        length = self.row_length
        row = {
            "input_ids": np.zeros(length, dtype=np.int64),
            "doc_ids": np.full(length, PAD_ID, dtype=np.int64),
            "example_ids": np.full(length, -1, dtype=np.int64),
            "labels": np.full(length, IGNORE_INDEX, dtype=np.int64),
            "aux_labels": np.zeros(length, dtype=np.int64),
        }
        position = 0
        packed = 0
        pad_token_id = None
        self.last_row_examples = []
        consecutive_overlong = 0
        while True:
            pending = self._state["pending"]
            self._state["pending"] = None
            item = tuple(pending) if pending is not None else self._next_example()
            if item is None:
                break
            source, example = item
            dataset = self.datasets[source]
            example_length = int(dataset.example_tokens[example])
            if example_length > length:
                self._report_overlong(source, example, example_length)
                consecutive_overlong += 1
                if consecutive_overlong > sum(len(d) for d in self.datasets):
                    raise OverlongExampleError(f"no example fits a row of {length} tokens")
                continue
            consecutive_overlong = 0
            if position + example_length > length:
                self._state["pending"] = [source, example]
                break
            position = dataset.write_example(example, row, position, packed)
            pad_token_id = dataset.pad_token_id if pad_token_id is None else pad_token_id
            self.last_row_examples.append((source, example))
            packed += 1
        if packed == 0:
            return None
        row["input_ids"][position:] = pad_token_id
        self._state["rows"] += 1
        self._state["examples"] += packed
        return {name: torch.from_numpy(row[name]) for name in ROW_FIELDS}

    def _report_overlong(self, source: int, example: int, example_length: int) -> None:
        message = (
            f"example {example} of {self.datasets[source].path} has {example_length} tokens, more than the "
            f"row length {self.row_length}"
        )
        if self.overlong == "error":
            raise OverlongExampleError(message)
        self._state["overlong_skipped"] += 1
        logger.warning("skipping overlong example (never cut): %s", message)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while (row := self.next_row()) is not None:
            yield row


def stack_rows(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A [batch, row_length] batch from rows of equal length."""
    return {name: torch.stack([row[name] for row in rows]) for name in ROW_FIELDS}
