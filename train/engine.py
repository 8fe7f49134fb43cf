"""The DeepSpeed engine of a stage: config dictionary and initialisation."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
from peft import PeftModel
from torch.optim.lr_scheduler import LambdaLR

from .config import Recipe, StageConfig
from .schedule import LRMultiplier


def batch_geometry(stage: StageConfig, world_size: int) -> tuple[int, int]:
    """(rows per micro-batch, gradient-accumulation steps) from the stage's token batch sizes."""
    rows_per_micro = stage.micro_batch_tokens // stage.row_length
    per_pass = stage.micro_batch_tokens * world_size
    if stage.global_batch_tokens % per_pass:
        raise ValueError(
            f"stage {stage.name}: global_batch_tokens {stage.global_batch_tokens} is not a multiple of "
            f"micro_batch_tokens x ranks = {stage.micro_batch_tokens} x {world_size}"
        )
    return rows_per_micro, stage.global_batch_tokens // per_pass


def deepspeed_config(
    recipe: Recipe, stage: StageConfig, rows_per_micro: int, accumulation: int, world_size: int, on_cpu: bool
) -> dict[str, Any]:
    """The DeepSpeed JSON config of a stage (ZeRO stage, offload, bf16, clipping, AdamW)."""
    ds = recipe.deepspeed
    optimizer = stage.optimizer
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        # Without a zero.Init context DeepSpeed still swaps torch.nn.functional.linear, process-wide,
        # for its own autograd function. On one H100 (1.2B MSA model, 8K rows) that function's
        # Python backward alone took 0.44 s of host time per optimizer step of 2.9 s; the plain
        # linear is what the model was written for, and every decoder layer is gathered whole
        # (`zero3_leaf_layers`), so nothing needs the swap.
        zero["memory_efficient_linear"] = False
    zero.update(ds.zero_config)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if ds.offload_params:
        if ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    torch_adam = on_cpu if ds.torch_adam is None else ds.torch_adam
    # DeepSpeed builds torch's AdamW with foreach=None, which on a GPU is the multi-tensor path: about
    # eight passes over the fp32 master weights and moments (some 80 bytes moved per parameter, and
    # a temporary the size of the weights), where the fused kernel makes one (28 bytes). On a 2-core
    # CPU, 50M fp32 parameters: 137 ms a step against 31 ms. DeepSpeed hands extra keys to AdamW.
    # CPU runs (tests, the CPU experiments) keep the multi-tensor path their recorded results used:
    # the kernels round differently, and a short CPU experiment can tip on that.
    adam_kernel = {"fused": True} if torch_adam and not on_cpu else {}
    bf16 = recipe.model.dtype == "bfloat16"
    return {
        "train_micro_batch_size_per_gpu": rows_per_micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": rows_per_micro * accumulation * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "zero_optimization": zero,
        # With bf16 the overflow check is what lets a non-finite gradient skip the update.
        "bf16": {"enabled": bf16, "check_grad_overflow": True} if bf16 else {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optimizer.lr,
                "betas": list(optimizer.betas),
                "eps": optimizer.eps,
                "weight_decay": optimizer.weight_decay,
                "torch_adam": torch_adam,
                "adam_w_mode": True,
                **adam_kernel,
            },
        },
        "steps_per_print": 10**9,  # the trainer logs; DeepSpeed's own prints would interleave
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer, on by default, synchronises the device at the start of every
        # forward and the end of every engine.step(): two waits per micro-batch, each of which
        # drains the queued kernels so that the next forward's launches run with the GPU idle. The
        # trainer measures its own throughput (one wait per optimizer step, for the metrics).
        "timers": {"throughput": {"enabled": False}},
    }


def zero3_leaf_layers(model: torch.nn.Module) -> None:
    """Make each decoder layer one ZeRO-3 unit: its parameters are gathered and released together.

    By default ZeRO-3 hooks every submodule (about 13 per MSA layer: projections, norms, MLP), and
    each hook is Python on the critical path: on one H100 a 1.2B MSA model (8K rows, eager, 4 rows
    a step) spent 0.33 s of host time per 2.9-s step in the module hooks alone, with the GPU busy a
    third of the time. With the layers as leaves there are about 20 hooked modules in all. The
    hooks inside the layers were also what `torch.compile` kept recompiling on (it hit its limit
    of 64 and fell back to eager). The cost: a whole layer's parameters are live at once (about
    0.4 GB in bf16 for the Qwen3-4B shape), which is what ZeRO-3's prefetch of the next layer
    holds anyway.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model  # a LoRA stage's model
    layer_types = sorted({type(layer) for layer in base.model.layers}, key=lambda t: t.__name__)
    deepspeed.utils.set_z3_leaf_modules(model, layer_types)


def initialize_engine(
    model: torch.nn.Module,
    param_groups: list[dict[str, Any]],
    config: dict[str, Any],
    multiplier: LRMultiplier,
) -> tuple[Any, LambdaLR]:
    """A DeepSpeed engine over `model` with the groups' own LRs scaled by `multiplier` per step."""
    if config["zero_optimization"]["stage"] == 3:
        zero3_leaf_layers(model)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups,
        config=config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, multiplier),
    )
    return engine, scheduler
