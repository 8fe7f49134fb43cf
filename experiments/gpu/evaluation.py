"""Evaluation jobs of a trained variant, in order of importance, until its deadline: NIAH at L
and 64L in rounds, held-out router recall, multi-hop and key-value QA, then the other sizes."""

from __future__ import annotations

import logging
import random
import statistics
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plan import HELDOUT_SEED, size_label

logger = logging.getLogger(__name__)


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
    return EvalModel.load(
        export,
        device=device,
        dtype=dtype,
        settings=settings,
        template=TemplateConfig.from_dict(template) if template else None,
    )


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
    summary["id_correct"] = sum(bool(set(i.retrieved_ids) & set(i.positive_ids)) for i in report.items) / max(
        len(report.items), 1
    )
    summary["examples"] = [
        {
            "query": i.query,
            "reference": i.reference,
            "answer": i.answer,
            "positive_ids": i.positive_ids,
            "retrieved_ids": i.retrieved_ids,
            "routed_ids": i.routed_ids,
        }
        for i in report.items[:4]
    ]
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
        "samples": [
            {
                "subtask": s.subtask,
                "score": s.score,
                "answer": s.answer[:120],
                "expected": s.expected,
                "needle_ids": s.needle_ids,
                "retrieved_ids": s.retrieved_ids,
                "routed_ids_score": s.routed_ids_score,
                "routed_ids_answer": (s.routed_ids_answer or "")[:120],
                "routed_ids_retrieved": s.routed_ids_retrieved,
                "routed_by_layer": s.routed_by_layer,
            }
            for s in samples
        ],
    }


def eval_jobs(row: int, settings: dict) -> list[dict]:
    """Evaluation jobs in order of importance. NIAH at L and 64L (the acceptance check) comes
    first, in rounds (`run_niah_rounds`), then router recall at L, multi-hop and key-value QA at
    L, and router recall at 64L (rounds after the first leave time for these). The three jobs at
    L take seconds each and the one at 64L tens of seconds, so a deadline that is short of it
    skips that one job, not all three. The other sizes run one NIAH subtask per job, so that a
    deadline leaves whole subtasks."""
    sizes = [row * m for m in settings["size_multiples"]]
    jobs = [
        {"kind": "niah_rounds", "sizes": sizes[:2]},
        {"kind": "qa_recall", "size": sizes[0]},
        {"kind": "multihop", "size": row},
        {"kind": "kv", "size": row},
        {"kind": "qa_recall", "size": sizes[1]},
    ]
    for size in sizes[2:]:
        jobs += [{"kind": "niah", "size": size, "subtask": task} for task in settings["niah_subtasks"]]
        jobs.append({"kind": "qa_recall", "size": size})
    return jobs


def jobs_kept_time_for(jobs: list[dict], niah_rounds: dict) -> list[dict]:
    """The jobs that NIAH rounds after the first leave time for: router recall at the rounds'
    sizes, and multi-hop and key-value QA (each measured once before NIAH asks again)."""
    return [
        job for job in jobs if job["kind"] in ("qa_recall", "multihop", "kv") and job["size"] in niah_rounds["sizes"]
    ]


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


def run_niah_rounds(
    model: Any,
    sizes: Sequence[int],
    settings: dict,
    costs: CostModel,
    soft_deadline: float,
    hard_deadline: float,
    reports: dict[int, Any],
    evaluation: dict,
    save: Any,
) -> None:
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
                evaluation["skipped"].append(
                    {"job": f"niah rounds {round_index + 1}.. from {task}", "predicted_s": round(predicted, 1)}
                )
                return
            for size in sizes:
                label = f"niah@{size_label(size)}/{task}, round {round_index + 1}"
                started = time.time()
                try:
                    report = run_niah(
                        model,
                        sizes=[size],
                        samples_per_task=1,
                        subtasks=[task],
                        seed=round_index,
                        routed_ids_too=True,
                    )
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
    loop = LoopSettings(
        max_rounds=2,
        max_round_tokens=24,
        max_answer_tokens=40,
        max_batch_tokens=settings["max_batch_tokens"],
        show_progress=False,
        memory_on_model_device=settings.get("memory_on_gpu", False),
    )
    started = time.time()
    model = load_eval_model(export, device, loop, settings.get("template"))
    evaluation = result["eval"]
    evaluation.update(
        export=str(export), niah={}, qa_recall={}, skipped=[], settings=settings, load_s=time.time() - started
    )
    costs = CostModel(
        settings["assumed_encode_tokens_per_s"], settings["assumed_question_s"], min_tokens=4 * spec["longest_row"]
    )
    niah_reports: dict[int, Any] = {}
    jobs = eval_jobs(spec["longest_row"], settings)
    for job in jobs:
        if job["kind"] == "niah_rounds":
            reserve = sum(costs.predict(*job_size(j, settings)) for j in jobs_kept_time_for(jobs, job))
            run_niah_rounds(
                model,
                job["sizes"],
                settings,
                costs,
                deadline - reserve,
                deadline + settings["margin_s"],
                niah_reports,
                evaluation,
                save,
            )
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
                report = run_niah(
                    model,
                    sizes=[job["size"]],
                    samples_per_task=settings["niah_samples"],
                    subtasks=[job["subtask"]],
                    seed=0,
                    routed_ids_too=True,
                )
                summary = add_niah_samples(niah_reports, evaluation, job["size"], report)
                encoded, asked = sum(s.encoded_tokens for s in report.samples), 2 * len(report.samples)
            else:
                if job["kind"] == "qa_recall":
                    dataset = needle_memory(
                        model, job["size"], settings["qa_questions"], HELDOUT_SEED + job["size"] % 997
                    )
                elif job["kind"] == "multihop":
                    dataset = chains_memory(model, job["size"], HELDOUT_SEED + 1, settings["qa_questions"])
                else:
                    dataset = generate_kv_facts(
                        **{
                            **settings["kv_generator"],
                            "num_queries": settings["qa_questions"],
                            "seed": HELDOUT_SEED + 2,
                        }
                    )
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
