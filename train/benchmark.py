"""Trainer benchmark: one stage of a recipe, run by the trainer itself, against two baselines.

    python launch/bench_trainer.py RECIPE --stage NAME [--steps 20] [--warmup 5] [key=value ...]
    deepspeed --num_gpus 2 launch/bench_trainer.py RECIPE --stage NAME ...

Three configurations on the same rows, the same card and the same FLOP accounting
(`msa_modeling.flops`), one after the other in one process:
  trainer:    `StageTrainer`, exactly what `launch/pretrain.py` runs: the DeepSpeed engine with the
              recipe's ZeRO stage, bf16 and fp32 master weights, the prefetching data loader,
              metrics and logging every step (no checkpoints, evaluation or export);
  standalone: the same model, layer execution (checkpointing, compile) and micro-batches in a bare
              step: bf16 weights, torch's fused AdamW, no DeepSpeed, rows built before timing;
  dense:      the plain Hugging Face backbone under the same DeepSpeed config on the same rows
              (`train/dense_baseline.py`).
Reports medians after `--warmup` steps of tokens/s per device, MFU, step time and peak memory,
prints a table and writes JSON.

`--shape qwen3-4b` swaps the recipe's backbone for a random one of that shape, and `--synthetic`
the stage's sources for synthetic retrieval rows that fill the stage's row length: so the paper's
recipe can be measured without its checkpoint and corpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch

from data.tokenization import load_tokenizer
from msa_modeling.flops import FlopModel

from .config import BudgetConfig, EvalConfig, Recipe, RecipeError, StageConfig, TinyTokenizerConfig, load_recipe
from .data_stream import LayoutSettings, MicroBatch, MicroBatchStream
from .dense_baseline import run_dense_baseline
from .distributed import DistributedContext, allocator_settings, init_distributed
from .engine import batch_geometry
from .model_setup import load_stage_model, parameter_groups
from .runner import configure_logging, prepare_run
from .tracking import read_metrics
from .trainer import StageTrainer, configure_layer_execution, stage_dir, weighted_loss

logger = logging.getLogger(__name__)

CONFIGS = ("standalone", "trainer", "dense")

# Qwen3-4B-Instruct-2507's shape (the paper's backbone), for a random backbone of that size.
QWEN3_4B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0},
)
SHAPES: dict[str, dict[str, Any]] = {"qwen3-4b": QWEN3_4B}  # `--shape` choices (Qwen3 configuration fields)


def synthetic_source(row_length: int) -> dict[str, Any]:
    """A build config of synthetic key-value retrieval examples, one filling each row: a memory of
    ~90-token fact documents up to the row length, then a question and its answer."""
    memory_tokens = row_length - 256
    facts = max(1000, memory_tokens // 40)  # documents to spare, so every memory fills up
    return {
        "source": {
            "kind": "synthetic",
            "synthetic": {
                "generator": "kv_facts",
                "num_facts": facts,
                "num_queries": 64,
                "seed": 0,
                "filler_words": 60,
            },
        },
        "sample_kind": "retrieval",
        "memory": {"memory_tokens": memory_tokens, "max_memory_docs": facts},
        "max_example_tokens": row_length,
    }


def benchmark_recipe(
    recipe: Recipe,
    stage_name: str,
    steps: int,
    accumulation: int | None,
    world_size: int,
    shape: str | None,
    layers: int | None,
    synthetic: bool,
    run_dir: Path,
) -> tuple[Recipe, StageConfig]:
    """The recipe as the benchmark runs it: the stage alone, from its backbone, for `steps` steps, with
    no checkpoints, evaluation or W&B, in `run_dir`."""
    stage = recipe.stage(stage_name)
    if shape is not None:
        inline = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
        recipe.model = dataclasses.replace(recipe.model, backbone=None, inline_config=inline)
    if recipe.tokenizer.path is not None and not Path(recipe.tokenizer.path).exists():
        if not synthetic:
            raise RecipeError(
                f"tokenizer.path {recipe.tokenizer.path!r}: no such folder; pass --synthetic to "
                "measure on synthetic rows with a tokenizer trained on them"
            )
        recipe.tokenizer = dataclasses.replace(
            recipe.tokenizer, path=None, train_tiny=TinyTokenizerConfig(vocab_size=4096, sample_records=2000)
        )
    if synthetic:
        name = f"synthetic_{stage.row_length}"
        recipe.data.sources = {name: synthetic_source(stage.row_length)}
        stage.sources = {name: 1.0}
    if accumulation is not None:
        stage.global_batch_tokens = stage.micro_batch_tokens * world_size * accumulation
    stage.budget = BudgetConfig(steps=steps)
    stage.init_from = "backbone"
    stage.checkpoint_every_steps = 10**9
    stage.eval = EvalConfig()
    recipe.stages = [stage]
    recipe.checkpoint.save_final = False
    recipe.tracking.wandb = "disabled"
    recipe.tracking.log_every_steps = 1
    recipe.tracking.progress_bar = False
    recipe.run.output_dir = str(run_dir)
    return recipe, stage


def summarize(records: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Medians of the steps after `warmup`, and the peak memory over all of them."""
    timed = [r for r in records if r["step"] > warmup] or records
    result = {
        key: statistics.median(r[key] for r in timed) for key in ("tokens_per_s_per_device", "mfu", "step_seconds")
    }
    result["peak_memory_gb"] = max(r["memory_gb"] for r in records)
    result["steps_timed"] = len(timed)
    return result


def step_records(path: Path) -> list[dict[str, Any]]:
    """The training-step records of a `metrics.jsonl`."""
    return [record for record in read_metrics(path) if "tokens_per_s_per_device" in record]


def reset_device(context: DistributedContext) -> None:
    gc.collect()
    if context.device.type == "cuda":
        torch.cuda.synchronize(context.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(context.device)


def run_trainer(
    recipe: Recipe, stage: StageConfig, tokenizer_dir: Path, vocab_size: int, context: DistributedContext, warmup: int
) -> dict[str, float]:
    shutil.rmtree(stage_dir(Path(recipe.run.output_dir), stage.name), ignore_errors=True)
    trainer = StageTrainer(recipe, stage, Path(recipe.run.output_dir), tokenizer_dir, vocab_size, None, context)
    trainer.train()
    records = step_records(trainer.dir / "metrics.jsonl") if context.is_main else []
    trainer.engine.destroy()
    del trainer
    return summarize(records, warmup) if context.is_main else {}


def run_dense(
    recipe: Recipe, stage: StageConfig, vocab_size: int, context: DistributedContext, warmup: int
) -> dict[str, float]:
    out_dir = Path(recipe.run.output_dir) / "dense_baseline" / stage.name
    shutil.rmtree(out_dir, ignore_errors=True)
    run_dense_baseline(recipe, stage, vocab_size, stage.budget.steps, context)
    return summarize(step_records(out_dir / "metrics.jsonl"), warmup) if context.is_main else {}


def run_standalone(
    recipe: Recipe, stage: StageConfig, vocab_size: int, context: DistributedContext, warmup: int
) -> dict[str, float]:
    """The model's step without the trainer: bf16 weights, fused AdamW, rows built before timing."""
    device = context.device
    model = load_stage_model("backbone", recipe.model, None, vocab_size, recipe.run.seed, device).to(device)
    configure_layer_execution(model, recipe, stage)
    model.train()
    flop_model = FlopModel.from_model(model)
    # The stage's parameter groups: frozen groups stay frozen, each group keeps its LR, as in the trainer.
    groups = [{k: v for k, v in group.items() if k != "name"} for group in parameter_groups(model, stage)]
    optimizer = torch.optim.AdamW(
        groups,
        lr=stage.optimizer.lr,
        betas=tuple(stage.optimizer.betas),
        weight_decay=stage.optimizer.weight_decay,
        fused=device.type == "cuda",
    )
    rows_per_micro, accumulation = batch_geometry(stage, context.world_size)
    stream = MicroBatchStream(
        stage.sources,
        stage.row_length,
        rows_per_micro,
        Path(recipe.run.output_dir),
        LayoutSettings.from_model_config(model.config),
        recipe.run.seed,
        context.rank,
        context.world_size,
    )
    steps = stage.budget.steps
    pin = device.type == "cuda"
    batches: list[MicroBatch] = []
    for _ in range(steps * accumulation):
        batch = stream.next()
        batches.append(batch.pinned() if pin else batch)
    records = []
    for step in range(1, steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        flops = 0.0
        memory_pairs = torch.zeros((), dtype=torch.float64, device=device)
        for micro in range(accumulation):
            batch = batches[(step - 1) * accumulation + micro]
            flops += flop_model.training_flops(batch.work)
            batch = batch.to(device)
            output = model(batch.input_ids, layout=batch.layout)
            weighted_loss(output, stage.loss_weights).backward()
            memory_pairs += batch.work.memory_pairs(output.selected_docs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        flops += flop_model.memory_pair_training_flops(memory_pairs.item())  # .item() waits for the step
        elapsed = time.perf_counter() - started
        tokens = accumulation * rows_per_micro * stage.row_length
        records.append(
            {
                "step": step,
                "tokens_per_s_per_device": tokens / elapsed,
                "step_seconds": elapsed,
                "mfu": flops / elapsed / recipe.tracking.peak_flops_per_device,
                "memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if pin else float("nan"),
            }
        )
    del model, optimizer, batches
    return summarize(records, warmup)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/bench_trainer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--stage", required=True, help="the stage to measure")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per configuration, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument(
        "--accumulation",
        type=int,
        help="micro-batches per optimizer step (default: the recipe's global batch on these ranks)",
    )
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="a random backbone of this shape instead of the recipe's"
    )
    parser.add_argument("--layers", type=int, help="with --shape: this many of its decoder layers (to fit one card)")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="synthetic retrieval rows of the stage's row length instead of its sources",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="where data, tokenizer and metrics go (default: the recipe's output_dir + '-bench')",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_trainer.json"))
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 0 and below --steps {args.steps}")
    return args


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['device']} x {report['world_size']}, torch {report['torch']}, deepspeed {report['deepspeed']}, "
        f"stage {report['stage']} ({report['row_length']} tokens a row), ZeRO-{report['zero_stage']}, "
        f"compile {report['compile']}"
    )
    print(f"{'config':<12}{'tokens/s/device':>17}{'MFU':>8}{'step s':>9}{'peak GB':>9}")
    for name, result in report["results"].items():
        if "error" in result:
            print(f"{name:<12}{result['error']}")
            continue
        print(
            f"{name:<12}{result['tokens_per_s_per_device']:>17,.0f}{100 * result['mfu']:>7.1f}%"
            f"{result['step_seconds']:>9.3f}{result['peak_memory_gb']:>9.1f}"
        )
    for name, ratio in report["ratios"].items():
        print(f"{name}: {ratio:.3f}")


def benchmark_main(argv: list[str] | None = None) -> int:
    """Entry point of `launch/bench_trainer.py`."""
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    configure_logging(int(os.environ.get("RANK", "0")))
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        run_dir = args.run_dir or Path(recipe.run.output_dir + "-bench")
        recipe, stage = benchmark_recipe(
            recipe,
            args.stage,
            args.steps,
            args.accumulation,
            world_size,
            args.shape,
            args.layers,
            args.synthetic,
            run_dir,
        )
        batch_geometry(stage, world_size)
        if stage.lora is not None and "standalone" in args.configs:
            raise RecipeError(
                f"stage {stage.name} trains LoRA adapters and the standalone step full weights: "
                "run it with --configs trainer dense"
            )
    except (RecipeError, ValueError) as error:
        logger.error("%s", error)
        return 2
    context = init_distributed()
    tokenizer_dir = prepare_run(recipe, [stage], run_dir, context)
    vocab_size = load_tokenizer(tokenizer_dir).vocab_size
    results: dict[str, dict[str, Any]] = {}
    for name in (c for c in CONFIGS if c in args.configs):
        reset_device(context)
        logger.info("benchmark: %s, %d steps", name, args.steps)
        try:
            if name == "standalone":
                results[name] = run_standalone(recipe, stage, vocab_size, context, args.warmup)
            elif name == "trainer":
                results[name] = run_trainer(recipe, stage, tokenizer_dir, vocab_size, context, args.warmup)
            else:
                results[name] = run_dense(recipe, stage, vocab_size, context, args.warmup)
        except torch.OutOfMemoryError:
            # A configuration that does not fit is a result too; the others still run.
            logger.exception("benchmark: %s ran out of memory", name)
            results[name] = {"error": "out of memory"}
        if context.is_main:  # written after every configuration, so a run cut short keeps what it measured
            write_report(args, argv, context, recipe, stage, results)
    if context.is_main:
        print_table(write_report(args, argv, context, recipe, stage, results))
    return 0


def write_report(
    args: argparse.Namespace,
    argv: list[str] | None,
    context: DistributedContext,
    recipe: Recipe,
    stage: StageConfig,
    results: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    speed = {name: result["tokens_per_s_per_device"] for name, result in results.items() if "error" not in result}
    ratios = {
        f"{a} / {b} tokens/s": speed[a] / speed[b]
        for a, b in (("trainer", "standalone"), ("trainer", "dense"))
        if a in speed and b in speed
    }
    report = {
        "device": torch.cuda.get_device_name(context.device) if context.device.type == "cuda" else "cpu",
        "world_size": context.world_size,
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "command": " ".join(["launch/bench_trainer.py", *(sys.argv[1:] if argv is None else argv)]),
        "stage": stage.name,
        "row_length": stage.row_length,
        "micro_batch_tokens": stage.micro_batch_tokens,
        "global_batch_tokens": stage.global_batch_tokens,
        "zero_stage": recipe.deepspeed.zero_stage,
        "compile": recipe.model.compile,
        "coalesce_reduction": recipe.deepspeed.coalesce_reduction,
        "allocator": allocator_settings(),
        "model": recipe.model.inline_config or recipe.model.backbone,
        "activations": dataclasses.asdict(stage.activations or recipe.activations),
        "peak_flops_per_device": recipe.tracking.peak_flops_per_device,
        "steps": args.steps,
        "warmup": args.warmup,
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report
