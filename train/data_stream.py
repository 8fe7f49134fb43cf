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
from msa_modeling.flops import MicroBatchWork, msa_work

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
    def from_model_config(cls, config: Any) -> LayoutSettings:
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
    work: MicroBatchWork

    def pinned(self) -> MicroBatch:
        """A copy in page-locked memory, so that `to(cuda, non_blocking=True)` is asynchronous."""
        layout = PackedLayout(
            **{
                f.name: value.pin_memory() if isinstance(value, torch.Tensor) else value
                for f in dataclasses.fields(self.layout)
                for value in [getattr(self.layout, f.name)]
            }
        )
        work = dataclasses.replace(self.work, doc_memory_pairs=self.work.doc_memory_pairs.pin_memory())
        return dataclasses.replace(self, input_ids=self.input_ids.pin_memory(), layout=layout, work=work)

    def to(self, device: torch.device | str) -> MicroBatch:
        work = dataclasses.replace(self.work, doc_memory_pairs=self.work.doc_memory_pairs.to(device, non_blocking=True))
        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device, non_blocking=True), layout=self.layout.to(device), work=work
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


class MicroBatchStream:
    """Micro-batches of `rows_per_micro_batch` packed rows for one data-parallel rank, resumable."""

    def __init__(
        self,
        source_weights: dict[str, float],
        row_length: int,
        rows_per_micro_batch: int,
        run_dir: Path,
        layout: LayoutSettings,
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
        )
        self.rows_per_micro_batch = rows_per_micro_batch
        self.layout_settings = layout

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
        return MicroBatch(batch["input_ids"], layout, msa_work(layout))

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
