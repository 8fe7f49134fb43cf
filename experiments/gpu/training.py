"""Training the variants: one shared tokenizer, each variant's data builds (a CPU process per
source), and its stages with planned steps through `train.api.run_stage`."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from .plan import StepPlanner, read_json, stage_sources, write_json_atomic

logger = logging.getLogger(__name__)


def tokenizer_texts(recipe: Any, tokenizer_dir: Path, limit: int) -> list[str]:
    """The texts `train.runner.tokenizer_texts` trains the tiny tokenizer on, without generating
    whole sources: the synthetic generators are sequential, so a source generated with its counts
    capped at `limit` has the same first `limit` documents and records."""
    from data.build import load_source
    from data.errors import BadRecordTally
    from train.api import build_config_for

    texts: list[str] = []
    for name in recipe.data.sources:
        source = build_config_for(recipe, name, tokenizer_dir).source
        if source.kind == "synthetic":
            options = dict(source.synthetic)
            for key in ("num_samples", "num_queries", "num_chains"):
                if key in options:
                    options[key] = min(int(options[key]), limit)
            source = dataclasses.replace(source, synthetic=options)
        dataset = load_source(source, BadRecordTally())
        texts += [doc.full_text() for doc in dataset.corpus[:limit]]
        texts += [f"{record.query} {record.answer or ''}" for record in dataset.records[:limit]]
    return texts


def prepare_shared_tokenizer(recipe: Any, directory: Path) -> Path:
    """One tokenizer for every variant: the recipe's own (`tokenizer.path`) or its tiny one."""
    from train.api import prepare_recipe_tokenizer

    tiny = recipe.tokenizer.train_tiny
    if recipe.tokenizer.path is None and tiny is None:
        raise ValueError("the recipe has neither tokenizer.path nor tokenizer.train_tiny")
    texts = tokenizer_texts(recipe, directory, tiny.sample_records) if recipe.tokenizer.path is None else None
    prepare_recipe_tokenizer(recipe, directory, texts=texts)
    return directory


def _build_source(config: Any, output: str) -> dict:
    from data.build import build_dataset

    started = time.perf_counter()
    manifest = build_dataset(config, output)
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "examples": manifest.get("examples"),
        "overlong_skipped": manifest.get("examples_overlong_skipped"),
        "corpus_tokens": manifest.get("corpus_tokens"),
        "unusable": manifest.get("records_unusable"),
    }


def prepare_variant(spec: dict) -> None:
    """A variant's tokenizer copy and data builds (one process per source); writes `prep_done.json`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from train.api import build_config_for, load_recipe, prepare_recipe_tokenizer, source_build_dir

    started = time.perf_counter()
    run_dir = Path(spec["run_dir"])
    try:
        recipe = load_recipe(spec["recipe"], spec["overrides"])
        tokenizer_dir = run_dir / "tokenizer"
        prepare_recipe_tokenizer(recipe, tokenizer_dir, source=spec["tokenizer_source"])
        names = stage_sources(recipe)
        configs = {name: build_config_for(recipe, name, tokenizer_dir) for name in names}
        workers = max(1, min(len(names), int(spec["build_workers"])))
        summary: dict[str, Any] = {}
        if workers == 1:
            for name in names:
                summary[name] = _build_source(configs[name], str(source_build_dir(run_dir, name)))
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {
                    name: pool.submit(_build_source, configs[name], str(source_build_dir(run_dir, name)))
                    for name in names
                }
                summary = {name: future.result() for name, future in futures.items()}
        write_json_atomic(run_dir / "prep_done.json", {"seconds": time.perf_counter() - started, "sources": summary})
        logger.info("prepared %d sources in %.1f s", len(names), time.perf_counter() - started)
    except BaseException:
        write_json_atomic(run_dir / "prep_failed.json", {"traceback": traceback.format_exc()})
        raise


def wait_for_prep(run_dir: Path, deadline: float) -> dict:
    while True:
        done = read_json(run_dir / "prep_done.json")
        if done is not None:
            return done
        failed = read_json(run_dir / "prep_failed.json")
        if failed is not None:
            raise RuntimeError(f"data preparation failed:\n{failed.get('traceback')}")
        if time.time() > deadline:
            raise TimeoutError("data preparation did not finish before the training deadline")
        time.sleep(0.25)


def stage_throughput(stage_dir: Path) -> dict[str, float] | None:
    """Median tokens/s and step seconds of a stage's logged steps (the first two, warm-up, left out when possible)."""
    from train.tracking import read_stage_metrics

    steps = [r for r in read_stage_metrics(stage_dir) if r.get("tokens_per_s_per_device")]
    if not steps:
        return None
    steady = steps[2:] if len(steps) > 4 else steps
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s_per_device"] for r in steady),
        "step_seconds_total": sum(r.get("step_seconds", 0.0) for r in steps),
        "steps": len(steps),
    }


def train_variant(spec: dict, result: dict, save: Any, earlier_stages: dict[str, dict] | None = None) -> Path | None:
    """Run the stages in order with planned steps; returns the last complete export (None if none).
    A stage whose export is complete (`--resume`) is skipped, and its record from `earlier_stages`
    (the earlier run's, by stage name) is kept, marked `reused`. With `spec["fixed_steps"]` (stage
    name to steps) the stages train for those steps whatever the time left."""
    import gc

    import torch

    from data.tokenization import load_tokenizer
    from train import api

    run_dir = Path(spec["run_dir"])
    base = api.load_recipe(spec["recipe"], spec["overrides"])
    planner = StepPlanner(
        [(api.total_steps(s), s.global_batch_tokens) for s in base.stages],
        spec["train_deadline"],
        spec["assumed_tokens_per_s"],
        spec["stage_overhead_s"],
        spec["max_step_scale"],
        spec["min_steps"],
    )
    wait_started = time.time()
    result["prep"] = wait_for_prep(run_dir, spec["train_deadline"])
    result["timing"]["prep_wait_s"] = time.time() - wait_started
    context = api.init_distributed()
    tokenizer_dir = run_dir / "tokenizer"
    vocab_size = load_tokenizer(tokenizer_dir).vocab_size
    step_overrides: list[str] = []
    last_export = None
    for index, base_stage in enumerate(base.stages):
        destination = api.export_dir(run_dir, base_stage.name)
        if api.is_complete_export(destination):
            last_export = destination
            earlier = (earlier_stages or {}).get(base_stage.name)
            result["stages"].append({**(earlier or {"stage": base_stage.name}), "reused": True})
            continue
        if spec.get("fixed_steps"):
            steps = spec["fixed_steps"][base_stage.name]
            scale = steps / max(planner.planned[index][0], 1)
        else:
            steps, scale = planner.steps_for(index, time.time())
        warmup = min(base_stage.schedule.warmup_steps, max(1, steps // 4)) if base_stage.schedule.warmup_steps else 0
        step_overrides += [
            f"stages.{index}.budget.steps={steps}",
            f"stages.{index}.budget.tokens=null",
            f"stages.{index}.schedule.warmup_steps={warmup}",
        ]
        recipe = api.load_recipe(spec["recipe"], [*spec["overrides"], *step_overrides])
        stage = recipe.stages[index]
        record = {
            "stage": stage.name,
            "steps": steps,
            "recipe_steps": planner.planned[index][0],
            "scale": round(scale, 3),
            "row_length": stage.row_length,
            "global_batch_tokens": stage.global_batch_tokens,
        }
        result["stages"].append(record)
        save()
        started = time.time()
        logger.info("stage %s: %d steps (recipe %d, scale %.2f)", stage.name, steps, planner.planned[index][0], scale)
        try:
            api.run_stage(recipe, stage, run_dir, tokenizer_dir, vocab_size, context)
        except api.NonFiniteLossError as error:
            record["error"] = f"non-finite loss: {error}"
            result["errors"].append(f"{stage.name}: {record['error']}")
            save()
            break
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        record["wall_s"] = time.time() - started
        measured = stage_throughput(api.stage_dir(run_dir, stage.name))
        if measured:
            record.update(tokens_per_s=measured["tokens_per_s"], step_seconds_total=measured["step_seconds_total"])
            planner.update(measured["tokens_per_s"], record["wall_s"] - measured["step_seconds_total"])
        last_export = destination
        save()
    return last_export
