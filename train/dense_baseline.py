"""Plain DeepSpeed + Hugging Face training of a stage's dense backbone, for throughput comparison.

The same rows (row length, micro/global batch), the same DeepSpeed config (ZeRO stage, bf16,
clipping, activation checkpointing) and the same accounting (tokens/s per device, MFU) as
the MSA stage, but the unmodified backbone reads each row as one causal sequence, every
token labelled. What differs between the two runs is then the MSA model itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from data.loader import PackedRowLoader, stack_rows
from msa_modeling.flops import FlopModel, dense_work

from .config import Recipe, StageConfig
from .data_stream import source_build_dir
from .distributed import DistributedContext
from .engine import batch_geometry, deepspeed_config, initialize_engine
from .model_setup import DTYPES, random_backbone
from .schedule import LRMultiplier
from .throughput import memory_gb
from .tracking import MetricsLogger
from .trainer import total_steps

logger = logging.getLogger(__name__)


def dense_backbone(recipe: Recipe, vocab_size: int, device: torch.device | None = None) -> torch.nn.Module:
    """The recipe's backbone as a plain Hugging Face causal LM (random for an inline config, drawn on `device`)."""
    dtype = DTYPES[recipe.model.dtype]
    if recipe.model.inline_config is not None:
        return random_backbone(recipe.model.inline_config, vocab_size, recipe.run.seed, dtype, device)
    return AutoModelForCausalLM.from_pretrained(recipe.model.backbone, dtype=dtype)


def run_dense_baseline(
    recipe: Recipe, stage: StageConfig, vocab_size: int, steps: int | None, context: DistributedContext
) -> Path:
    """Train the dense backbone on the stage's rows for `steps` (default: the stage budget);
    returns the folder of its metrics.jsonl."""
    model = dense_backbone(recipe, vocab_size, context.device)
    if (stage.activations or recipe.activations).checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    flops = FlopModel.from_model(model)
    rows_per_micro, accumulation = batch_geometry(stage, context.world_size)
    steps = steps or total_steps(stage)
    optimizer = stage.optimizer
    groups = [
        {"name": "all", "params": list(model.parameters()), "lr": optimizer.lr, "weight_decay": optimizer.weight_decay}
    ]
    engine, _ = initialize_engine(
        model,
        groups,
        deepspeed_config(recipe, stage, rows_per_micro, accumulation, context.world_size, context.on_cpu),
        LRMultiplier.from_config(stage.schedule, steps),
    )
    run_dir = Path(recipe.run.output_dir)
    loader = PackedRowLoader(
        [source_build_dir(run_dir, name) for name in stage.sources],
        stage.row_length,
        weights=list(stage.sources.values()),
        seed=recipe.run.seed,
        rank=context.rank,
        world_size=context.world_size,
    )
    out_dir = run_dir / "dense_baseline" / stage.name
    metrics = MetricsLogger(out_dir, "disabled", recipe.tracking.project, "", {}, None) if context.is_main else None
    for step in tqdm(range(1, steps + 1), desc=f"dense {stage.name}", disable=not context.is_main):
        record = dense_step(engine, loader, rows_per_micro, accumulation, context.device, flops)
        tokens = accumulation * rows_per_micro * stage.row_length
        record.update(
            step=step,
            tokens_per_s_per_device=tokens / record["step_seconds"],
            mfu=record.pop("flops") / record["step_seconds"] / recipe.tracking.peak_flops_per_device,
            memory_gb=memory_gb(context.device),
        )
        if metrics is not None:
            metrics.log(record)
    logger.info("dense baseline of stage %s: %d steps, metrics in %s", stage.name, steps, out_dir)
    return out_dir


def dense_step(
    engine: Any,
    loader: PackedRowLoader,
    rows_per_micro: int,
    accumulation: int,
    device: torch.device,
    flop_model: FlopModel,
) -> dict[str, float]:
    """One optimizer step of plain next-token training over whole rows (each row one causal sequence)."""
    started = time.perf_counter()
    total = torch.zeros((), device=device)
    flops = 0.0
    for _ in range(accumulation):
        rows = stack_rows([loader.next_row() for _ in range(rows_per_micro)])
        flops += flop_model.training_flops(dense_work(rows["doc_ids"]))
        input_ids = rows["input_ids"].to(device)
        loss = engine(input_ids=input_ids, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        total += loss.detach()
    torch.distributed.all_reduce(total)
    loss_value = total.item() / accumulation / torch.distributed.get_world_size()
    return {"loss": loss_value, "step_seconds": time.perf_counter() - started, "flops": flops}
