"""Evaluate a checkpoint directory (a trainer stage export, or any MSA checkpoint with its
tokenizer files): NIAH accuracy per memory size with its scaling curve, and QA on local data.

    python -m eval.evaluate runs/tiny/stages/sft_long/export --out eval_out \
        --niah-sizes 32768 65536 --qa-beir path/to/beir_folder --qa-limit 200 --qa-sizes 16384 65536 262144

The prompt template is the export's own (its recipe copy, see `--template`).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from data.readers import read_beir, read_retrieval_jsonl
from data.templates import TemplateConfig, reference_template
from train.export_files import RECIPE_FILE

from .harness import EvalModel, LoopSettings, write_json
from .judge import JudgeClient
from .niah import DEFAULT_SIZES, SUBTASKS, run_niah
from .qa import run_qa, run_qa_scaling
from .scaling import PAPER_MSMARCO_JUDGE, PAPER_NIAH_AVERAGE, size_label, write_scaling_curve, write_scaling_curves

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, curves and tables")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--index-devices", nargs="*", help="devices for routing keys (default: --device)")
    parser.add_argument(
        "--template",
        help="the prompt template: a JSON or YAML file of TemplateConfig fields, or "
        "'reference' for the released MSA-4B engine's protocol (default: the template of "
        "the export's recipe copy, recipe.yaml, for the export's stage; our default "
        "template without one)",
    )
    parser.add_argument("--skip-niah", action="store_true")
    parser.add_argument("--niah-sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--niah-samples", type=int, default=4, help="samples per subtask and size")
    parser.add_argument("--niah-subtasks", nargs="+", choices=list(SUBTASKS))
    parser.add_argument("--qa-beir", type=Path, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--qa-split", default="test")
    parser.add_argument("--qa-records", type=Path, help="JSONL records {query, positives, answer?}")
    parser.add_argument("--qa-corpus", type=Path, help="corpus JSONL for --qa-records")
    parser.add_argument("--qa-limit", type=int)
    parser.add_argument(
        "--qa-sizes",
        type=int,
        nargs="+",
        help="also ask the QA questions over memories of these sizes (tokens): the questions' positives "
        "plus corpus distractors; writes qa_scaling.{json,md,png}",
    )
    parser.add_argument("--judge-url", help="OpenAI-compatible base URL; the LLM judge is off without it")
    parser.add_argument("--judge-model", default="gpt-4o-mini")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY")
    parser.add_argument("--max-rounds", type=int, default=3)
    parser.add_argument("--max-round-tokens", type=int, default=64)
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    parser.add_argument(
        "--routed-ids-only",
        action="store_true",
        help="decode retrieval rounds' IDs among the documents the routers selected (RoutedIdGrammar)",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument(
        "--memory-on-gpu",
        action="store_true",
        help="keep each encoded memory on the model's GPU instead of the host (it must fit there)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def recipe_template(checkpoint: Path) -> tuple[TemplateConfig | None, str]:
    """The template the export was trained with, from the recipe copy the trainer writes into it.

    A trainer export is `<run>/stages/<stage>/export`: the template is that stage's sources'
    (the heaviest source's where they differ, with a warning). Outside that layout the last
    stage's sources are used. Returns (None, reason) where there is no recipe copy.
    """
    path = checkpoint / RECIPE_FILE
    if not path.is_file():
        return None, f"no {RECIPE_FILE} in {checkpoint}"
    recipe = yaml.safe_load(path.read_text()) or {}
    sources = (recipe.get("data") or {}).get("sources") or {}
    stages = recipe.get("stages") or []
    stage_name = checkpoint.resolve().parent.name if checkpoint.resolve().name == "export" else None
    stage = next((s for s in stages if s.get("name") == stage_name), stages[-1] if stages else None)
    weights = (stage or {}).get("sources") or {name: 1.0 for name in sources}
    names = [n for n in sorted(weights, key=lambda n: -float(weights[n])) if n in sources]
    if not names:
        return TemplateConfig(), f"{path}: no data source for stage {stage_name!r}, reference format"
    templates = {n: TemplateConfig.from_dict(sources[n].get("template") or {}) for n in names}
    chosen = templates[names[0]]
    differing = [n for n in names if templates[n] != chosen]
    if differing:
        logger.warning("sources %s use templates other than %s's; evaluating with %s's", differing, names[0], names[0])
    return chosen, f"{path}, stage {(stage or {}).get('name')!r}, source {names[0]!r}"


def resolve_template(checkpoint: Path, choice: str | None) -> tuple[TemplateConfig, str]:
    """The template to evaluate with and where it came from (`--template`)."""
    if choice == "reference":
        return reference_template(), "the released MSA-4B engine's protocol (--template reference)"
    if choice:
        text = Path(choice).read_text()
        values = json.loads(text) if choice.endswith(".json") else yaml.safe_load(text)
        return TemplateConfig.from_dict(values or {}), choice
    template, source = recipe_template(checkpoint)
    if template is None:
        return TemplateConfig(), f"reference format ({source})"
    return template, source


def load_qa_dataset(args: argparse.Namespace):
    if args.qa_beir:
        return read_beir(args.qa_beir, args.qa_split)
    if args.qa_records:
        if not args.qa_corpus:
            raise SystemExit("--qa-records needs --qa-corpus")
        return read_retrieval_jsonl(args.qa_records, args.qa_corpus)
    return None


def evaluate(args: argparse.Namespace) -> dict:
    """Run the selected evals and write their files under `args.out`; returns results.json's content."""
    template, template_source = resolve_template(args.checkpoint, args.template)
    logger.info("prompt template: %s", template_source)
    settings = LoopSettings(
        max_rounds=args.max_rounds,
        max_round_tokens=args.max_round_tokens,
        max_answer_tokens=args.max_answer_tokens,
        max_batch_tokens=args.max_batch_tokens,
        show_progress=not args.no_progress,
        routed_ids_only=args.routed_ids_only,
        memory_on_model_device=args.memory_on_gpu,
    )
    model = EvalModel.load(
        args.checkpoint, args.device, getattr(torch, args.dtype), template, settings, args.index_devices
    )
    results: dict = {
        "checkpoint": str(args.checkpoint),
        "template": {"source": template_source, "fields": asdict(model.template)},
    }
    if not args.skip_niah:
        report = run_niah(model, args.niah_sizes, args.niah_samples, args.niah_subtasks, args.seed)
        accuracy = report.accuracy()
        results["niah"] = {
            "accuracy": {str(k): v for k, v in accuracy.items()},
            "misses": {str(k): v for k, v in report.miss_kinds().items()},
            "samples": [asdict(s) for s in report.samples],
        }
        points = {size: row["average"] for size, row in accuracy.items()}
        results["niah"]["files"] = write_scaling_curve(
            points, "NIAH accuracy", args.out, "niah_scaling", PAPER_NIAH_AVERAGE
        )
    dataset = load_qa_dataset(args)
    if dataset is not None:
        judge = JudgeClient(args.judge_url, args.judge_model, args.judge_key_env) if args.judge_url else None
        results["qa"] = run_qa(model, dataset, args.qa_limit, judge).to_dict()
        if args.qa_sizes:
            scaling = run_qa_scaling(model, dataset, args.qa_sizes, args.qa_limit, judge, args.seed)
            encoded = {size: report.memory_tokens for size, report in scaling.reports.items()}
            curves = scaling.curves()
            results["qa_scaling"] = {
                "sizes": scaling.to_dict(),
                "curves": {m: {str(k): v for k, v in c.items()} for m, c in curves.items()},
            }
            quality = {m: c for m, c in curves.items() if m != "judge_score"}
            results["qa_scaling"]["files"] = write_scaling_curves(quality, args.out, "qa_scaling", encoded)
            if "judge_score" in curves:
                results["qa_scaling"]["judge_files"] = write_scaling_curve(
                    curves["judge_score"], "LLM judge (0-5)", args.out, "qa_judge_scaling", PAPER_MSMARCO_JUDGE
                )
    write_json(args.out / "results.json", results)
    return results


def print_summary(results: dict) -> None:
    if "niah" in results:
        accuracy = results["niah"]["accuracy"]
        tasks = list(next(iter(accuracy.values())))
        print("NIAH accuracy")
        print("memory   " + " ".join(f"{t.removeprefix('niah_'):>11}" for t in tasks))
        for size, row in accuracy.items():
            print(f"{size_label(int(size)):<8} " + " ".join(f"{row[t]:>11.3f}" for t in tasks))
        for size, misses in results["niah"].get("misses", {}).items():
            print(
                f"misses at {size_label(int(size))}: "
                + ", ".join(f"{kind} {count}" for kind, count in sorted(misses.items()))
            )
    if "qa" in results:
        print("QA")
        for key, value in results["qa"]["summary"].items():
            print(f"  {key}: {value}")
    if "qa_scaling" in results:
        curves = results["qa_scaling"]["curves"]
        print("QA against memory size")
        print("memory   " + " ".join(f"{m:>18}" for m in curves))
        for size in next(iter(curves.values()), {}):
            print(f"{size_label(int(size)):<8} " + " ".join(f"{curves[m][size]:>18.3f}" for m in curves))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    print_summary(results)
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
