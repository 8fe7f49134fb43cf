"""The plan of a GPU-scale run: the variants as recipe overrides, the smoke-scale recipe, steps
per stage fitted to the time budget (`StepPlanner`) or taken from an earlier run, and which
worker slot runs which variant."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO / "recipes" / "qwen3_350m_synthetic.yaml"
# The comparison (the default), then recipe changes under test.
ABLATIONS = ("main", "no_aux", "global_positions", "no_interleave")
VARIANTS = ABLATIONS
VARIANT_TITLES = {
    "main": "MSA (all stages)",
    "no_aux": "without the aux loss",
    "global_positions": "global positions",
    "no_interleave": "without interleave steps",
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
TRAINING_TIME_MARGIN = 1.15


def one_round_counterpart(sources: dict[str, dict], name: str) -> str:
    """The `qa` source whose generator config equals interleave source `name`'s plus `hop_positives: true`."""
    source = sources[name]
    wanted = dict(source["source"])
    wanted["synthetic"] = {**wanted.get("synthetic", {}), "hop_positives": True}
    for candidate, values in sources.items():
        if (
            values.get("sample_kind") == "qa"
            and values.get("source") == wanted
            and values.get("memory") == source.get("memory")
        ):
            return candidate
    raise ValueError(
        f"the no_interleave variant needs a one-round counterpart of interleave source {name!r}: a "
        "qa source with the same generator settings plus hop_positives: true and the same memory"
    )


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
                replaced = {
                    one_round_counterpart(sources, name)
                    if sources[name].get("sample_kind") == "interleave"
                    else name: weight
                    for name, weight in stage.sources.items()
                }
                overrides.append(f"stages.{index}.sources={json.dumps(replaced)}")
        if not overrides:
            raise ValueError("the no_interleave variant needs a stage with an interleave source")
        return overrides
    raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")


def smoke_overrides(recipe: Any) -> list[str]:
    """Shrink the recipe to a few-minute CPU run that takes every code path of the real one:
    a 4-layer model (bf16, as on GPUs), rows of 768/1536 tokens, 2-3 steps per stage, small sources."""
    overrides = [
        "model.inline_config.hidden_size=64",
        "model.inline_config.intermediate_size=128",
        "model.inline_config.num_hidden_layers=4",
        "model.inline_config.num_attention_heads=4",
        "model.inline_config.num_key_value_heads=2",
        "model.inline_config.head_dim=16",
        "model.msa.top_k_docs=2",
        "model.msa.chunk_size=32",
        "tokenizer.train_tiny.vocab_size=768",
        "tokenizer.train_tiny.sample_records=60",
        "model.compile=false",  # compiling costs more than it saves in a few CPU steps; tests cover it
    ]
    if recipe.activations.checkpointed_layers is not None:
        overrides.append("activations.checkpointed_layers=2")
    caps = {
        "num_samples": 40,
        "num_queries": 60,
        "num_chains": 40,
        "num_facts": 64,
        "words_per_doc": 40,
        "haystack_docs": 3,
        "num_keys": 4,
    }
    long_rows = max(stage.row_length for stage in recipe.stages)
    for name, values in recipe.data.sources.items():
        synthetic = values.get("source", {}).get("synthetic", {})
        for key, cap in caps.items():
            if key in synthetic and int(synthetic[key]) > cap:
                overrides.append(f"data.sources.{name}.source.synthetic.{key}={cap}")
        long = int(values.get("max_example_tokens", 16384)) > 8192
        overrides += [
            f"data.sources.{name}.memory.memory_tokens={1152 if long else 384}",
            f"data.sources.{name}.max_example_tokens={1536 if long else 768}",
        ]
    for index, stage in enumerate(recipe.stages):
        row = 1536 if stage.row_length == long_rows and long_rows > 8192 else 768
        steps = 3 if index < 2 else 2
        overrides += [
            f"stages.{index}.row_length={row}",
            f"stages.{index}.micro_batch_tokens={row}",
            f"stages.{index}.global_batch_tokens={2 * row}",
            f"stages.{index}.budget.steps={steps}",
            f"stages.{index}.budget.tokens=null",
            f"stages.{index}.schedule.warmup_steps=1",
        ]
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
                options = {
                    key: value for key, value in synthetic.items() if key not in ("seed", "num_queries", "memory_size")
                }
                options["num_facts"] = min(int(options.get("num_facts", 300)), 300)
                return options
    return {"num_facts": 300, "filler_words": 12}


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


class StepPlanner:
    """Steps per stage so that training ends by `deadline`: recipe steps scaled by the time left over
    the time they would take, from the measured (or, before the first stage, assumed) throughput."""

    def __init__(
        self,
        planned: list[tuple[int, int]],
        deadline: float,
        tokens_per_s: float,
        overhead_s: float,
        max_scale: float,
        min_steps: int,
    ) -> None:
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
        raise ValueError(
            f"--steps-from {path}: no stage records of variant {variant!r} "
            f"(it has {sorted(results.get('variants', {}))})"
        )
    steps = {record["stage"]: record["steps"] for record in stages if record.get("steps")}
    missing = [name for name in stage_names if name not in steps]
    if missing:
        raise ValueError(
            f"--steps-from {path}: variant {variant!r} has no step count for stage(s) {missing}; "
            f"its stages are {sorted(steps)}"
        )
    return {name: int(steps[name]) for name in stage_names}


def recorded_training_seconds(path: Path, variant: str = "main") -> tuple[float | None, str | None]:
    """(seconds from the worker's start to the end of training, GPU name) of `variant` in an earlier
    run's results file; (None, None) where it did not record them."""
    record = (read_json(path) or {}).get("variants", {}).get(variant) or {}
    timing = record.get("timing", {})
    if not (timing.get("train_end") and timing.get("started")):
        return None, record.get("device_name")
    return timing["train_end"] - timing["started"], record.get("device_name")


def warn_if_fixed_steps_leave_no_evaluation(
    train_s: float | None, recorded_on: str | None, budget_s: float, workers_per_gpu: int, eval_reserve_s: float
) -> float | None:
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
        logger.warning(
            "--steps-from: those steps take about %.0f s here (recorded on %s); a budget of %.0f s leaves "
            "about %.0f s of evaluation (fewer than the %.0f s reserved): raise --time-budget, or expect "
            "NIAH's first round and little else",
            expected_s,
            recorded_on or "its card",
            budget_s,
            left,
            eval_reserve_s,
        )
    else:
        logger.info(
            "--steps-from: those steps take about %.0f s here (recorded on %s), leaving about %.0f s of evaluation",
            expected_s,
            recorded_on or "its card",
            left,
        )
    return left


def assign_worker_slots(num_variants: int, slots: Sequence[int]) -> list[tuple[int, int]]:
    """(device slot, queue) of each variant, round robin over the queues: one queue per entry of
    `slots`, so a GPU named k times runs k variants at once (each with about 1/k of it) and the
    variants past the number of entries wait for a queue to free up."""
    if not slots:
        raise ValueError("no worker slots: name at least one GPU (or CPU slot)")
    return [(slots[index % len(slots)], index % len(slots)) for index in range(num_variants)]
