"""The GPU-scale MSA experiment, from one command, inside a wall-clock budget.

    python -m experiments.gpu --gpus 0 1 2 3 --results-dir runs/experiments
    python -m experiments.gpu --gpus 0 1 --time-budget 7    # from the repository root: no install needed
    python -m experiments.gpu --gpus 0 0 0 --variants main no_aux global_positions   # three on GPU 0
    python -m experiments.gpu --smoke --results-dir /tmp/gpu_smoke   # CPU, toy scale

What it does:
1. Trains one tokenizer for every variant (the recipe's `train_tiny`, on the recipe's sources).
2. Runs four variants of `recipes/qwen3_350m_synthetic.yaml` through its four stages (CPT
   warm-up, CPT main, SFT short at 8K rows, SFT long at 16K rows), one process per GPU
   (`CUDA_VISIBLE_DEVICES`; DeepSpeed ZeRO-2 in a world of one). `--gpus` names one worker slot
   per entry, so a GPU named twice runs two variants at once. With fewer slots than variants,
   the variants queue, each slot running its share one after the other:
   - `main`: the recipe;
   - `no_aux`: `loss_weights.aux: 0` in every stage (the router is never trained);
   - `global_positions`: `model.msa.document_positions: false`: positions count from the start
     of each example instead of restarting in each document; inference then encodes each
     document at its offset in the memory and the question after the whole memory;
   - `no_interleave`: every interleave (multi-hop, one example per retrieval step) source is
     replaced by its one-round counterpart, which retrieves both hops' IDs at once;
   - `id_strides` (not in the default set): training memories' IDs spaced by random strides.
   Data builds run in separate CPU processes, one per source, while the workers start.
3. Fits the steps to the budget: the first stage uses the recipe's steps, or fewer when the
   assumed throughput says they would not fit; each later stage is scaled (up to
   `--max-step-scale`) to the time left, from the throughput and per-stage overhead measured so far.
   `--steps-from JSON` instead trains every stage for the steps `main` trained in that earlier
   run, so ablations run in later calls (or on other cards) match it step for step.
4. Evaluates each variant's last export, in order of importance, until its deadline:
   RULER-style NIAH (`eval/niah.py`; at L and 64L in rounds that ask both sizes alike) and
   held-out needle QA in one shared memory (router recall@1/5/10, exact match, whether the
   generated ID was the needle) at memories of L, 64L, 8L, 2L, 4L, 16L and 32L tokens (L: the
   longest training row), multi-hop QA through the interleave loop and key-value QA at about L
   tokens. (Cheap sizes come before 32L.)
5. Writes to `--results-dir` (at most 6 files): `<name>.json` (every number, the per-step
   curves, timings), `<name>_loss.png`, `<name>_recall.png` (training curves of all variants),
   `<name>_niah.png` (NIAH accuracy against memory size), `<name>_memory_recall.png` (held-out
   router recall@k against memory size) and `<name>_log.txt` (the summary table and the tail of
   every process's log). It prints the summary, with the acceptance check: NIAH accuracy at
   64L within 10% of the accuracy at L.

Work folders (runs, data builds, logs) go under `--work-dir`. `key=value` arguments are recipe
overrides applied to every variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


logger = logging.getLogger(__name__)

DEFAULT_RECIPE = REPO / "recipes" / "qwen3_350m_synthetic.yaml"
# The comparison (the default), then recipe changes under test.
ABLATIONS = ("main", "no_aux", "global_positions", "no_interleave")
VARIANTS = (*ABLATIONS, "id_strides")
VARIANT_TITLES = {
    "main": "MSA (all stages)",
    "no_aux": "without the aux loss",
    "global_positions": "global positions",
    "no_interleave": "without interleave steps",
    "id_strides": "IDs spaced by random strides",
}
HELDOUT_SEED = 1000  # generator seeds of held-out evaluation data; training sources use seeds < 100
RECALL_KS = (1, 5, 10)
# Evaluation memory sizes as multiples of the longest training row, in order of importance.
SIZE_MULTIPLES = (1, 64, 8, 2, 4, 16, 32)
# The single-answer RULER shapes: the recipe selects one document per example, and a multi-value
# or multi-query question needs several at once (`--niah-subtasks` takes any of eval/niah.py's).
NIAH_SUBTASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multikey_2")
LOG_TAIL_LINES = 120
SNAPSHOT_EVERY_S = 30.0  # how often the driver writes the results so far (a killed call keeps them)


# ----------------------------------------------------------------------------- variants


def one_round_counterpart(sources: dict[str, dict], name: str) -> str:
    """The `qa` source whose generator config equals interleave source `name`'s plus `hop_positives: true`."""
    source = sources[name]
    wanted = dict(source["source"])
    wanted["synthetic"] = {**wanted.get("synthetic", {}), "hop_positives": True}
    for candidate, values in sources.items():
        if (values.get("sample_kind") == "qa" and values.get("source") == wanted
                and values.get("memory") == source.get("memory")):
            return candidate
    raise ValueError(f"the no_interleave variant needs a one-round counterpart of interleave source {name!r}: a "
                     "qa source with the same generator settings plus hop_positives: true and the same memory")


def variant_overrides(recipe: Any, variant: str) -> list[str]:
    """Recipe overrides (key=value) that turn the recipe into `variant`."""
    if variant == "main":
        return []
    if variant == "no_aux":
        return [f"stages.{index}.loss_weights.aux=0.0" for index in range(len(recipe.stages))]
    if variant == "global_positions":
        return ["model.msa.document_positions=false"]
    if variant == "no_interleave":
        sources = recipe.data.sources
        overrides = []
        for index, stage in enumerate(recipe.stages):
            if any(sources[name].get("sample_kind") == "interleave" for name in stage.sources):
                replaced = {one_round_counterpart(sources, name) if sources[name].get("sample_kind") == "interleave"
                            else name: weight for name, weight in stage.sources.items()}
                overrides.append(f"stages.{index}.sources={json.dumps(replaced)}")
        if not overrides:
            raise ValueError("the no_interleave variant needs a stage with an interleave source")
        return overrides
    if variant == "id_strides":
        # Strides up to what spreads a source's largest memory over its whole ID range.
        overrides = []
        for name, source in recipe.data.sources.items():
            memory = source.get("memory") or {}
            if memory.get("id_offset_max") and memory.get("max_memory_docs"):
                stride = (memory["id_offset_max"] + memory["max_memory_docs"]) // memory["max_memory_docs"]
                overrides.append(f"data.sources.{name}.memory.id_stride_max={stride}")
        if not overrides:
            raise ValueError("the id_strides variant needs sources with memory.id_offset_max and max_memory_docs")
        return overrides
    raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")


def smoke_overrides(recipe: Any) -> list[str]:
    """Shrink the recipe to a few-minute CPU run that takes every code path of the real one:
    a 4-layer model (bf16, as on GPUs), rows of 768/1536 tokens, 2-3 steps per stage, small sources."""
    overrides = [
        "model.inline_config.hidden_size=64", "model.inline_config.intermediate_size=128",
        "model.inline_config.num_hidden_layers=4", "model.inline_config.num_attention_heads=4",
        "model.inline_config.num_key_value_heads=2", "model.inline_config.head_dim=16",
        "model.msa.top_k_docs=2", "model.msa.chunk_size=32",
        "tokenizer.train_tiny.vocab_size=768", "tokenizer.train_tiny.sample_records=60",
        "model.compile=false",  # compiling costs more than it saves in a few CPU steps; tests cover it
    ]
    if recipe.deepspeed.checkpointed_layers is not None:
        overrides.append("deepspeed.checkpointed_layers=2")
    caps = {"num_samples": 40, "num_queries": 60, "num_chains": 40, "num_facts": 64, "words_per_doc": 40,
            "haystack_docs": 3, "num_keys": 4}
    long_rows = max(stage.row_length for stage in recipe.stages)
    for name, values in recipe.data.sources.items():
        synthetic = values.get("source", {}).get("synthetic", {})
        for key, cap in caps.items():
            if key in synthetic and int(synthetic[key]) > cap:
                overrides.append(f"data.sources.{name}.source.synthetic.{key}={cap}")
        long = int(values.get("max_example_tokens", 16384)) > 8192
        overrides += [f"data.sources.{name}.memory.memory_tokens={1152 if long else 384}",
                      f"data.sources.{name}.max_example_tokens={1536 if long else 768}"]
    for index, stage in enumerate(recipe.stages):
        row = 1536 if stage.row_length == long_rows and long_rows > 8192 else 768
        steps = 3 if index < 2 else 2
        overrides += [f"stages.{index}.row_length={row}", f"stages.{index}.micro_batch_tokens={row}",
                      f"stages.{index}.global_batch_tokens={2 * row}", f"stages.{index}.budget.steps={steps}",
                      f"stages.{index}.budget.tokens=null", f"stages.{index}.schedule.warmup_steps=1"]
    return overrides


def kv_generator_options(recipe: Any) -> dict[str, Any]:
    """`generate_kv_facts` options of the recipe's key-value QA source (the latest stage's that has
    one), so held-out key-value QA asks facts shaped as in training. The evaluation asks over one
    memory of all the facts, so names must be unique in all of it: no `memory_size` groups (whose
    names repeat across groups), and at most the 300 facts the generator names uniquely."""
    sources = recipe.data.sources
    for stage in reversed(recipe.stages):
        for name in stage.sources:
            source = sources[name]
            synthetic = dict(source.get("source", {}).get("synthetic", {}))
            if synthetic.get("generator") == "kv_facts" and source.get("sample_kind") == "qa":
                synthetic.pop("generator")
                options = {key: value for key, value in synthetic.items()
                           if key not in ("seed", "num_queries", "memory_size")}
                options["num_facts"] = min(int(options.get("num_facts", 300)), 300)
                return options
    return {"num_facts": 300, "filler_words": 12}


# ----------------------------------------------------------------------------- small helpers


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(staging, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def longest_row(recipe: Any) -> int:
    return max(stage.row_length for stage in recipe.stages)


def stage_sources(recipe: Any) -> list[str]:
    return list(dict.fromkeys(name for stage in recipe.stages for name in [*stage.sources, *stage.eval.sources]))


def size_label(tokens: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens >= scale and tokens % scale == 0:
            return f"{tokens // scale}{unit}"
    return str(tokens)


# ----------------------------------------------------------------------------- tokenizer and data


def tokenizer_texts(recipe: Any, tokenizer_dir: Path, limit: int) -> list[str]:
    """The texts `train.runner.tokenizer_texts` trains the tiny tokenizer on, without generating
    whole sources: the synthetic generators are sequential, so a source generated with its counts
    capped at `limit` has the same first `limit` documents and records."""
    from data.build import load_source
    from data.errors import BadRecordTally
    from train.data_stream import build_config_for

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
    from train.runner import special_strings
    from train.tokenizer import prepare_tokenizer

    tiny = recipe.tokenizer.train_tiny
    texts = None
    if recipe.tokenizer.path is None:
        if tiny is None:
            raise ValueError("the recipe has neither tokenizer.path nor tokenizer.train_tiny")
        texts = tokenizer_texts(recipe, directory, tiny.sample_records)
    prepare_tokenizer(directory, special_strings(recipe, directory), recipe.tokenizer.path, texts,
                      tiny.vocab_size if tiny else 0, tiny.individual_digits if tiny else False)
    return directory


def _build_source(config: Any, output: str) -> dict:
    from data.build import build_dataset

    started = time.perf_counter()
    manifest = build_dataset(config, output)
    return {"seconds": round(time.perf_counter() - started, 2), "examples": manifest.get("examples"),
            "overlong_skipped": manifest.get("examples_overlong_skipped"),
            "corpus_tokens": manifest.get("corpus_tokens"), "unusable": manifest.get("records_unusable")}


def prepare_variant(spec: dict) -> None:
    """A variant's tokenizer copy and data builds (one process per source); writes `prep_done.json`."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from train.config import load_recipe
    from train.data_stream import build_config_for, source_build_dir
    from train.runner import special_strings
    from train.tokenizer import prepare_tokenizer

    started = time.perf_counter()
    run_dir = Path(spec["run_dir"])
    try:
        recipe = load_recipe(spec["recipe"], spec["overrides"])
        tokenizer_dir = run_dir / "tokenizer"
        prepare_tokenizer(tokenizer_dir, special_strings(recipe, tokenizer_dir), spec["tokenizer_source"], None, 0)
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
                futures = {name: pool.submit(_build_source, configs[name], str(source_build_dir(run_dir, name)))
                           for name in names}
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


# ----------------------------------------------------------------------------- training


def stage_throughput(metrics_path: Path) -> dict[str, float] | None:
    """Median tokens/s and step seconds of a stage's logged steps (the first two, warm-up, left out when possible)."""
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("tokens_per_s_per_device")]
    if not steps:
        return None
    steady = steps[2:] if len(steps) > 4 else steps
    return {"tokens_per_s": statistics.median(r["tokens_per_s_per_device"] for r in steady),
            "step_seconds_total": sum(r.get("step_seconds", 0.0) for r in steps), "steps": len(steps)}


class StepPlanner:
    """Steps per stage so that training ends by `deadline`: recipe steps scaled by the time left over
    the time they would take, from the measured (or, before the first stage, assumed) throughput."""

    def __init__(self, planned: list[tuple[int, int]], deadline: float, tokens_per_s: float, overhead_s: float,
                 max_scale: float, min_steps: int) -> None:
        self.planned = planned  # (recipe steps, global batch tokens) per stage
        self.deadline = deadline
        self.tokens_per_s = tokens_per_s
        self.overhead_s = overhead_s
        self.max_scale = max_scale
        self.min_steps = min_steps
        self.measured = False

    def steps_for(self, index: int, now: float) -> tuple[int, float]:
        remaining = self.planned[index:]
        available = self.deadline - now - self.overhead_s * len(remaining)
        needed = sum(steps * tokens for steps, tokens in remaining) / self.tokens_per_s
        scale = available / needed if needed > 0 else 1.0
        scale = min(scale, self.max_scale if self.measured else 1.0)
        steps = max(self.min_steps, int(round(self.planned[index][0] * scale)))
        return steps, scale

    def update(self, tokens_per_s: float | None, overhead_s: float | None) -> None:
        if tokens_per_s:
            self.tokens_per_s = 0.9 * tokens_per_s  # a margin for longer rows and noise
            self.measured = True
        if overhead_s is not None:
            self.overhead_s = max(self.overhead_s * 0.5, overhead_s)


def recorded_stage_steps(path: Path, stage_names: Sequence[str], variant: str = "main") -> dict[str, int]:
    """The steps each stage of `variant` trained for in an earlier run's results file, so that other
    variants can train for exactly as many (`--steps-from`) on any card and under any time budget."""
    results = read_json(path)
    if results is None:
        raise FileNotFoundError(f"--steps-from {path}: no readable results file there")
    stages = (results.get("variants", {}).get(variant) or {}).get("stages")
    if not stages:
        raise ValueError(f"--steps-from {path}: no stage records of variant {variant!r} "
                         f"(it has {sorted(results.get('variants', {}))})")
    steps = {record["stage"]: record["steps"] for record in stages if record.get("steps")}
    missing = [name for name in stage_names if name not in steps]
    if missing:
        raise ValueError(f"--steps-from {path}: variant {variant!r} has no step count for stage(s) {missing}; "
                         f"its stages are {sorted(steps)}")
    return {name: int(steps[name]) for name in stage_names}


TRAINING_TIME_MARGIN = 1.15


def recorded_training_seconds(path: Path, variant: str = "main") -> tuple[float | None, str | None]:
    """(seconds from the worker's start to the end of training, GPU name) of `variant` in an earlier
    run's results file; (None, None) where it did not record them."""
    record = ((read_json(path) or {}).get("variants", {}).get(variant) or {})
    timing = record.get("timing", {})
    if not (timing.get("train_end") and timing.get("started")):
        return None, record.get("device_name")
    return timing["train_end"] - timing["started"], record.get("device_name")


def warn_if_fixed_steps_leave_no_evaluation(train_s: float | None, recorded_on: str | None, budget_s: float,
                                            workers_per_gpu: int, eval_reserve_s: float) -> float | None:
    """Training time of `--steps-from` is fixed, not fitted to the budget: the seconds that the
    recorded training (`workers_per_gpu` times as long on a shared GPU) leaves of `budget_s`,
    with a warning when that is less than `eval_reserve_s`. None when nothing was recorded."""
    if train_s is None:
        return None
    # 15% more than recorded: the ablations of main's 327 s took 378-388 s on another H100 host
    # (longer data builds before training, and 5-10% lower throughput).
    expected_s = TRAINING_TIME_MARGIN * workers_per_gpu * train_s
    left = budget_s - expected_s
    if left < eval_reserve_s:
        logger.warning("--steps-from: those steps take about %.0f s here (recorded on %s); a budget of %.0f s leaves "
                       "about %.0f s of evaluation (fewer than the %.0f s reserved): raise --time-budget, or expect "
                       "NIAH's first round and little else", expected_s, recorded_on or "its card", budget_s, left,
                       eval_reserve_s)
    else:
        logger.info("--steps-from: those steps take about %.0f s here (recorded on %s), leaving about %.0f s of "
                    "evaluation", expected_s, recorded_on or "its card", left)
    return left


def train_variant(spec: dict, result: dict, save: Any, earlier_stages: dict[str, dict] | None = None) -> Path | None:
    """Run the stages in order with planned steps; returns the last complete export (None if none).
    A stage whose export is complete (`--resume`) is skipped, and its record from `earlier_stages`
    (the earlier run's, by stage name) is kept, marked `reused`. With `spec["fixed_steps"]` (stage
    name to steps) the stages train for those steps whatever the time left."""
    import gc

    import torch

    from data.tokenization import load_tokenizer
    from train.config import load_recipe
    from train.distributed import init_distributed
    from train.export import is_complete_export
    from train.runner import previous_export
    from train.trainer import NonFiniteLossError, StageTrainer, export_dir, stage_dir, total_steps

    run_dir = Path(spec["run_dir"])
    base = load_recipe(spec["recipe"], spec["overrides"])
    planner = StepPlanner([(total_steps(s), s.global_batch_tokens) for s in base.stages], spec["train_deadline"],
                          spec["assumed_tokens_per_s"], spec["stage_overhead_s"], spec["max_step_scale"],
                          spec["min_steps"])
    wait_started = time.time()
    result["prep"] = wait_for_prep(run_dir, spec["train_deadline"])
    result["timing"]["prep_wait_s"] = time.time() - wait_started
    context = init_distributed()
    tokenizer_dir = run_dir / "tokenizer"
    vocab_size = load_tokenizer(tokenizer_dir).vocab_size
    step_overrides: list[str] = []
    last_export = None
    for index, base_stage in enumerate(base.stages):
        destination = export_dir(run_dir, base_stage.name)
        if is_complete_export(destination):
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
        step_overrides += [f"stages.{index}.budget.steps={steps}", f"stages.{index}.budget.tokens=null",
                           f"stages.{index}.schedule.warmup_steps={warmup}"]
        recipe = load_recipe(spec["recipe"], [*spec["overrides"], *step_overrides])
        stage = recipe.stages[index]
        record = {"stage": stage.name, "steps": steps, "recipe_steps": planner.planned[index][0],
                  "scale": round(scale, 3), "row_length": stage.row_length, "global_batch_tokens": stage.global_batch_tokens}
        result["stages"].append(record)
        save()
        started = time.time()
        logger.info("stage %s: %d steps (recipe %d, scale %.2f)", stage.name, steps, planner.planned[index][0], scale)
        try:
            trainer = StageTrainer(recipe, stage, run_dir, tokenizer_dir, vocab_size,
                                   previous_export(recipe, stage, run_dir), context)
            trainer.run()
        except NonFiniteLossError as error:
            record["error"] = f"non-finite loss: {error}"
            result["errors"].append(f"{stage.name}: {record['error']}")
            save()
            break
        finally:
            trainer = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        record["wall_s"] = time.time() - started
        measured = stage_throughput(stage_dir(run_dir, stage.name) / "metrics.jsonl")
        if measured:
            record.update(tokens_per_s=measured["tokens_per_s"], step_seconds_total=measured["step_seconds_total"])
            planner.update(measured["tokens_per_s"], record["wall_s"] - measured["step_seconds_total"])
        last_export = destination
        save()
    return last_export


# ----------------------------------------------------------------------------- evaluation


def qa_template(recipe: Any) -> dict[str, Any] | None:
    """The `template` of the last stage's first QA source (None: the default template), so that
    evaluation asks and answers in the form the model was trained on."""
    for name in recipe.stages[-1].sources:
        source = recipe.data.sources[name]
        if source.get("sample_kind") == "qa":
            return dict(source["template"]) if source.get("template") else None
    return None


def load_eval_model(export: Path, device: str, settings: Any, template: dict[str, Any] | None = None) -> Any:
    import torch

    import msa_modeling  # noqa: F401
    from data.templates import TemplateConfig
    from eval.harness import EvalModel

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # A `global_positions` export (document_positions: false) needs nothing special: the
    # inference library encodes its documents at their memory offsets and the question after them.
    return EvalModel.load(export, device=device, dtype=dtype, settings=settings,
                          template=TemplateConfig.from_dict(template) if template else None)


def rendered_tokens_per_doc(model: Any, documents: Sequence[Any]) -> float:
    lengths = [len(tokens) for tokens in model.render_documents(documents)]
    return sum(lengths) / max(len(lengths), 1)


def needle_memory(model: Any, memory_tokens: int, questions: int, seed: int) -> Any:
    """One shared memory of about `memory_tokens` rendered tokens with `questions` needles in haystack
    documents (40 words each); each record asks one needle, and the corpus order is shuffled."""
    from data.records import RetrievalDataset
    from data.synthetic import generate_needles

    probe = generate_needles("single", 1, seed, haystack_docs=8, words_per_doc=40)
    per_doc = rendered_tokens_per_doc(model, probe.corpus)
    haystack = max(0, round(memory_tokens / per_doc / questions) - 1)
    dataset = generate_needles("single", questions, seed, haystack_docs=haystack, words_per_doc=40)
    needles = {doc.doc_id: doc.text for doc in dataset.corpus if "-needle" in doc.doc_id}
    kept = []
    for record in dataset.records:
        key = record.query.removeprefix("What is the special magic number for ").removesuffix("?")
        if sum(f"for {key} is:" in text for text in needles.values()) == 1:  # keys are unique per sample only
            kept.append(record)
    corpus = list(dataset.corpus)
    random.Random(seed).shuffle(corpus)
    return RetrievalDataset(corpus=corpus, records=kept)


def chains_memory(model: Any, memory_tokens: int, seed: int, questions: int) -> Any:
    """Two-hop chains (with distractors) filling about `memory_tokens`; positives are both hops."""
    from data.records import RetrievalDataset
    from data.synthetic import generate_multihop_chains

    options = dict(hops=2, distractors_per_chain=6, filler_words=12, hop_positives=True)
    probe = generate_multihop_chains(2, seed, **options)
    per_chain = rendered_tokens_per_doc(model, probe.corpus) * len(probe.corpus) / 2
    chains = max(questions, round(memory_tokens / per_chain))
    dataset = generate_multihop_chains(chains, seed, **options)
    corpus = list(dataset.corpus)
    random.Random(seed).shuffle(corpus)
    return RetrievalDataset(corpus=corpus, records=dataset.records[:questions])


def qa_summary(report: Any) -> dict[str, Any]:
    summary = report.summary()
    summary["id_correct"] = (sum(bool(set(i.retrieved_ids) & set(i.positive_ids)) for i in report.items)
                             / max(len(report.items), 1))
    summary["examples"] = [{"query": i.query, "reference": i.reference, "answer": i.answer,
                            "positive_ids": i.positive_ids, "retrieved_ids": i.retrieved_ids,
                            "routed_ids": i.routed_ids} for i in report.items[:4]]
    return summary


def niah_summary(report: Any, size: int) -> dict[str, Any]:
    """Free decoding's accuracy, and (`*_routed_ids`) the same questions with the round's IDs
    decoded among the routed documents."""
    accuracy = report.accuracy().get(size, {})
    routed = report.accuracy("routed_ids_score").get(size, {})
    samples = [s for s in report.samples if s.memory_tokens == size]

    def retrieved(ids_field: str) -> float:
        """The share of samples whose retrieved IDs (`ids_field` of a sample) include a needle."""
        return sum(bool(set(s.needle_ids) & set(getattr(s, ids_field) or ())) for s in samples) / max(len(samples), 1)

    return {
        "accuracy": accuracy,
        "average": accuracy.get("average"),
        "needle_retrieved": retrieved("retrieved_ids"),
        "misses": report.miss_kinds().get(size, {}),
        "accuracy_routed_ids": routed,
        "average_routed_ids": routed.get("average"),
        "needle_retrieved_routed_ids": retrieved("routed_ids_retrieved") if routed else None,
        "encoded_tokens": statistics.mean(s.encoded_tokens for s in samples) if samples else None,
        "samples": [{"subtask": s.subtask, "score": s.score, "answer": s.answer[:120], "expected": s.expected,
                     "needle_ids": s.needle_ids, "retrieved_ids": s.retrieved_ids,
                     "routed_ids_score": s.routed_ids_score, "routed_ids_answer": (s.routed_ids_answer or "")[:120],
                     "routed_ids_retrieved": s.routed_ids_retrieved, "routed_by_layer": s.routed_by_layer}
                    for s in samples],
    }


def eval_jobs(row: int, settings: dict) -> list[dict]:
    """Evaluation jobs in order of importance. NIAH at L and 64L (the acceptance check) comes
    first, in rounds (`run_niah_rounds`), then router recall at L, multi-hop and key-value QA at
    L, and router recall at 64L (rounds after the first leave time for these). The three jobs at
    L take seconds each and the one at 64L tens of seconds, so a deadline that is short of it
    skips that one job, not all three. The other sizes run one NIAH subtask per job, so that a
    deadline leaves whole subtasks."""
    sizes = [row * m for m in settings["size_multiples"]]
    jobs = [{"kind": "niah_rounds", "sizes": sizes[:2]}, {"kind": "qa_recall", "size": sizes[0]},
            {"kind": "multihop", "size": row}, {"kind": "kv", "size": row}, {"kind": "qa_recall", "size": sizes[1]}]
    for size in sizes[2:]:
        jobs += [{"kind": "niah", "size": size, "subtask": task} for task in settings["niah_subtasks"]]
        jobs.append({"kind": "qa_recall", "size": size})
    return jobs


def jobs_kept_time_for(jobs: list[dict], niah_rounds: dict) -> list[dict]:
    """The jobs that NIAH rounds after the first leave time for: router recall at the rounds'
    sizes, and multi-hop and key-value QA (each measured once before NIAH asks again)."""
    return [job for job in jobs if job["kind"] in ("qa_recall", "multihop", "kv") and job["size"] in niah_rounds["sizes"]]


class CostModel:
    """Predicted seconds of an evaluation job: encoding (tokens over a rate) plus questions (each a
    fixed time). The encoding rate is measured on jobs whose memories hold at least `min_tokens`,
    so that the fixed costs of small memories (many of them, in a NIAH job of several samples)
    never make a million-token job look unaffordable."""

    def __init__(self, encode_tokens_per_s: float, question_s: float, min_tokens: int) -> None:
        self.encode_tokens_per_s = encode_tokens_per_s
        self.question_s = question_s
        self.min_tokens = min_tokens
        self.samples: list[tuple[float, float]] = []  # (tokens, encoding seconds) of large jobs
        self.question_measured = False

    def predict(self, tokens: float, questions: float) -> float:
        return tokens / self.encode_tokens_per_s + questions * self.question_s

    def observe(self, tokens: float, questions: int, seconds: float, memory_tokens: float | None = None) -> None:
        """`tokens` encoded in memories of `memory_tokens` each (default: one memory) and `questions`
        asked in `seconds`. Small memories measure the time per question; large ones the encoding rate."""
        if (tokens if memory_tokens is None else memory_tokens) < self.min_tokens:
            if questions:
                estimate = max(0.02, (seconds - tokens / self.encode_tokens_per_s) / questions)
                self.question_s = 0.5 * (self.question_s + estimate) if self.question_measured else estimate
                self.question_measured = True
            return
        self.samples.append((tokens, max(seconds - questions * self.question_s, 0.1 * seconds)))
        self.encode_tokens_per_s = sum(t for t, _ in self.samples) / sum(e for _, e in self.samples)

    def state(self) -> dict[str, float]:
        return {"encode_tokens_per_s": self.encode_tokens_per_s, "question_s": self.question_s}


def job_size(job: dict, settings: dict) -> tuple[float, float]:
    """(memory tokens to encode, questions) of a job."""
    if job["kind"] == "niah":  # each sample is asked twice: free decoding and routed IDs
        return job["size"] * settings["niah_samples"], 2 * settings["niah_samples"]
    questions = settings["qa_questions"] * (2 if job["kind"] == "multihop" else 1)  # two rounds
    return job["size"], questions


def add_niah_samples(reports: dict[int, Any], evaluation: dict, size: int, report: Any) -> dict[str, Any]:
    """Add a NIAH report's samples to those of `size` so far and put the size's new summary in
    `evaluation` (its `seconds` carried over, for the caller to add to); returns that summary."""
    from eval.niah import NIAHReport

    merged = reports.setdefault(size, NIAHReport())
    merged.samples += report.samples
    summary = niah_summary(merged, size)
    summary["seconds"] = evaluation["niah"].get(str(size), {}).get("seconds", 0.0)
    evaluation["niah"][str(size)] = summary
    return summary


def run_niah_rounds(model: Any, sizes: Sequence[int], settings: dict, costs: CostModel, soft_deadline: float,
                    hard_deadline: float, reports: dict[int, Any], evaluation: dict, save: Any) -> None:
    """NIAH at every one of `sizes`, in rounds of one sample per subtask and size (round r draws
    its samples with seed r), up to `niah_samples` rounds.

    Whenever the deadline falls, every size has been asked the same subtasks equally often, so
    the accuracy at 64L is compared with the one at L on as many samples as the time allowed
    (a job per size would spend the time at L first). The first round runs until
    `hard_deadline`: the acceptance check needs it. Later rounds start only when their
    predicted time ends before `soft_deadline`, which leaves time for the jobs after them.
    """
    from eval.niah import run_niah

    for round_index in range(settings["niah_samples"]):
        for task in settings["niah_subtasks"]:
            predicted = costs.predict(sum(sizes), 2 * len(sizes))  # two questions: free and routed IDs
            now = time.time()
            if (now >= hard_deadline) if round_index == 0 else (now + predicted > soft_deadline):
                evaluation["skipped"].append({"job": f"niah rounds {round_index + 1}.. from {task}",
                                              "predicted_s": round(predicted, 1)})
                return
            for size in sizes:
                label = f"niah@{size_label(size)}/{task}, round {round_index + 1}"
                started = time.time()
                try:
                    report = run_niah(model, sizes=[size], samples_per_task=1, subtasks=[task], seed=round_index,
                                      routed_ids_too=True, matched=settings.get("niah_matched", False))
                except Exception:
                    evaluation.setdefault("errors", []).append({"job": label, "traceback": traceback.format_exc()})
                    logger.exception("eval %s failed; no more NIAH rounds", label)
                    save()
                    return
                seconds = time.time() - started
                add_niah_samples(reports, evaluation, size, report)["seconds"] += seconds
                costs.observe(sum(s.encoded_tokens for s in report.samples), 2 * len(report.samples), seconds)
                evaluation["rates"] = costs.state()
                logger.info("eval %s: %.1f s", label, seconds)
            save()


def evaluate_variant(export: Path, spec: dict, result: dict, save: Any) -> None:
    """Run the evaluation jobs in order while the predicted end stays before the deadline (NIAH at
    L and 64L gets at least one round, see `run_niah_rounds`)."""
    from data.synthetic import generate_kv_facts
    from eval.harness import LoopSettings
    from eval.niah import run_niah
    from eval.qa import run_qa

    settings = spec["eval"]
    device = spec["device"]
    deadline = spec["end_deadline"] - settings["margin_s"]
    # Two rounds cover the two-hop chains; short limits bound the cost of a model that rambles.
    loop = LoopSettings(max_rounds=2, max_round_tokens=24, max_answer_tokens=40,
                        max_batch_tokens=settings["max_batch_tokens"], show_progress=False,
                        memory_on_model_device=settings.get("memory_on_gpu", False))
    started = time.time()
    model = load_eval_model(export, device, loop, settings.get("template"))
    evaluation = result["eval"]
    evaluation.update(export=str(export), niah={}, qa_recall={}, skipped=[], settings=settings,
                      load_s=time.time() - started)
    costs = CostModel(settings["assumed_encode_tokens_per_s"], settings["assumed_question_s"],
                      min_tokens=4 * spec["longest_row"])
    niah_reports: dict[int, Any] = {}
    jobs = eval_jobs(spec["longest_row"], settings)
    for job in jobs:
        if job["kind"] == "niah_rounds":
            reserve = sum(costs.predict(*job_size(j, settings)) for j in jobs_kept_time_for(jobs, job))
            run_niah_rounds(model, job["sizes"], settings, costs, deadline - reserve, deadline + settings["margin_s"],
                            niah_reports, evaluation, save)
            continue
        tokens, questions = job_size(job, settings)
        predicted = costs.predict(tokens, questions)
        label = f"{job['kind']}@{size_label(job['size'])}" + (f"/{job['subtask']}" if "subtask" in job else "")
        if predicted > deadline - time.time():
            evaluation["skipped"].append({"job": label, "predicted_s": round(predicted, 1)})
            save()
            continue
        started = time.time()
        try:
            if job["kind"] == "niah":
                report = run_niah(model, sizes=[job["size"]], samples_per_task=settings["niah_samples"],
                                  subtasks=[job["subtask"]], seed=0, routed_ids_too=True,
                                  matched=settings.get("niah_matched", False))
                summary = add_niah_samples(niah_reports, evaluation, job["size"], report)
                encoded, asked = sum(s.encoded_tokens for s in report.samples), 2 * len(report.samples)
            else:
                if job["kind"] == "qa_recall":
                    dataset = needle_memory(model, job["size"], settings["qa_questions"], HELDOUT_SEED + job["size"] % 997)
                elif job["kind"] == "multihop":
                    dataset = chains_memory(model, job["size"], HELDOUT_SEED + 1, settings["qa_questions"])
                else:
                    dataset = generate_kv_facts(**{**settings["kv_generator"], "num_queries": settings["qa_questions"],
                                                   "seed": HELDOUT_SEED + 2})
                # Unpinned: pinning a 1M-token memory took 22-33 s on an H100 host, more than its
                # 16 questions took in all; NIAH asks its memories unpinned for the same reason.
                report = run_qa(model, dataset, pin=False)
                summary = qa_summary(report)
                if job["kind"] == "qa_recall":
                    evaluation["qa_recall"][str(job["size"])] = summary
                else:
                    evaluation[job["kind"]] = summary
                encoded, asked = report.memory_tokens, len(report.items)
            seconds = time.time() - started
            summary.setdefault("seconds", 0.0)
            summary["seconds"] += seconds
            costs.observe(encoded, asked * (2 if job["kind"] == "multihop" else 1), seconds, memory_tokens=job["size"])
            logger.info("eval %s: %.1f s (predicted %.1f)", label, seconds, predicted)
        except Exception:
            evaluation.setdefault("errors", []).append({"job": label, "traceback": traceback.format_exc()})
            logger.exception("eval %s failed", label)
        evaluation["rates"] = costs.state()
        save()


def run_worker(spec_path: Path) -> int:
    """One variant on one device: wait for its data, train the stages, evaluate; `result.json` throughout."""
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    run_dir = Path(spec["run_dir"])
    result: dict[str, Any] = {"variant": spec["variant"], "overrides": spec["overrides"], "status": "running",
                              "errors": [], "stages": [], "eval": {}, "device": spec["device"],
                              "timing": {"started": time.time()}}
    if torch.cuda.is_available() and spec["device"].startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name(0)
    earlier_stages = {s["stage"]: s for s in (read_json(run_dir / "result.json") or {}).get("stages", [])}
    save = lambda: write_json_atomic(run_dir / "result.json", result)  # noqa: E731
    save()
    export = None
    try:
        export = train_variant(spec, result, save, earlier_stages)
    except Exception:
        result["errors"].append(f"training: {traceback.format_exc()}")
        logger.exception("training failed")
        from train.export import is_complete_export
        from train.trainer import export_dir

        exports = [export_dir(run_dir, s["stage"]) for s in result["stages"]]
        complete = [e for e in exports if is_complete_export(e)]
        export = complete[-1] if complete else None
    result["timing"]["train_end"] = time.time()
    save()
    if export is not None:
        try:
            evaluate_variant(export, spec, result, save)
        except Exception:
            result["errors"].append(f"evaluation: {traceback.format_exc()}")
            logger.exception("evaluation failed")
    else:
        result["errors"].append("no complete export to evaluate")
    result["timing"]["end"] = time.time()
    result["status"] = "ok" if not result["errors"] and not result["eval"].get("errors") else "errors"
    save()
    return 0 if result["status"] == "ok" else 1


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass
class Job:
    variant: str
    slot: int  # GPU index, or -1 for a CPU slot
    queue: int  # the worker queue it waits in: one per `--gpus` entry, so a repeated GPU index shares that GPU
    run_dir: Path
    spec_path: Path
    log_path: Path
    prep: subprocess.Popen | None = None
    process: subprocess.Popen | None = None
    hard_deadline: float = 0.0
    started: float = 0.0
    finished: float = 0.0


def assign_worker_slots(num_variants: int, slots: Sequence[int]) -> list[tuple[int, int]]:
    """(device slot, queue) of each variant, round robin over the queues: one queue per entry of
    `slots`, so a GPU named k times runs k variants at once (each with about 1/k of it) and the
    variants past the number of entries wait for a queue to free up."""
    if not slots:
        raise ValueError("no worker slots: name at least one GPU (or CPU slot)")
    return [(slots[index % len(slots)], index % len(slots)) for index in range(num_variants)]


def child_env(device: str, slot: int, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WANDB_MODE="disabled")
    if device == "cuda":
        # Workers tokenise memories of up to a million tokens per sample; nothing forks after that.
        env.update(CUDA_VISIBLE_DEVICES=str(slot), DS_ACCELERATOR="cuda", TOKENIZERS_PARALLELISM="true")
    else:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def launch(mode: str, spec_path: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "experiments.gpu", mode, str(spec_path)],
                                cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def stop(process: subprocess.Popen | None, wait_s: float = 5.0) -> None:
    """End a child we started, and its own children (it leads its process group)."""
    if process is None or process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def stage_curves(run_dir: Path, stage_names: Sequence[str]) -> list[dict[str, Any]]:
    keys = ["loss", "lm_loss", "aux_loss", *(f"recall@{k}" for k in RECALL_KS), "tokens_per_s_per_device", "mfu", "memory_gb"]
    curves = []
    for name in stage_names:
        path = run_dir / "stages" / name / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        train = [{"step": r["step"], **{k: r.get(k) for k in keys}} for r in records if "loss" in r]
        # Evaluations also keep recall@1 per router layer: the mean hides a layer that stops routing.
        evals = [{"step": r["step"], **{k: r.get(f"eval/{k}") for k in keys[:6]},
                  **{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/recall@1/layer_")}}
                 for r in records if "eval/loss" in r]
        curves.append({"stage": name, "train": train, "eval": evals})
    return curves


def acceptance(variant: dict, row: int, accuracy_key: str = "accuracy") -> dict[str, Any]:
    """NIAH at 64 x the row length against NIAH at the row length (relative drop at most 10%),
    averaged over the subtasks measured at both sizes; `accuracy_key` "accuracy_routed_ids" judges
    the decoding with IDs among the routed documents. The sample counts are part of the check:
    with a few samples at 64L one answer moves the ratio by more than the 10% allowed."""
    niah = variant.get("eval", {}).get("niah", {})
    at_row = niah.get(str(row), {}).get(accuracy_key) or {}
    at_64 = niah.get(str(64 * row), {}).get(accuracy_key) or {}
    common = [task for task in at_row if task != "average" and task in at_64]
    check: dict[str, Any] = {"L": row, "subtasks": common, "niah_at_L": None, "niah_at_64L": None}
    if not common:
        check.update(passed=None, reason="not measured")
        return check
    for key, size in (("samples_at_L", row), ("samples_at_64L", 64 * row)):
        check[key] = sum(s["subtask"] in common for s in niah[str(size)].get("samples", []))
    check["niah_at_L"] = sum(at_row[t] for t in common) / len(common)
    check["niah_at_64L"] = sum(at_64[t] for t in common) / len(common)
    if check["niah_at_L"] == 0:
        check.update(passed=None, reason="accuracy at L is 0: no relative drop to judge")
    else:
        check["relative_drop"] = (check["niah_at_L"] - check["niah_at_64L"]) / check["niah_at_L"]
        check["passed"] = check["relative_drop"] <= 0.10
        score_key = "routed_ids_score" if accuracy_key == "accuracy_routed_ids" else "score"
        pairs = paired_niah_scores(niah[str(row)].get("samples", []), niah[str(64 * row)].get("samples", []),
                                   common, score_key)
        check.update(paired_niah_comparison(pairs))
        check["pairs_matched"] = bool(variant.get("eval", {}).get("settings", {}).get("niah_matched", False))
    return check


def paired_niah_scores(at_row: list[dict], at_64: list[dict], subtasks: Sequence[str],
                       score_key: str = "score") -> dict[str, list[tuple[float, float]]]:
    """Per subtask, (score at L, score at 64L) of the samples asked in the same round: the n-th
    sample of a subtask at one size pairs with its n-th at the other. By default the two are
    different questions (`run_niah` seeds each size's generator apart), so a pair is a unit of
    resampling; with `--niah-matched` they are the same question in different haystacks, a matched
    comparison. Samples without a partner (a deadline inside a round) are left out."""
    pairs = {}
    for task in subtasks:
        row_scores = [s[score_key] for s in at_row if s["subtask"] == task and s.get(score_key) is not None]
        wide_scores = [s[score_key] for s in at_64 if s["subtask"] == task and s.get(score_key) is not None]
        pairs[task] = list(zip(row_scores, wide_scores))
    return pairs


def paired_niah_comparison(pairs: dict[str, list[tuple[float, float]]], resamples: int = 2000,
                           seed: int = 0) -> dict[str, Any]:
    """How far the samples support the relative drop: a 90% bootstrap interval of the drop,
    resampling each subtask's pairs (the accuracy is the mean over subtasks, as in the check),
    and the pairs right at one size only (`right_at_L_only`, `right_at_64L_only`)."""
    tasks = [task for task, task_pairs in pairs.items() if task_pairs]
    flat = [pair for task in tasks for pair in pairs[task]]
    comparison: dict[str, Any] = {
        "pairs": len(flat),
        "right_at_L_only": sum(row == 1 and wide < 1 for row, wide in flat),
        "right_at_64L_only": sum(wide == 1 and row < 1 for row, wide in flat),
        "drop_interval_90": None,
    }
    if not tasks:
        return comparison
    rng = random.Random(seed)
    drops = []
    for _ in range(resamples):
        drawn = {task: rng.choices(pairs[task], k=len(pairs[task])) for task in tasks}
        at_row = sum(statistics.fmean(r for r, _ in drawn[t]) for t in tasks) / len(tasks)
        at_64 = sum(statistics.fmean(w for _, w in drawn[t]) for t in tasks) / len(tasks)
        if at_row > 0:
            drops.append((at_row - at_64) / at_row)
    if drops:
        drops.sort()
        comparison["drop_interval_90"] = [drops[int(0.05 * (len(drops) - 1))], drops[int(0.95 * (len(drops) - 1))]]
    return comparison


def summary_table(results: dict[str, Any]) -> str:
    row = results["longest_row"]
    head = ("| variant | status | steps per stage | train s | final LM loss (eval split) | final recall@1 (eval split) | "
            f"NIAH @{size_label(row)} | NIAH @{size_label(64 * row)} | within 10% | NIAH, routed IDs only, "
            f"@{size_label(row)} / @{size_label(64 * row)} | within 10% | router R@1 @{size_label(row)} | "
            f"R@1 @{size_label(64 * row)} | ID = routed @{size_label(row)} / @{size_label(64 * row)} | multi-hop EM | "
            "KV EM |")
    lines = [head, "|" + "---|" * 16]

    def fmt(value: Any) -> str:
        return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    for name, variant in results["variants"].items():
        stages = variant.get("stages", [])
        curves = variant.get("curves", [])
        # The last stage's held-out split, not its last training batch: one batch of a few
        # examples swung recall@1 between 0 and 1 at the end of runs that routed well.
        last = curves[-1]["eval"][-1] if curves and curves[-1].get("eval") else {}
        timing = variant.get("timing", {})
        if stages and all(stage.get("reused") for stage in stages):  # `--resume`: the earlier call's training
            train_s = f"{round(sum(stage.get('wall_s', 0.0) for stage in stages))} (reused)"
        elif timing.get("train_end"):
            train_s = round(timing["train_end"] - timing.get("started", timing["train_end"]))
        else:
            train_s = None
        ev = variant.get("eval", {})
        qa = ev.get("qa_recall", {})
        check = variant.get("acceptance", {})
        routed = variant.get("acceptance_routed_ids", {})

        def passed(check: dict) -> str:
            verdict = {True: "yes", False: "NO", None: check.get("reason", "-")}[check.get("passed")]
            interval = check.get("drop_interval_90")
            if check.get("passed") is None or not interval:
                return verdict
            return f"{verdict} (drop {check['relative_drop']:.2f}, 90% CI {interval[0]:.2f}..{interval[1]:.2f})"

        lines.append("| " + " | ".join([
            name, variant.get("status", "missing"), "/".join(str(s.get("steps")) for s in stages) or "-",
            fmt(train_s), fmt(last.get("lm_loss")), fmt(last.get("recall@1")),
            fmt(check.get("niah_at_L")), fmt(check.get("niah_at_64L")), passed(check),
            f"{fmt(routed.get('niah_at_L'))} / {fmt(routed.get('niah_at_64L'))}", passed(routed),
            fmt(qa.get(str(row), {}).get("router_recall", {}).get("recall@1")),
            fmt(qa.get(str(64 * row), {}).get("router_recall", {}).get("recall@1")),
            " / ".join(fmt(qa.get(str(size), {}).get("ids_from_routed")) for size in (row, 64 * row)),
            fmt(ev.get("multihop", {}).get("exact_match")), fmt(ev.get("kv", {}).get("exact_match")),
        ]) + " |")
    return "\n".join(lines)


def plot_results(results: dict[str, Any], results_dir: Path, name: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return []
    from eval.scaling import PAPER_NIAH_AVERAGE

    paths = []
    variants = results["variants"]
    colours = {v: f"C{i}" for i, v in enumerate(variants)}

    def stage_axis(curves: list[dict]) -> list[tuple[dict, int]]:
        out, offset = [], 0
        for curve in curves:
            out.append((curve, offset))
            offset += curve["train"][-1]["step"] if curve["train"] else 0
        return out

    for kind, panels in (("loss", ("lm_loss", "aux_loss")), ("recall", ("recall@1", "recall@5"))):
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for axis, key in zip(axes, panels):
            for variant, data in variants.items():
                placed = stage_axis(data.get("curves", []))
                for index, (curve, start) in enumerate(placed):
                    points = [(start + r["step"], r[key]) for r in curve["train"] if r.get(key) is not None]
                    if points:
                        axis.plot(*zip(*points), color=colours[variant], alpha=0.85, linewidth=1,
                                  label=VARIANT_TITLES.get(variant, variant) if index == 0 else None)
                    evals = [(start + r["step"], r[key]) for r in curve["eval"] if r.get(key) is not None]
                    if evals:
                        axis.scatter(*zip(*evals), color=colours[variant], edgecolor="black", zorder=3, s=18)
                    if variant == next(iter(variants)) and index > 0:
                        axis.axvline(start, color="grey", linestyle="--", linewidth=0.7)
                        axis.text(start, 1.0, f" {curve['stage']}", transform=axis.get_xaxis_transform(),
                                  va="top", fontsize=7, color="grey")
            axis.set_xlabel("optimizer step (stages in order)")
            axis.set_ylabel(key)
            if kind == "loss":
                axis.set_yscale("log")
            else:
                axis.set_ylim(0, 1.05)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
        figure.suptitle(f"{name}: training {kind} (lines: training rows; dots: held-out rows at each stage end)",
                        fontsize=9)
        figure.tight_layout()
        path = results_dir / f"{name}_{kind}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(str(path))

    row = results["longest_row"]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for variant, data in variants.items():
        niah = data.get("eval", {}).get("niah", {})
        title = VARIANT_TITLES.get(variant, variant)
        for key, style, label in (("average", dict(marker="o"), title),
                                  ("average_routed_ids", dict(marker="s", linestyle="--"), f"{title}, IDs among routed documents")):
            points = sorted((int(size), value[key]) for size, value in niah.items() if value.get(key) is not None)
            if points:
                axis.plot(*zip(*points), color=colours[variant], label=label, **style)
    for reference, values in PAPER_NIAH_AVERAGE.items():
        if reference.startswith("MSA"):
            axis.plot(sorted(values), [values[s] for s in sorted(values)], color="grey", linestyle=":", marker="x",
                      label=reference)
    for size, text in ((row, "L (longest training row)"), (64 * row, "64 L")):
        axis.axvline(size, color="black", linestyle="--", linewidth=0.7)
        axis.text(size, 1.02, f" {text}", fontsize=7)
    axis.set_xscale("log", base=2)
    axis.set_ylim(0, 1.08)
    axis.set_xlabel("memory tokens")
    axis.set_ylabel("NIAH accuracy (average over subtasks)")
    axis.set_title(f"{name}: NIAH against memory size", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = results_dir / f"{name}_niah.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    paths.append(str(path))

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for axis, key in zip(axes, ("recall@1", "recall@5")):
        for variant, data in variants.items():
            qa = data.get("eval", {}).get("qa_recall", {})
            points = sorted((int(size), value["router_recall"][key]) for size, value in qa.items()
                            if value.get("router_recall", {}).get(key) is not None)
            if points:
                axis.plot(*zip(*points), marker="o", color=colours[variant], label=VARIANT_TITLES.get(variant, variant))
        axis.axvline(row, color="black", linestyle="--", linewidth=0.7)
        axis.axvline(64 * row, color="black", linestyle="--", linewidth=0.7)
        axis.set_xscale("log", base=2)
        axis.set_ylim(0, 1.05)
        axis.set_xlabel("memory tokens")
        axis.set_ylabel(f"held-out router {key}")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(f"{name}: router {'/'.join(f'recall@{k}' for k in RECALL_KS[:2])} of the needle among every "
                    "document of one shared memory (first round, mean over router layers)", fontsize=9)
    figure.tight_layout()
    path = results_dir / f"{name}_memory_recall.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    paths.append(str(path))
    return paths


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log)\n"
    text = path.read_bytes()[-400_000:].decode("utf-8", errors="replace").replace("\r", "\n")
    kept = [line for line in text.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    return "\n".join(kept[-lines:]) + "\n"


def run_driver(args: argparse.Namespace) -> int:
    t0 = time.time()
    from train.config import load_recipe

    budget_s = args.time_budget * 60.0
    end_all = t0 + budget_s - args.aggregation_reserve
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    recipe_path = args.recipe.resolve()
    user_overrides = list(args.overrides)
    base = load_recipe(recipe_path, user_overrides)
    if args.smoke:
        user_overrides = [*smoke_overrides(base), *user_overrides]
        base = load_recipe(recipe_path, user_overrides)
    variants = list(args.variants or (("main", "global_positions") if args.smoke else ABLATIONS))
    if device == "cuda":
        slots = list(args.gpus) if args.gpus else list(range(__import__("torch").cuda.device_count()))
        if not slots:
            raise SystemExit("no GPU visible; pass --device cpu (or --smoke) to run on the CPU")
    else:
        slots = [-1 - i for i in range(max(1, args.parallel))]
    work_dir = args.work_dir.resolve()
    results_dir = args.results_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    row = longest_row(base)
    fixed_steps = (recorded_stage_steps(args.steps_from, [stage.name for stage in base.stages])
                   if args.steps_from else None)
    if fixed_steps:
        logger.info("steps per stage from %s: %s", args.steps_from, fixed_steps)
    logger.info("variants %s on %s slots %s; budget %.1f min; longest row %d", variants, device, slots,
                args.time_budget, row)

    tokenizer_dir = work_dir / "tokenizer"
    started = time.time()
    prepare_shared_tokenizer(base, tokenizer_dir)
    tokenizer_s = time.time() - started

    cpu_count = os.cpu_count() or 2
    parallel = min(len(slots), len(variants))
    threads = args.threads or (max(1, min(8, cpu_count // max(parallel, 1))) if device == "cuda" else 1)
    build_workers = args.build_workers or max(1, min(16, cpu_count // max(len(variants), 1)))
    ports = free_ports(len(variants))
    queues: dict[int, list[Job]] = {queue: [] for queue in range(len(slots))}
    workers_per_gpu = {slot: slots.count(slot) for slot in slots}
    jobs: list[Job] = []
    for index, (variant, (slot, queue)) in enumerate(zip(variants, assign_worker_slots(len(variants), slots))):
        run_dir = work_dir / variant / "run"
        if run_dir.exists() and not args.resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        job = Job(variant, slot, queue, run_dir, work_dir / variant / "spec.json", work_dir / variant / "worker.log")
        job.log_path.unlink(missing_ok=True)
        queues[queue].append(job)
        jobs.append(job)
    eval_reserve_s = args.eval_reserve if args.eval_reserve is not None else (120.0 if device == "cuda" else 40.0)
    if fixed_steps and not args.resume:
        longest_queue = max(len(queue) for queue in queues.values())
        warn_if_fixed_steps_leave_no_evaluation(
            *recorded_training_seconds(args.steps_from), (end_all - time.time()) / longest_queue,
            max(workers_per_gpu.values()), eval_reserve_s)
    eval_settings = {
        "size_multiples": list(SIZE_MULTIPLES),
        "niah_subtasks": list(args.niah_subtasks[:2] if args.smoke else args.niah_subtasks),
        "kv_generator": kv_generator_options(base),
        "template": qa_template(base),
        "niah_samples": 1 if args.smoke else args.niah_samples,
        "niah_matched": args.niah_matched,
        "memory_on_gpu": args.memory_on_gpu,
        "qa_questions": 4 if args.smoke else args.qa_questions,
        "max_batch_tokens": 65536 if device == "cuda" else 8192,
        "assumed_encode_tokens_per_s": 150_000.0 if device == "cuda" else 20_000.0,
        "assumed_question_s": 0.4 if device == "cuda" else 0.3,
        "margin_s": 5.0,
    }

    def spec_for(job: Job, index: int, slot_end: float) -> dict:
        variant_ovr = variant_overrides(base, job.variant)
        eval_reserve = min(eval_reserve_s, 0.35 * (slot_end - time.time()))  # queued variants get shorter slots
        return {
            "variant": job.variant, "recipe": str(recipe_path), "run_dir": str(job.run_dir),
            "overrides": [*user_overrides, *variant_ovr, f"run.output_dir={job.run_dir}"],
            "tokenizer_source": str(tokenizer_dir), "build_workers": build_workers, "device": device,
            "threads": threads, "train_deadline": slot_end - eval_reserve, "end_deadline": slot_end,
            "assumed_tokens_per_s": (args.assumed_tokens_per_s / workers_per_gpu[job.slot]
                                     if device == "cuda" else 3000.0),
            "stage_overhead_s": 20.0 if device == "cuda" else 8.0,
            "max_step_scale": 1.0 if args.smoke else args.max_step_scale,
            "min_steps": 2 if args.smoke else 5, "longest_row": row, "eval": eval_settings,
            "fixed_steps": fixed_steps, "port": ports[index],
        }

    # Data builds for every variant start now, on the CPU, beside the first workers.
    for index, job in enumerate(jobs):
        write_json_atomic(job.spec_path, spec_for(job, index, end_all))
        job.prep = launch("--prep", job.spec_path, work_dir / job.variant / "prep.log",
                          child_env("cpu", -1, ports[index], 1))

    def start(job: Job) -> None:
        now = time.time()
        waiting = len([j for j in queues[job.queue] if j.process is None])
        slot_end = now + (end_all - now) / max(waiting, 1)
        index = jobs.index(job)
        spec = spec_for(job, index, slot_end)
        write_json_atomic(job.spec_path, spec)
        job.hard_deadline = slot_end + args.grace
        job.started = now
        job.process = launch("--worker", job.spec_path, job.log_path, child_env(device, job.slot, ports[index], threads))
        logger.info("started %s on %s until %s (train until %s)", job.variant,
                    f"GPU {job.slot}" if job.slot >= 0 else "CPU", time.strftime("%H:%M:%S", time.localtime(slot_end)),
                    time.strftime("%H:%M:%S", time.localtime(spec["train_deadline"])))

    last_snapshot = time.time()
    try:
        while True:
            if time.time() - last_snapshot > SNAPSHOT_EVERY_S:
                write_progress_snapshot(jobs, args, device, row, t0, results_dir)
                last_snapshot = time.time()
            for queue in queues.values():
                running = [j for j in queue if j.process is not None and j.process.poll() is None]
                if running:
                    job = running[0]
                    if time.time() > job.hard_deadline:
                        logger.warning("%s ran past its deadline: stopping it", job.variant)
                        stop(job.process)
                    continue
                waiting = [j for j in queue if j.process is None]
                if waiting and time.time() < end_all - 30:
                    start(waiting[0])
            for job in jobs:
                if job.process is not None and job.process.poll() is not None and not job.finished:
                    job.finished = time.time()
                    logger.info("%s finished (exit %s) after %.0f s", job.variant, job.process.returncode,
                                job.finished - job.started)
            pending = [j for j in jobs if j.process is None and time.time() < end_all - 30]
            active = [j for j in jobs if j.process is not None and j.process.poll() is None]
            if not pending and not active:
                break
            time.sleep(1.0)
    finally:
        for job in jobs:
            stop(job.process)
            stop(job.prep)

    results = aggregate(jobs, base, device, row, args, t0, tokenizer_s, results_dir, work_dir)
    return 0 if all(v.get("status") == "ok" for v in results["variants"].values()) else 1


def merge_variants(results: dict[str, Any], earlier: list[Path]) -> None:
    """Add the variants of earlier runs' result files that this run did not train, so that
    machines with fewer GPUs than variants can run them over several calls and still get one
    table and one set of plots; their acceptance is judged again with this version's check. A
    file from another longest row or recipe is refused."""
    for path in earlier:
        previous = read_json(path)
        if previous is None:
            raise FileNotFoundError(f"--merge {path}: no readable results file there")
        mine = {"recipe": Path(results["recipe"]).name, "overrides": results["overrides"],
                "longest_row": results["longest_row"], "smoke": results["smoke"],
                "niah_matched": results.get("niah_matched", False)}
        theirs = {**{key: previous.get(key) for key in mine}, "recipe": Path(previous.get("recipe") or "").name,
                  "niah_matched": previous.get("niah_matched", False)}  # files from before the option: unmatched
        for key in mine:
            if theirs[key] != mine[key]:
                raise ValueError(f"--merge {path}: its {key} is {theirs[key]!r}, this run's is {mine[key]!r}")
        for name, variant in previous.get("variants", {}).items():
            if name not in results["variants"]:
                merged = {**variant, "merged_from": str(path), "merged_device": previous.get("device")}
                # Judged again from its samples, so every row of the table is judged alike.
                merged["acceptance"] = acceptance(merged, results["longest_row"])
                merged["acceptance_routed_ids"] = acceptance(merged, results["longest_row"], "accuracy_routed_ids")
                results["variants"][name] = merged


def output_name(args: argparse.Namespace) -> str:
    return args.name or ("gpu_scale_smoke" if args.smoke else "gpu_scale")


def results_header(args: argparse.Namespace, device: str, row: int) -> dict[str, Any]:
    """What a results file says about its run, partial or final (`merge_variants` compares these)."""
    return {"recipe": str(args.recipe), "overrides": list(args.overrides), "smoke": args.smoke, "device": device,
            "longest_row": row, "steps_from": str(args.steps_from) if args.steps_from else None,
            "niah_matched": args.niah_matched}


def write_progress_snapshot(jobs: list[Job], args: argparse.Namespace, device: str, row: int, t0: float,
                            results_dir: Path) -> None:
    """The variants' results so far, written where the final results file goes (`"partial": true`),
    so that a run killed from outside (a device lease running out) still leaves its numbers."""
    snapshot = {"partial": True, **results_header(args, device, row), "wall_s": time.time() - t0,
                "variants": {job.variant: read_json(job.run_dir / "result.json") or {"status": "not started"}
                             for job in jobs}}
    write_json_atomic(results_dir / f"{output_name(args)}.json", snapshot)


def aggregate(jobs: list[Job], base: Any, device: str, row: int, args: argparse.Namespace, t0: float,
              tokenizer_s: float, results_dir: Path, work_dir: Path) -> dict[str, Any]:
    import platform

    import torch

    stage_names = [stage.name for stage in base.stages]
    results: dict[str, Any] = {
        **results_header(args, device, row), "memory_sizes": [row * m for m in sorted(SIZE_MULTIPLES)],
        "time_budget_min": args.time_budget, "tokenizer_s": tokenizer_s,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                    if torch.cuda.is_available() else []},
        "variants": {},
    }
    for job in jobs:
        variant = read_json(job.run_dir / "result.json") or {"variant": job.variant, "status": "missing"}
        if variant.get("status") == "running":
            variant["status"] = "stopped (deadline or crash)"
        if job.process is not None and job.process.returncode not in (0, None):
            variant["exit_code"] = job.process.returncode
        variant["slot"] = f"GPU {job.slot}" if job.slot >= 0 else "CPU"
        variant["wall_s"] = (job.finished or time.time()) - job.started if job.started else None
        variant["curves"] = stage_curves(job.run_dir, stage_names)
        variant["acceptance"] = acceptance(variant, row)
        variant["acceptance_routed_ids"] = acceptance(variant, row, "accuracy_routed_ids")
        results["variants"][job.variant] = variant
    merge_variants(results, args.merge)
    name = output_name(args)
    results["wall_s"] = time.time() - t0
    write_json_atomic(results_dir / f"{name}.json", results)  # first, so a failure below keeps the numbers
    problems = []
    try:
        table = summary_table(results)
    except Exception:
        table = "(no summary table)"
        problems.append(f"summary table: {traceback.format_exc()}")
    results["summary_table"] = table
    try:
        results["plots"] = plot_results(results, results_dir, name)
    except Exception:
        results["plots"] = []
        problems.append(f"plots: {traceback.format_exc()}")
    results["driver_errors"] = problems
    results["wall_s"] = time.time() - t0
    write_json_atomic(results_dir / f"{name}.json", results)
    log = [f"# {name}: {device}, budget {args.time_budget} min, wall {results['wall_s']:.0f} s\n", table, "",
           *problems]
    for job in jobs:
        log += [f"\n## {job.variant}: prep log\n", log_tail(work_dir / job.variant / "prep.log", 30),
                f"\n## {job.variant}: worker log\n", log_tail(job.log_path)]
        errors = results["variants"][job.variant].get("errors") or []
        if errors:
            log += [f"\n## {job.variant}: errors\n", *[str(e)[-3000:] + "\n" for e in errors]]
        eval_errors = results["variants"][job.variant].get("eval", {}).get("errors") or []
        log += [f"\n## {job.variant}: evaluation error in {e.get('job')}\n{str(e.get('traceback'))[-2000:]}\n"
                for e in eval_errors[:5]]
    (results_dir / f"{name}_log.txt").write_text("\n".join(log))
    print(table)
    print(*problems, sep="\n")
    print(f"\nwall {results['wall_s']:.0f} s; results in {results_dir / (name + '.json')}")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides for every variant")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--results-dir", type=Path, default=REPO / "runs" / "experiments")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "msa_gpu_experiment")
    parser.add_argument("--name", help="file stem of the outputs (default gpu_scale, or gpu_scale_smoke)")
    parser.add_argument("--gpus", type=int, nargs="*",
                        help="GPU indices, one worker each at a time (default: all); repeat an index to run several "
                             "variants at once on that GPU, e.g. --gpus 0 0 0 0")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS,
                        help="default: main and the three ablations (main and global_positions with --smoke); "
                             "id_strides spaces training memories' IDs by random strides")
    parser.add_argument("--time-budget", type=float, default=7.0, help="minutes of wall clock for everything")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--parallel", type=int, default=1, help="variants at once on the CPU")
    parser.add_argument("--smoke", action="store_true",
                        help="toy scale on the CPU (a 4-layer model, 768/1536-token rows, 2-3 steps per stage)")
    parser.add_argument("--assumed-tokens-per-s", type=float, default=100_000.0,
                        help="training throughput per GPU assumed before the first stage is measured")
    parser.add_argument("--max-step-scale", type=float, default=2.0,
                        help="at most this many times the recipe's steps when time allows")
    parser.add_argument("--eval-reserve", type=float, help="seconds kept for evaluation (default 120 on GPUs, 40 on the CPU; at most 35%% of a variant's time)")
    parser.add_argument("--aggregation-reserve", type=float, default=20.0, help="seconds kept for plots and JSON")
    parser.add_argument("--grace", type=float, default=15.0, help="seconds past its deadline before a worker is stopped")
    parser.add_argument("--niah-samples", type=int, default=2, help="samples per NIAH subtask and memory size")
    parser.add_argument("--niah-subtasks", nargs="+", default=list(NIAH_SUBTASKS), metavar="SUBTASK",
                        help=f"eval/niah.py subtasks (default: {' '.join(NIAH_SUBTASKS)})")
    parser.add_argument("--qa-questions", type=int, default=16, help="questions per held-out QA memory")
    parser.add_argument("--threads", type=int, help="torch threads per worker")
    parser.add_argument("--build-workers", type=int, help="processes per variant for the data builds")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], metavar="JSON",
                        help="earlier runs' gpu_scale JSON files whose other variants join this run's table and plots")
    parser.add_argument("--resume", action="store_true", help="keep existing run folders (finished stages are skipped)")
    parser.add_argument("--memory-on-gpu", action="store_true",
                        help="evaluation keeps each encoded memory on the GPU instead of the host (about 25 GB at 1M "
                             "tokens for the 320M model): no copies to the host and back")
    parser.add_argument("--niah-matched", action="store_true",
                        help="NIAH at L and 64L asks the same questions of the same needles at the same depths, "
                             "only the haystack differs (default: each size draws its own, as runs before this option)")
    parser.add_argument("--steps-from", type=Path, metavar="JSON",
                        help="train each stage for the steps variant main trained in this earlier results file "
                             "(ablations matched to main on any card); the time budget then bounds only evaluation")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--worker"], ["--prep"]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if argv[0] == "--prep":
            prepare_variant(json.loads(Path(argv[1]).read_text()))
            return 0
        return run_worker(Path(argv[1]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_intermixed_args(argv)
    return run_driver(args)


if __name__ == "__main__":
    raise SystemExit(main())
