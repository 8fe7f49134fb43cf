"""RULER-style needle-in-a-haystack suite over MSA memories of growing size.

Eight subtasks in the spirit of RULER's NIAH family, built from the data package's needle
generator (synthetic filler haystacks; RULER's essay haystacks and UUID values are not
reproduced): three single-needle tasks over short, medium and long haystack documents,
three multi-key tasks with 4, 16 and 64 distractor needles, multi-value and multi-query.
Every sample is its own memory, filled with haystack documents up to the memory size; the
score is RULER's string match (the share of expected values in the answer).

Every size asks the same questions: a sample's needles, their texts and its question depend on
the seed and the subtask alone (two subtasks of one kind get their own), its haystack on the
seed and the size, and each needle sits at the same relative depth of the memory at every size.
The samples of two sizes differ only in the haystack around the needles, so their difference
measures the memory size alone.

With `routed_ids_too`, each question is also answered with the round's IDs decoded among the
routed documents only (`RoutedIdGrammar`), on the same encoded memory, and scored apart.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from data.records import RetrievalDataset, RetrievalRecord
from data.synthetic import generate_needles, is_haystack_doc
from msa_modeling.inference import MemoryInterleave, selected_memory_ids

from .harness import EvalModel
from .metrics import string_match_fraction

logger = logging.getLogger(__name__)

SUBTASKS: dict[str, dict] = {
    "niah_single_1": {"kind": "single", "words_per_doc": 40},
    "niah_single_2": {"kind": "single", "words_per_doc": 120},
    "niah_single_3": {"kind": "single", "words_per_doc": 360},
    "niah_multikey_1": {"kind": "multi_key", "num_keys": 4},
    "niah_multikey_2": {"kind": "multi_key", "num_keys": 16},
    "niah_multikey_3": {"kind": "multi_key", "num_keys": 64},
    "niah_multivalue": {"kind": "multi_value", "num_values": 4},
    "niah_multiquery": {"kind": "multi_query", "num_keys": 4, "num_queries": 4},
}
DEFAULT_SIZES = (32768, 65536, 131072, 262144, 524288, 1048576)


@dataclass
class NIAHSample:
    subtask: str
    memory_tokens: int  # the size asked for
    encoded_tokens: int  # the size of the sample's rendered memory
    score: float
    answer: str
    expected: list[str]
    retrieved_ids: list[int]
    needle_ids: list[int]
    # The same question with IDs decoded among the routed documents (None when not asked).
    routed_ids_score: float | None = None
    routed_ids_answer: str | None = None
    routed_ids_retrieved: list[int] | None = None
    # Per router layer, the IDs it attended to for the question (free decoding, `first_routing`):
    # whether the layers agree on the needle, and where a misread ID's digits could come from.
    routed_by_layer: list[list[int]] | None = None

    def miss_kind(self) -> str | None:
        """Where a miss went wrong (None for a right answer): `routing` (no router layer selected a
        needle), `id` (a layer selected one, but the written IDs name no needle), `value` (a
        needle's ID was written, the answer is still wrong), or `id_or_routing` (no needle
        written, and the layers' selections were not recorded)."""
        if self.score >= 1.0:
            return None
        needles = set(self.needle_ids)
        if needles & set(self.retrieved_ids):
            return "value"
        if self.routed_by_layer is None:
            return "id_or_routing"
        return "id" if any(needles & set(layer) for layer in self.routed_by_layer) else "routing"


@dataclass
class NIAHReport:
    samples: list[NIAHSample] = field(default_factory=list)

    def miss_kinds(self) -> dict[int, dict[str, int]]:
        """{memory size: {miss kind: count}} over the samples not answered right (`NIAHSample.miss_kind`)."""
        table: dict[int, dict[str, int]] = {}
        for sample in self.samples:
            kind = sample.miss_kind()
            if kind is not None:
                counts = table.setdefault(sample.memory_tokens, {})
                counts[kind] = counts.get(kind, 0) + 1
        return table

    def accuracy(self, score: str = "score") -> dict[int, dict[str, float]]:
        """{memory size: {subtask: mean score, ..., "average": mean over subtasks}}; `score`:
        "score" (free decoding) or "routed_ids_score" (samples without one are left out)."""
        table: dict[int, dict[str, list[float]]] = {}
        for s in self.samples:
            if getattr(s, score) is not None:
                table.setdefault(s.memory_tokens, {}).setdefault(s.subtask, []).append(getattr(s, score))
        result = {}
        for size, by_task in sorted(table.items()):
            means = {task: sum(v) / len(v) for task, v in by_task.items()}
            result[size] = {**means, "average": sum(means.values()) / len(means)}
        return result


def haystack_docs_for(model: EvalModel, config: dict, memory_tokens: int, seed: int) -> int:
    """Haystack documents that bring one sample's rendered memory to about `memory_tokens`."""
    probe = generate_needles(config["kind"], 1, seed, haystack_docs=4, **_generator_options(config))
    lengths = [len(t) for t in model.render_documents(probe.corpus)]
    needles = len(probe.records[0].positives) + len(probe.records[0].negatives) - 4
    per_doc = sum(lengths) / len(lengths)
    return max(1, round(memory_tokens / per_doc) - needles)


def _generator_options(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "kind"}


def sample_memory(dataset: RetrievalDataset, record: RetrievalRecord, seed: int) -> tuple[list, list[int]]:
    """The record's memory (its positives and negatives) and the needles' memory IDs: the haystack
    shuffled and each needle (asked or distractor) put at a relative depth drawn from `seed` alone,
    so a needle sits at the same fraction of the memory whatever the haystack's size."""
    by_id = {doc.doc_id: doc for doc in dataset.corpus}
    doc_ids = list(dict.fromkeys(record.positives + record.negatives))
    haystack = [doc_id for doc_id in doc_ids if is_haystack_doc(doc_id)]
    needles = sorted(doc_id for doc_id in doc_ids if not is_haystack_doc(doc_id))
    random.Random(f"haystack/{seed}").shuffle(haystack)
    depth = random.Random(f"depth/{seed}")
    placed = [((index + 0.5) / len(haystack), doc_id) for index, doc_id in enumerate(haystack)]
    placed += [(depth.random(), doc_id) for doc_id in needles]
    doc_ids = [doc_id for _, doc_id in sorted(placed)]
    needle_ids = [position + 1 for position, doc_id in enumerate(doc_ids) if doc_id in set(record.positives)]
    return [by_id[doc_id] for doc_id in doc_ids], needle_ids


def run_niah(
    model: EvalModel,
    sizes: Sequence[int] = DEFAULT_SIZES,
    samples_per_task: int = 4,
    subtasks: Sequence[str] | None = None,
    seed: int = 0,
    routed_ids_too: bool = False,
) -> NIAHReport:
    """Score every subtask at every memory size (tokens of rendered memory), every size asking the
    same questions of the same needles at the same depths (see the module's docstring); with
    `routed_ids_too` also with IDs decoded among the routed documents."""
    unknown = set(subtasks or ()) - set(SUBTASKS)
    if unknown:
        raise ValueError(f"unknown NIAH subtasks {sorted(unknown)}; choose from {list(SUBTASKS)}")
    report = NIAHReport()
    jobs = [(size, task) for size in sizes for task in (subtasks or SUBTASKS)]
    for size, task in tqdm(jobs, desc="NIAH", disable=not model.settings.show_progress):
        config = SUBTASKS[task]
        haystack = haystack_docs_for(model, config, size, seed)
        dataset = generate_needles(
            config["kind"],
            samples_per_task,
            seed,
            haystack_docs=haystack,
            haystack_seed=seed + size,
            stream=task,
            **_generator_options(config),
        )
        for number, record in enumerate(dataset.records):
            documents, needle_ids = sample_memory(dataset, record, seed + number)
            store = model.encode_memory(documents, pin=False)  # one or two questions: pinning costs more than it saves
            loop = model.interleave(store)
            result = model.ask(loop, record.query)
            constrained = None
            if routed_ids_too:
                protocol = dataclasses.replace(loop.protocol, routed_ids_only=True)
                constrained = model.ask(MemoryInterleave(loop.generator, loop.decode, protocol), record.query)
            encoded_tokens = store.num_tokens
            routed_by_layer = selected_memory_ids(result.first_routing, loop.generator.config.top_k_docs) or None
            # A 1M-token store is ~23 GB of host memory (15 GiB of K̄/V̄, 7.6 GiB of routing keys):
            # holding the last one while the next is encoded got the 320M model's evaluation
            # killed on a 128 GB host (EXPERIMENTS.md).
            del store, loop
            expected = (record.answer or "").split(", ")
            report.samples.append(
                NIAHSample(
                    subtask=task,
                    memory_tokens=size,
                    encoded_tokens=encoded_tokens,
                    score=string_match_fraction(result.answer, expected),
                    answer=result.answer,
                    expected=expected,
                    retrieved_ids=result.retrieved_ids,
                    needle_ids=needle_ids,
                    routed_ids_score=string_match_fraction(constrained.answer, expected) if constrained else None,
                    routed_ids_answer=constrained.answer if constrained else None,
                    routed_ids_retrieved=constrained.retrieved_ids if constrained else None,
                    routed_by_layer=routed_by_layer,
                )
            )
        logger.info("NIAH %s at %d tokens: %d samples", task, size, samples_per_task)
    return report
