"""The trainer's data path: data builds per recipe source, and micro-batches with their layout.

Rows come from `data` (pre-tokenised builds read by `PackedRowLoader`). The
`PackedLayout` of each micro-batch is built here, on the CPU, so that the training step on
the accelerator never waits for the host-synchronising index computations it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.build import BuildConfig, build_dataset
from data.loader import PackedRowLoader, stack_rows
from msa_modeling import PackedLayout, build_packed_layout
from msa_modeling.layout import ROLE_PREFIX, ROLE_QUERY

from .config import Recipe


@dataclass
class LayoutSettings:
    """The model-config fields that decide how rows become a `PackedLayout`."""

    chunk_size: int
    query_position_offset: int
    routing_tokens: str
    document_positions: bool
    require_routing_tokens: bool

    @classmethod
    def from_model_config(cls, config: Any) -> "LayoutSettings":
        return cls(
            chunk_size=config.chunk_size,
            query_position_offset=config.query_position_offset,
            routing_tokens=config.routing_tokens,
            document_positions=config.document_positions,
            require_routing_tokens=bool(config.router_layers),
        )


@dataclass
class MicroBatch:
    """One micro-batch: token ids and layout on the CPU, plus what MFU accounting needs."""

    input_ids: torch.Tensor
    layout: PackedLayout
    token_pairs: int  # (query, key) pairs among the row's own tokens, per layer
    memory_pairs: int  # expected (query token, pooled chunk) pairs, per router layer

    def pinned(self) -> "MicroBatch":
        """A copy in page-locked memory, so that `to(cuda, non_blocking=True)` is asynchronous."""
        layout = PackedLayout(**{
            f.name: value.pin_memory() if isinstance(value, torch.Tensor) else value
            for f in dataclasses.fields(self.layout)
            for value in [getattr(self.layout, f.name)]
        })
        return dataclasses.replace(self, input_ids=self.input_ids.pin_memory(), layout=layout)

    def to(self, device: torch.device | str) -> "MicroBatch":
        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device, non_blocking=True), layout=self.layout.to(device)
        )


def source_build_dir(run_dir: Path, source_name: str) -> Path:
    return run_dir / "data" / source_name


def build_config_for(recipe: Recipe, source_name: str, tokenizer_dir: Path) -> BuildConfig:
    """The data package's build config of one recipe source, pointed at the run's tokenizer."""
    values = dict(recipe.data.sources[source_name])
    values["tokenizer"] = str(tokenizer_dir)
    values.setdefault("seed", recipe.run.seed)
    return BuildConfig.from_dict(values)


def prepare_sources(recipe: Recipe, source_names: list[str], run_dir: Path, tokenizer_dir: Path) -> None:
    """Build (or finish, or reuse) the pre-tokenised data of each named source. Rank 0 only."""
    for name in source_names:
        build_dataset(build_config_for(recipe, name, tokenizer_dir), source_build_dir(run_dir, name))


def attention_pairs(layout: PackedLayout, top_k_docs: int) -> tuple[int, int]:
    """(token pairs per layer, expected memory pairs per router layer) of a micro-batch.

    Token pairs: causal pairs within each attention segment, plus every query token of an
    example seeing that example's prefix. Memory pairs: each query token sees the chunks of
    min(k, docs) selected documents, estimated as that share of the example's chunks.
    """
    segments = layout.token_segment[layout.token_segment >= 0]
    sizes = torch.bincount(segments).double()
    token_pairs = float((sizes * (sizes + 1) / 2).sum())
    examples = max(layout.num_examples, 1)
    valid = layout.token_example >= 0
    example = layout.token_example[valid]
    role = layout.role[valid]
    query_tokens = torch.bincount(example[role == ROLE_QUERY], minlength=examples).double()
    prefix_tokens = torch.bincount(example[role == ROLE_PREFIX], minlength=examples).double()
    token_pairs += float((query_tokens * prefix_tokens).sum())
    chunks = torch.bincount(layout.chunk_example, minlength=examples).double()
    docs = torch.bincount(layout.doc_example, minlength=examples).double()
    selected_share = torch.where(docs > 0, docs.clamp(max=top_k_docs) / docs.clamp(min=1), torch.zeros_like(docs))
    memory_pairs = float((query_tokens * chunks * selected_share).sum())
    return int(token_pairs), int(memory_pairs)


class MicroBatchStream:
    """Micro-batches of `rows_per_micro_batch` packed rows for one data-parallel rank, resumable."""

    def __init__(
        self,
        source_weights: dict[str, float],
        row_length: int,
        rows_per_micro_batch: int,
        run_dir: Path,
        layout: LayoutSettings,
        top_k_docs: int,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        names = list(source_weights)
        self.loader = PackedRowLoader(
            [source_build_dir(run_dir, name) for name in names],
            row_length,
            weights=[source_weights[name] for name in names],
            seed=seed,
            rank=rank,
            world_size=world_size,
            query_position_offset=layout.query_position_offset,
        )
        self.rows_per_micro_batch = rows_per_micro_batch
        self.layout_settings = layout
        self.top_k_docs = top_k_docs

    def next(self) -> MicroBatch:
        rows = []
        for _ in range(self.rows_per_micro_batch):
            row = self.loader.next_row()
            if row is None:
                raise RuntimeError("the data loader ran dry; it streams forever unless max_epochs is set")
            rows.append(row)
        batch = stack_rows(rows)
        settings = self.layout_settings
        layout = build_packed_layout(
            batch["doc_ids"],
            chunk_size=settings.chunk_size,
            query_position_offset=settings.query_position_offset,
            example_ids=batch["example_ids"],
            labels=batch["labels"],
            aux_labels=batch["aux_labels"],
            routing_tokens=settings.routing_tokens,
            document_positions=settings.document_positions,
            require_routing_tokens=settings.require_routing_tokens,
        )
        token_pairs, memory_pairs = attention_pairs(layout, self.top_k_docs)
        return MicroBatch(batch["input_ids"], layout, token_pairs, memory_pairs)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
