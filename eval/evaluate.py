"""Evaluate a checkpoint directory (a trainer stage export, or any MSA checkpoint with its
tokenizer files): NIAH accuracy per memory size with its scaling curve, and QA on local data.

    python -m msa_train.eval.evaluate runs/tiny/stages/sft_long/export --out eval_out \
        --niah-sizes 32768 65536 --qa-beir path/to/beir_folder --qa-limit 200
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.readers import read_beir, read_retrieval_jsonl
from ..data.templates import TemplateConfig
from .harness import EvalModel, LoopSettings, write_json
from .judge import JudgeClient
from .niah import DEFAULT_SIZES, SUBTASKS, run_niah
from .qa import run_qa
from .scaling import PAPER_NIAH_AVERAGE, size_label, write_scaling_curve

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, curves and tables")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--index-devices", nargs="*", help="devices for routing keys (default: --device)")
    parser.add_argument("--template", type=Path, help="JSON file of TemplateConfig fields (default: reference format)")
    parser.add_argument("--skip-niah", action="store_true")
    parser.add_argument("--niah-sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--niah-samples", type=int, default=4, help="samples per subtask and size")
    parser.add_argument("--niah-subtasks", nargs="+", choices=list(SUBTASKS))
    parser.add_argument("--qa-beir", type=Path, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--qa-split", default="test")
    parser.add_argument("--qa-records", type=Path, help="JSONL records {query, positives, answer?}")
    parser.add_argument("--qa-corpus", type=Path, help="corpus JSONL for --qa-records")
    parser.add_argument("--qa-limit", type=int)
    parser.add_argument("--judge-url", help="OpenAI-compatible base URL; the LLM judge is off without it")
    parser.add_argument("--judge-model", default="gpt-4o-mini")
    parser.add_argument("--judge-key-env", default="OPENAI_API_KEY")
    parser.add_argument("--max-rounds", type=int, default=3)
    parser.add_argument("--max-round-tokens", type=int, default=64)
    parser.add_argument("--max-answer-tokens", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


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
    template = TemplateConfig.from_dict(json.loads(args.template.read_text())) if args.template else None
    settings = LoopSettings(
        max_rounds=args.max_rounds, max_round_tokens=args.max_round_tokens, max_answer_tokens=args.max_answer_tokens,
        max_batch_tokens=args.max_batch_tokens, show_progress=not args.no_progress,
    )
    model = EvalModel.load(args.checkpoint, args.device, getattr(torch, args.dtype), template, settings, args.index_devices)
    results: dict = {"checkpoint": str(args.checkpoint)}
    if not args.skip_niah:
        report = run_niah(model, args.niah_sizes, args.niah_samples, args.niah_subtasks, args.seed)
        accuracy = report.accuracy()
        results["niah"] = {"accuracy": {str(k): v for k, v in accuracy.items()}, "samples": [asdict(s) for s in report.samples]}
        points = {size: row["average"] for size, row in accuracy.items()}
        results["niah"]["files"] = write_scaling_curve(points, "NIAH accuracy", args.out, "niah_scaling", PAPER_NIAH_AVERAGE)
    dataset = load_qa_dataset(args)
    if dataset is not None:
        judge = JudgeClient(args.judge_url, args.judge_model, args.judge_key_env) if args.judge_url else None
        results["qa"] = run_qa(model, dataset, args.qa_limit, judge).to_dict()
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
    if "qa" in results:
        print("QA")
        for key, value in results["qa"]["summary"].items():
            print(f"  {key}: {value}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    print_summary(results)
    print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
