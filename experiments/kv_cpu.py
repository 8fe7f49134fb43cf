"""The CPU-scale proof that the pipeline builds working MSA models.

One command trains a tiny random Qwen3 with the real pipeline (`recipes/kv_cpu.yaml`: the
CPT warm-up with an aux-heavy loss, then CPT main, DeepSpeed in one process), then answers
held-out key-value questions through `eval` (memory encoding, routing, memory
interleave), and writes the numbers and the curves:

    python -m experiments.kv_cpu                    # -> $TMPDIR/msa_experiments/kv_cpu.{json,*.png}
    python -m experiments.kv_cpu --seed 3 --results-dir /tmp/kv run.output_dir=/tmp/kv/run

Held-out means new facts: every evaluation memory comes from `generate_kv_facts` with seeds
that no training or in-training eval source uses, and holds as many documents as a training
memory, so router recall@1 has a chance level of 1 / that number.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from data.synthetic import generate_kv_facts
from data.templates import TemplateConfig
from eval.harness import EvalModel, LoopSettings, write_json
from eval.qa import QAReport, run_qa
from train.api import Recipe, export_dir, load_recipe
from train.runner import main as run_training
from train.tracking import stage_curves

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "recipes" / "kv_cpu.yaml"
DEFAULT_RESULTS_DIR = Path(tempfile.gettempdir()) / "msa_experiments"  # outside the repository unless asked
# Far from the recipe's data seeds (0, 1, 2), so no evaluation memory repeats a training fact set.
HELDOUT_SEED_BASE = 1000
RECALL_KS = (1, 5, 10)


def memory_docs_of(recipe: Recipe) -> int:
    """Documents per training memory (the largest over the stages' sources): the held-out memory size."""
    sources = {name for stage in recipe.stages for name in stage.sources}
    return max(int(recipe.data.sources[name].get("memory", {}).get("max_memory_docs", 512)) for name in sources)


def qa_source_of(recipe: Recipe) -> dict[str, Any]:
    """The last stage's first `qa` source: held-out facts use its generator options and template."""
    for name in recipe.stages[-1].sources:
        source = recipe.data.sources[name]
        if source.get("sample_kind") == "qa" and source.get("source", {}).get("kind") == "synthetic":
            return source
    raise ValueError("the recipe's last stage has no synthetic qa source")


def heldout_generator_options(source: dict[str, Any]) -> dict[str, Any]:
    """The training generator's task options (attributes, filler), without its size and seed."""
    options = dict(source["source"]["synthetic"])
    if options.pop("generator", None) != "kv_facts":
        raise ValueError("the qa source must use the kv_facts generator")
    for key in ("num_facts", "num_queries", "seed"):
        options.pop(key, None)
    return options


def evaluate_heldout(
    export: Path, memory_docs: int, memories: int, questions: int, seed: int, source: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Router recall@k and answer exact match over `memories` new fact memories of `memory_docs` documents,
    drawn with the training source's generator options and asked with its template."""
    source = source or {"source": {"synthetic": {"generator": "kv_facts", "filler_words": 0}}}
    options = heldout_generator_options(source)
    template = TemplateConfig.from_dict(source["template"]) if source.get("template") else None
    model = EvalModel.load(
        export,
        template=template,
        settings=LoopSettings(max_rounds=1, max_round_tokens=16, max_answer_tokens=16, show_progress=False),
    )
    merged = QAReport()
    for memory_index in range(memories):
        dataset = generate_kv_facts(
            num_facts=memory_docs, num_queries=questions, seed=HELDOUT_SEED_BASE + 100 * seed + memory_index, **options
        )
        report = run_qa(model, dataset)
        merged.items += report.items
        merged.memory_docs = report.memory_docs
        merged.memory_tokens = max(merged.memory_tokens, report.memory_tokens)
    summary = merged.summary()
    summary["chance_recall@1"] = 1 / memory_docs
    summary["memories"] = memories

    def described(item: Any) -> dict[str, Any]:
        return {
            "query": item.query,
            "reference": item.reference,
            "answer": item.answer,
            "positive_ids": item.positive_ids,
            "retrieved_ids": item.retrieved_ids,
            "routed_ids": item.routed_ids,
        }

    summary["examples"] = [described(item) for item in merged.items[:8]]
    # Every wrong answer (there are few once training works), so a failed run shows what went wrong.
    summary["errors"] = [described(item) for item in merged.items if (item.exact_match or 0.0) < 1.0]
    summary["generator_options"] = options
    return summary


def plot_curves(curves: list[dict[str, Any]], heldout: dict[str, Any], results_dir: Path, name: str) -> list[str]:
    """`<name>_loss.png` and `<name>_recall.png`: the stages side by side on one step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    offsets, offset = [], 0
    for curve in curves:
        offsets.append(offset)
        offset += curve["train"][-1]["step"] if curve["train"] else 0
    for kind, keys in (("loss", ("loss", "lm_loss", "aux_loss")), ("recall", tuple(f"recall@{k}" for k in RECALL_KS))):
        figure, axis = plt.subplots(figsize=(7, 4))
        for key_index, key in enumerate(keys):
            colour = f"C{key_index}"
            for stage_index, (curve, start) in enumerate(zip(curves, offsets)):
                label = key if stage_index == 0 else None
                axis.plot(
                    [start + r["step"] for r in curve["train"]],
                    [r[key] for r in curve["train"]],
                    color=colour,
                    alpha=0.8,
                    label=label,
                )
                if curve["eval"]:
                    axis.scatter(
                        [start + r["step"] for r in curve["eval"]],
                        [r[key] for r in curve["eval"]],
                        color=colour,
                        marker="o",
                        edgecolor="black",
                        zorder=3,
                        label=f"{key} (held-out rows)" if stage_index == 0 else None,
                    )
        for curve, start in zip(curves[1:], offsets[1:]):
            axis.axvline(start, color="grey", linestyle="--", linewidth=0.8)
            axis.text(start, axis.get_ylim()[1], f" {curve['stage']}", va="top", fontsize=8, color="grey")
        if kind == "recall":
            axis.axhline(heldout["chance_recall@1"], color="black", linestyle=":", linewidth=0.8, label="chance @1")
            axis.set_ylim(0, 1.05)
        axis.set_xlabel("optimizer step (stages in order)")
        axis.set_ylabel(kind)
        axis.set_title(f"{name}: {kind} (training rows; dots: held-out rows)")
        axis.legend(fontsize=7, loc="best")
        figure.tight_layout()
        path = results_dir / f"{name}_{kind}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(str(path))
    return paths


def machine_description() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def run_experiment(
    recipe_path: Path,
    overrides: list[str],
    results_dir: Path,
    seed: int,
    memories: int,
    questions: int,
    name: str = "kv_cpu",
    heldout_memory_docs: int | None = None,
) -> dict[str, Any]:
    """Train with the recipe, evaluate held out, write `<name>.json` and the plots; returns the JSON content.

    Held-out memories hold `heldout_memory_docs` facts, by default as many as a training memory."""
    overrides = [f"run.seed={seed}", *overrides]
    recipe = load_recipe(recipe_path, overrides)
    run_dir = Path(recipe.run.output_dir)
    started = time.perf_counter()
    code = run_training("all", [str(recipe_path), *overrides])
    if code != 0:
        raise RuntimeError(f"training exited with code {code}")
    trained = time.perf_counter()
    heldout = evaluate_heldout(
        export_dir(run_dir, recipe.stages[-1].name),
        heldout_memory_docs or memory_docs_of(recipe),
        memories,
        questions,
        seed,
        qa_source_of(recipe),
    )
    evaluated = time.perf_counter()
    results_dir.mkdir(parents=True, exist_ok=True)
    curves = stage_curves(run_dir, [stage.name for stage in recipe.stages])
    results = {
        "recipe": str(recipe_path),
        "overrides": overrides,
        "seed": seed,
        "heldout": heldout,
        "training_seconds": trained - started,
        "eval_seconds": evaluated - trained,
        "machine": machine_description(),
        "curves": curves,
    }
    results["plots"] = plot_curves(curves, heldout, results_dir, name)
    write_json(results_dir / f"{name}.json", results)
    logger.info(
        "held-out router recall@1 %.3f (chance %.3f), exact match %.3f; training %.0f s, eval %.0f s",
        heldout["router_recall"]["recall@1"],
        heldout["chance_recall@1"],
        heldout["exact_match"],
        trained - started,
        evaluated - trained,
    )
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides, e.g. run.output_dir=/tmp/kv")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--name", default="kv_cpu", help="file stem of the JSON and plots")
    parser.add_argument("--seed", type=int, default=0, help="run.seed, and which held-out memories are drawn")
    parser.add_argument("--memories", type=int, default=4, help="held-out memories")
    parser.add_argument("--questions", type=int, default=16, help="questions per held-out memory")
    parser.add_argument(
        "--heldout-memory-docs",
        type=int,
        default=None,
        help="facts per held-out memory (default: as many as a training memory holds)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_experiment(
        args.recipe,
        args.overrides,
        args.results_dir,
        args.seed,
        args.memories,
        args.questions,
        args.name,
        args.heldout_memory_docs,
    )
    logger.info("results: %s", args.results_dir / f"{args.name}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
