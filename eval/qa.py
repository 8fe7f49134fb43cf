"""QA over local data: one memory holds the whole corpus, every question is asked over it.

Reports exact match and F1 against the records' answers, router recall@k (ranking of the
first round's routing, per router layer, averaged), recall of the IDs the model chose, the
statistics of how many documents it chose (the adaptive retrieval count), and, optionally,
the LLM judge's 0-5 score.

`run_qa_scaling` asks the same questions over memories of growing size: each memory holds
the questions' positive documents plus other corpus documents (distractors, in a seeded
order) up to the size, shuffled; the scores per size give the curve against memory tokens.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from data.records import Document, RetrievalDataset, RetrievalRecord
from msa_modeling.inference import selected_memory_ids

from .harness import EvalModel
from .judge import JudgeClient
from .metrics import exact_match, recall_at_k, summarize, token_f1

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)


@dataclass
class QAItem:
    query: str
    reference: str | None
    answer: str
    positive_ids: list[int]
    retrieved_ids: list[int]
    rounds: int
    router_recall: dict[str, float | None]
    routed_ids: list[int] = field(default_factory=list)  # the first round's selection (every router layer)
    exact_match: float | None = None
    f1: float | None = None
    judge_score: int | None = None


@dataclass
class QAReport:
    items: list[QAItem] = field(default_factory=list)
    memory_docs: int = 0
    memory_tokens: int = 0

    def summary(self) -> dict:
        def mean_of(values: Sequence[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return sum(present) / len(present) if present else None

        return {
            "questions": len(self.items),
            "memory_docs": self.memory_docs,
            "memory_tokens": self.memory_tokens,
            "exact_match": mean_of([i.exact_match for i in self.items]),
            "f1": mean_of([i.f1 for i in self.items]),
            "judge_score": mean_of([i.judge_score for i in self.items]),
            "router_recall": {
                key: mean_of([i.router_recall.get(key) for i in self.items]) for key in self._recall_keys()
            },
            "retrieved_recall": mean_of(
                [recall_at_k(i.retrieved_ids, i.positive_ids, len(i.retrieved_ids)) for i in self.items]
            ),
            # Whether the model writes the IDs of the documents it was shown, right or wrong: reading
            # the ID out of memory, apart from routing.
            "ids_from_routed": mean_of(
                [
                    recall_at_k(i.routed_ids, i.retrieved_ids[:1], len(i.routed_ids))
                    for i in self.items
                    if i.retrieved_ids
                ]
            ),
            "docs_chosen": summarize([len(i.retrieved_ids) for i in self.items]),
            "rounds": summarize([i.rounds for i in self.items]),
        }

    def _recall_keys(self) -> list[str]:
        """recall@k, then the per-layer recall@1 keys in layer order."""
        per_layer = {key for item in self.items for key in item.router_recall if "/layer_" in key}
        return [f"recall@{k}" for k in RECALL_KS] + sorted(per_layer, key=lambda key: int(key.rsplit("_", 1)[1]))

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "items": [asdict(i) for i in self.items]}


def router_recall(routing, positive_ids: list[int]) -> dict[str, float | None]:
    """recall@k of the positives (memory IDs) per router layer's ranking, averaged over layers;
    with several router layers also each layer's recall@1 (`recall@1/layer_N`), which the
    average can hide (one layer at 1.0 and three at chance read as 0.3)."""
    ranked_ids = [[d + 1 for d in layer.docs.tolist()] for layer in routing]
    result = {}
    for k in RECALL_KS:
        per_layer = [recall_at_k(ids, positive_ids, k) for ids in ranked_ids]
        present = [r for r in per_layer if r is not None]
        result[f"recall@{k}"] = sum(present) / len(present) if present else None
    if len(routing) > 1:
        for layer, ids in zip(routing, ranked_ids):
            result[f"recall@1/layer_{layer.layer}"] = recall_at_k(ids, positive_ids, 1)
    return result


def run_qa(
    model: EvalModel,
    dataset: RetrievalDataset,
    limit: int | None = None,
    judge: JudgeClient | None = None,
    pin: bool = True,
) -> QAReport:
    """Encode the corpus once as memory IDs 1..n and answer the first `limit` records (`pin`: see
    `EvalModel.encode_memory`)."""
    records = dataset.records[:limit] if limit else dataset.records
    return answer_over_memory(model, dataset.corpus, records, judge, pin=pin)


def answer_over_memory(
    model: EvalModel,
    memory: Sequence[Document],
    records: Sequence[RetrievalRecord],
    judge: JudgeClient | None = None,
    desc: str = "QA",
    pin: bool = True,
) -> QAReport:
    """Encode `memory` as memory IDs 1..n and answer `records` over it."""
    store = model.encode_memory(memory, pin=pin)
    loop = model.interleave(store, trace_k=max(RECALL_KS))
    memory_id = {doc.doc_id: number for number, doc in enumerate(memory, start=1)}
    report = QAReport(memory_docs=store.num_docs, memory_tokens=store.num_tokens)
    top_k = model.model.config.top_k_docs
    for record in tqdm(records, desc=desc, disable=not model.settings.show_progress):
        result = model.ask(loop, record.query)
        first_routing = result.first_routing
        positives = [memory_id[d] for d in record.positives if d in memory_id]
        item = QAItem(
            query=record.query,
            reference=record.answer,
            answer=result.answer,
            positive_ids=positives,
            retrieved_ids=result.retrieved_ids,
            rounds=len(result.rounds),
            router_recall=router_recall(first_routing, positives),
            routed_ids=sorted({i for layer_ids in selected_memory_ids(first_routing, top_k) for i in layer_ids}),
        )
        if record.answer is not None:
            item.exact_match = exact_match(result.answer, record.answer)
            item.f1 = token_f1(result.answer, record.answer)
            if judge is not None:
                item.judge_score = judge.score(record.query, record.answer, result.answer)
        report.items.append(item)
    return report


@dataclass
class QAScalingReport:
    """One `QAReport` per memory size asked for (tokens of rendered memory)."""

    reports: dict[int, QAReport] = field(default_factory=dict)

    def curves(self) -> dict[str, dict[int, float]]:
        """{metric: {memory size: value}} for the metrics every size has (EM, F1, recall, judge)."""
        summaries = {size: report.summary() for size, report in self.reports.items()}
        picks = {
            "exact_match": lambda s: s["exact_match"],
            "f1": lambda s: s["f1"],
            **{f"router_recall@{k}": (lambda s, k=k: s["router_recall"][f"recall@{k}"]) for k in RECALL_KS},
            "retrieved_recall": lambda s: s["retrieved_recall"],
            "judge_score": lambda s: s["judge_score"],
        }
        curves = {}
        for metric, pick in picks.items():
            points = {size: pick(summary) for size, summary in summaries.items()}
            if points and all(v is not None for v in points.values()):
                curves[metric] = points
        return curves

    def to_dict(self) -> dict:
        return {str(size): report.to_dict() for size, report in self.reports.items()}


def scaling_memory(
    model: EvalModel,
    dataset: RetrievalDataset,
    records: Sequence[RetrievalRecord],
    memory_tokens: int,
    seed: int,
    lengths: dict[str, int] | None = None,
) -> list[Document]:
    """The records' positives plus distractors (seeded order) up to about `memory_tokens`
    rendered tokens, shuffled. Never smaller than the positives; capped by the corpus."""
    by_id = dataset.corpus_by_id()
    needed = list(dict.fromkeys(d for r in records for d in r.positives if d in by_id))
    others = [doc.doc_id for doc in dataset.corpus if doc.doc_id not in set(needed)]
    random.Random(seed).shuffle(others)
    if lengths is None:
        lengths = {doc.doc_id: len(t) for doc, t in zip(dataset.corpus, model.render_documents(dataset.corpus))}
    chosen, total = list(needed), sum(lengths[d] for d in needed)
    for doc_id in others:
        if total + lengths[doc_id] > memory_tokens:
            break
        chosen.append(doc_id)
        total += lengths[doc_id]
    random.Random(seed + 1).shuffle(chosen)
    return [by_id[d] for d in chosen]


def run_qa_scaling(
    model: EvalModel,
    dataset: RetrievalDataset,
    sizes: Sequence[int],
    limit: int | None = None,
    judge: JudgeClient | None = None,
    seed: int = 0,
) -> QAScalingReport:
    """Ask the first `limit` records over a memory of each size (see `scaling_memory`)."""
    records = dataset.records[:limit] if limit else dataset.records
    lengths = {doc.doc_id: len(t) for doc, t in zip(dataset.corpus, model.render_documents(dataset.corpus))}
    corpus_tokens = sum(lengths.values())
    result = QAScalingReport()
    for size in sorted(sizes):
        if size > corpus_tokens:
            logger.warning(
                "QA memory of %d tokens asked for, the corpus renders to %d: using all of it", size, corpus_tokens
            )
        memory = scaling_memory(model, dataset, records, size, seed, lengths)
        result.reports[size] = answer_over_memory(model, memory, records, judge, desc=f"QA at {size} tokens")
        logger.info(
            "QA at %d tokens (%d encoded, %d docs): %s",
            size,
            result.reports[size].memory_tokens,
            len(memory),
            {k: v for k, v in result.reports[size].summary().items() if k in ("exact_match", "f1")},
        )
    return result
