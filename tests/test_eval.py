"""Eval commands on a tiny random checkpoint with a locally trained tokenizer (no network)."""

from __future__ import annotations

import gc
import hashlib
import json
import re
import threading
import weakref
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest
import torch
from data_fixtures import write_tiny_export

from data.records import Document, RetrievalDataset, RetrievalRecord
from data.synthetic import generate_kv_facts, generate_needles, is_haystack_doc
from data.templates import TemplateConfig, reference_template
from eval import evaluate
from eval.harness import EvalModel, LoopSettings
from eval.judge import RUBRIC, JudgeClient, parse_score
from eval.metrics import exact_match, recall_at_k, string_match_fraction, token_f1
from eval.niah import SUBTASKS, NIAHReport, NIAHSample, run_niah
from eval.qa import run_qa
from eval.scaling import PAPER_NIAH_AVERAGE, comparison_table, matplotlib_available, write_scaling_curve

FAST_LOOP = ["--max-rounds", "1", "--max-round-tokens", "3", "--max-answer-tokens", "3", "--no-progress"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trainer-export-shaped folder: tiny MSA model + sentencepiece tokenizer with the template tokens."""
    return write_tiny_export(tmp_path_factory.mktemp("export"), top_k_docs=2, chunk_size=8)


def test_evaluate_command_writes_niah_and_qa_results(checkpoint, tmp_path):
    facts = generate_kv_facts(num_facts=6, num_queries=3, seed=0, filler_words=4)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": d.doc_id, "text": d.text}) + "\n" for d in facts.corpus))
    records = tmp_path / "records.jsonl"
    records.write_text(
        "".join(
            json.dumps({"query": r.query, "positives": r.positives, "answer": r.answer}) + "\n" for r in facts.records
        )
    )
    out = tmp_path / "out"
    evaluate.main(
        [
            str(checkpoint),
            "--out",
            str(out),
            "--niah-sizes",
            "96",
            "192",
            "--niah-samples",
            "1",
            "--qa-records",
            str(records),
            "--qa-corpus",
            str(corpus),
            "--qa-sizes",
            "40",
            "100000",
            *FAST_LOOP,
        ]
    )
    results = json.loads((out / "results.json").read_text())
    accuracy = results["niah"]["accuracy"]
    questions = {
        size: [s["expected"] for s in results["niah"]["samples"] if s["memory_tokens"] == size] for size in (96, 192)
    }
    assert questions[96] == questions[192]  # the same needles asked at both sizes
    assert list(accuracy) == ["96", "192"]
    assert set(accuracy["96"]) == {*SUBTASKS, "average"}
    assert all(0.0 <= v <= 1.0 for row in accuracy.values() for v in row.values())
    assert len(results["niah"]["samples"]) == 2 * len(SUBTASKS)
    # Every sample scored below 1 is counted once among its size's misses.
    for size in ("96", "192"):
        wrong = sum(s["score"] < 1 for s in results["niah"]["samples"] if str(s["memory_tokens"]) == size)
        assert sum(results["niah"]["misses"].get(size, {}).values()) == wrong
    sizes = [(s["memory_tokens"], s["encoded_tokens"]) for s in results["niah"]["samples"]]
    # Long-document and needle-heavy subtasks overshoot tiny memories; 40-word documents land within one document.
    assert all(0.5 * asked <= got for asked, got in sizes)
    assert all(
        abs(got - asked) <= 80
        for (asked, got), s in zip(sizes, results["niah"]["samples"])
        if s["subtask"] == "niah_single_1"
    )
    assert (out / "niah_scaling.json").exists() and (out / "niah_scaling.md").exists()
    assert (out / "niah_scaling.png").exists() == matplotlib_available()
    summary = results["qa"]["summary"]
    assert summary["questions"] == 3 and summary["memory_docs"] == len(facts.corpus)
    router_layers = json.loads((checkpoint / "config.json").read_text())["router_layers"]
    assert len(router_layers) > 1  # so the per-layer recall is reported too
    assert set(summary["router_recall"]) == {
        "recall@1",
        "recall@5",
        "recall@10",
        *(f"recall@1/layer_{n}" for n in router_layers),
    }
    assert summary["router_recall"]["recall@10"] == 1.0  # 6 documents: top-10 holds them all
    assert summary["docs_chosen"]["count"] == 3 and summary["exact_match"] is not None
    assert results["template"]["source"].startswith("reference format")  # the fixture has no recipe copy
    # QA against memory size: the small memory holds the positives only, the large one the whole corpus.
    scaling = results["qa_scaling"]
    positives = {d for r in facts.records for d in r.positives}
    assert [scaling["sizes"][s]["summary"]["memory_docs"] for s in ("40", "100000")] == [
        len(positives),
        len(facts.corpus),
    ]
    assert {"exact_match", "f1", "router_recall@1", "router_recall@5", "router_recall@10"} <= set(scaling["curves"])
    curve = json.loads((out / "qa_scaling.json").read_text())
    assert [p["memory_tokens"] for p in curve["points"]] == [40, 100000] and "f1" in curve["metrics"]
    assert (out / "qa_scaling.md").exists() and (out / "qa_scaling.png").exists() == matplotlib_available()


def test_evaluate_reads_the_template_from_the_exports_recipe_copy(tmp_path):
    import yaml

    export = tmp_path / "run" / "stages" / "sft_short" / "export"
    export.mkdir(parents=True)
    chat_free = {"query_format": "Q: {query}\n", "doc_suffix": " "}
    recipe = {
        "data": {
            "sources": {
                "qa": {"sample_kind": "qa", "template": chat_free},
                "retrieval": {"sample_kind": "retrieval"},
            }
        },
        "stages": [{"name": "cpt", "sources": {"retrieval": 1.0}}, {"name": "sft_short", "sources": {"qa": 1.0}}],
    }
    (export / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    template, source = evaluate.resolve_template(export, None)
    assert template == TemplateConfig(**chat_free) and "sft_short" in source
    (tmp_path / "cpt_export").mkdir()
    (tmp_path / "cpt_export" / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "stages": recipe["stages"][:1]}))
    assert evaluate.resolve_template(tmp_path / "cpt_export", None)[0] == TemplateConfig()  # the last stage's source
    assert evaluate.resolve_template(export, "reference")[0] == reference_template()
    override = tmp_path / "template.json"
    override.write_text(json.dumps({"query_format": "Question? {query}\n"}))
    assert evaluate.resolve_template(export, str(override))[0].query_format == "Question? {query}\n"


class FakeJudge(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        reply = json.dumps({"choices": [{"message": {"content": "Score: 4"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_scores_through_a_local_openai_compatible_server(judge_server, monkeypatch, checkpoint):
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret")
    judge = JudgeClient(judge_server, "judge-model", api_key_env="TEST_JUDGE_KEY")
    FakeJudge.seen.clear()
    model = EvalModel.load(
        checkpoint, settings=LoopSettings(max_rounds=1, max_round_tokens=2, max_answer_tokens=2, show_progress=False)
    )
    dataset = RetrievalDataset(
        [Document("a", "alpha text"), Document("b", "beta text")], [RetrievalRecord("What?", ["b"], answer="beta")]
    )
    report = run_qa(model, dataset, judge=judge)
    assert report.items[0].judge_score == 4 and report.summary()["judge_score"] == 4
    request = FakeJudge.seen[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
    assert request["body"]["messages"][0]["content"] == RUBRIC
    assert "Reference answer: beta" in request["body"]["messages"][1]["content"]


def test_judge_reply_parsing():
    assert parse_score("Score: 3") == 3
    assert parse_score("I'd say 5.") == 5
    assert parse_score("no idea") is None


def test_answer_metrics():
    assert exact_match("The Answer!", "answer") == 1.0
    assert token_f1("red big house", "big red barn") == pytest.approx(2 / 3)
    assert string_match_fraction("values 123 and 77", ["123", "456"]) == 0.5
    assert recall_at_k([3, 1, 2], [1, 5], 2) == 0.5 and recall_at_k([1], [], 1) is None


def test_scaling_table_compares_at_matching_sizes(tmp_path):
    table = comparison_table({32768: 0.9, 50000: 0.8}, PAPER_NIAH_AVERAGE, "NIAH accuracy")
    assert "| 32K | 0.900 | 0.990 | 0.950 |" in table and "| 50000 | 0.800 | n/a | n/a |" in table
    files = write_scaling_curve({32768: 0.9}, "NIAH accuracy", tmp_path, "curve", PAPER_NIAH_AVERAGE)
    assert json.loads((tmp_path / "curve.json").read_text())["points"] == [{"memory_tokens": 32768, "score": 0.9}]
    assert ("png" in files) == matplotlib_available()


def test_inference_benchmark_runs_at_tiny_sizes_on_cpu(tmp_path):
    from benchmarks import bench_inference

    out = tmp_path / "bench.json"
    bench_inference.main(
        [
            "--gpus",
            "1",
            "2",
            "--sizes",
            "4096",
            "8192",
            "--shape",
            "tiny",
            "--router-layers",
            "2",
            "--doc-length",
            "100",
            "--queries",
            "2",
            "--tile-size",
            "16",
            "--dtype",
            "float32",
            "--encode-tokens",
            "600",
            "--routing-tokens",
            "6",
            "--profile-decode",
            "2",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert not [r for section in ("routing", "content", "encoding") for r in results[section] if "error" in r]
    routing = results["routing"]
    assert [(r["memory_tokens"], r["gpus"], r["chunks"]) for r in routing] == [
        (4096, 1, 64),
        (8192, 1, 128),
        (4096, 2, 64),
        (8192, 2, 128),
    ]
    assert all(r["routing"]["median_ms"] > 0 and len(r["top_docs_sample"]) == 4 for r in routing)
    assert [len(r["routing_key_bytes_by_device"]) for r in routing] == [1, 1, 1, 1]  # two CPU "devices" are one
    assert [(c["memory_tokens"], c["allocated_layers"]) for c in results["content"]] == [(4096, 1), (8192, 1)]
    assert all(c["fetch_all_layers"]["median_ms"] > 0 and c["fetched_chunks_per_layer"] > 0 for c in results["content"])
    assert [r["replicas"] for r in results["encoding"]] == [1, 1]
    assert results["encoding"][0]["encoded_tokens"] == 600 and results["encoding"][0]["prefill"]["median_ms"] > 0
    assert results["encoding"][0]["decode_step"]["median_ms"] > 0
    assert "aten::mm" in results["encoding"][0]["decode_profile"]
    assert results["encoding"][0]["index_seconds"] > 0 and results["encoding"][0]["index_bytes"] > 0


def test_inference_benchmark_memory_estimates_at_100m_tokens():
    """The spec's sizing (section 8): 100M tokens, P=64, 8 KV heads, D=128, 18 router layers, bf16."""
    import torch

    from benchmarks import bench_inference

    args = bench_inference.build_parser().parse_args([])
    args.dtype = torch.bfloat16
    estimate = bench_inference.memory_estimates(args, bench_inference.MODEL_SHAPES["qwen3-4b"], 100_000_000)
    assert estimate["chunks"] == 1_562_500
    assert estimate["routing_key_bytes"] == 1_562_500 * (18 * 8 * 128 * 2 + 8)  # ~57.6 GB: K̄R plus the chunk map
    assert estimate["content_host_bytes"] == 1_562_500 * 18 * 2 * 8 * 128 * 2  # ~115 GB of K̄/V̄


def test_ids_from_routed_counts_generated_ids_among_the_documents_shown() -> None:
    from eval.qa import QAItem, QAReport

    def item(routed: list[int], retrieved: list[int]) -> QAItem:
        no_recall = {"recall@1": None, "recall@5": None, "recall@10": None}
        return QAItem(
            query="q",
            reference="a",
            answer="a",
            positive_ids=[1],
            retrieved_ids=retrieved,
            rounds=1,
            router_recall=no_recall,
            routed_ids=routed,
        )

    # Shown document 3 and wrote 3 (a wrong ID, but read); shown 3 and wrote 5; wrote no ID at all.
    report = QAReport(items=[item([3], [3]), item([3], [5]), item([2, 3], [3, 7]), item([3], [])])
    assert report.summary()["ids_from_routed"] == pytest.approx(2 / 3)


def test_router_recall_reports_each_router_layer_when_there_are_several() -> None:
    from eval.qa import QAItem, QAReport, router_recall
    from msa_modeling.inference.generation import LayerRouting

    def routing(layer: int, ranked: list[int]) -> LayerRouting:  # 0-based store indices, best first
        return LayerRouting(layer=layer, docs=torch.tensor(ranked), scores=torch.zeros(len(ranked)))

    # Layer 0 ranks memory ID 2 (index 1) first; layers 1 and 10 rank it second and third.
    layers = [routing(0, [1, 0, 2]), routing(1, [0, 1, 2]), routing(10, [0, 2, 1])]
    recall = router_recall(layers, positive_ids=[2])
    assert recall["recall@1"] == pytest.approx(1 / 3)
    assert [recall[f"recall@1/layer_{n}"] for n in (0, 1, 10)] == [1.0, 0.0, 0.0]
    assert "recall@1/layer_0" not in router_recall(layers[:1], positive_ids=[2])  # one layer: the mean is the layer
    item = QAItem(
        query="q", reference="a", answer="a", positive_ids=[2], retrieved_ids=[2], rounds=1, router_recall=recall
    )
    summary = QAReport(items=[item, item]).summary()["router_recall"]
    assert list(summary) == [
        "recall@1",
        "recall@5",
        "recall@10",
        "recall@1/layer_0",
        "recall@1/layer_1",
        "recall@1/layer_10",
    ]


def test_niah_releases_each_memory_before_encoding_the_next():
    """A 1M-token store is ~23 GB of host memory: two alive at once got a GPU evaluation killed."""

    class Store:  # also the fake's interleave loop
        num_tokens = 10
        generator = SimpleNamespace(config=SimpleNamespace(top_k_docs=1))

    class FakeModel:
        settings = SimpleNamespace(show_progress=False)

        def __init__(self):
            self.alive: list[weakref.ref] = []
            self.alive_at_encode: list[int] = []

        def render_documents(self, documents):
            return [[0] * 20 for _ in documents]

        def encode_memory(self, documents, pin=True):
            gc.collect()
            self.alive_at_encode.append(sum(ref() is not None for ref in self.alive))
            store = Store()
            self.alive.append(weakref.ref(store))
            return store

        def interleave(self, store):
            return store

        def ask(self, loop, question):
            return SimpleNamespace(answer="0", retrieved_ids=[1], first_routing=[])

    model = FakeModel()
    report = run_niah(model, sizes=[200], samples_per_task=3, subtasks=["niah_single_1"])
    assert len(report.samples) == 3 and all(s.encoded_tokens == 10 for s in report.samples)
    assert model.alive_at_encode == [0, 0, 0]


class _RecordingNIAHModel:
    """A stand-in EvalModel for `run_niah`: 20 tokens per document, the memories and questions
    it was given kept, every answer wrong."""

    settings = SimpleNamespace(show_progress=False)

    def __init__(self):
        self.memories: list[list] = []
        self.questions: list[str] = []

    def render_documents(self, documents):
        return [[0] * 20 for _ in documents]

    def encode_memory(self, documents, pin=True):
        self.memories.append(list(documents))
        return SimpleNamespace(
            num_tokens=20 * len(documents), generator=SimpleNamespace(config=SimpleNamespace(top_k_docs=1))
        )

    def interleave(self, store):
        return store

    def ask(self, loop, question):
        self.questions.append(question)
        return SimpleNamespace(answer="0", retrieved_ids=[1], first_routing=[])


def test_generate_needles_keeps_the_samples_of_earlier_versions():
    """The default (one random stream) must not change: gpu_rounds' NIAH questions are compared
    with later runs' answer for answer (docs/EXPERIMENTS.md)."""
    digest = hashlib.sha256()
    for kind in ("single", "multi_key", "multi_value", "multi_query"):
        dataset = generate_needles(kind, 3, seed=5, haystack_docs=7)
        digest.update(
            json.dumps(
                [[d.doc_id, d.text] for d in dataset.corpus]
                + [[r.query, r.answer, r.positives, r.negatives] for r in dataset.records]
            ).encode()
        )
    assert digest.hexdigest() == "2459fe6703abcebb30407440b52f358b2f6ebf413a472f33a5f2bc941d9c2012"


def test_niah_asks_every_size_the_same_questions_at_the_same_depths():
    sizes = [400, 12800]  # 20 and 640 documents of 20 tokens
    subtasks = ["niah_single_1", "niah_multikey_1"]
    model = _RecordingNIAHModel()
    report = run_niah(model, sizes=sizes, samples_per_task=3, subtasks=subtasks, seed=4)
    assert model.questions[:6] == model.questions[6:]  # size 400's six samples, then size 12800's
    small, large = report.samples[:6], report.samples[6:]
    assert [s.expected for s in small] == [s.expected for s in large]
    for small_memory, large_memory, small_sample, large_sample in zip(
        model.memories[:6], model.memories[6:], small, large
    ):
        needles = {d.doc_id: d.text for d in small_memory if not is_haystack_doc(d.doc_id)}
        assert needles == {d.doc_id: d.text for d in large_memory if not is_haystack_doc(d.doc_id)}
        hay_small = {d.text for d in small_memory if is_haystack_doc(d.doc_id)}
        assert hay_small.isdisjoint(d.text for d in large_memory if is_haystack_doc(d.doc_id))
        # The same relative depth, up to one small memory's document.
        for small_id, large_id in zip(small_sample.needle_ids, large_sample.needle_ids):
            assert abs(small_id / len(small_memory) - large_id / len(large_memory)) <= 1.5 / len(small_memory)


def test_niah_gives_each_subtask_of_a_kind_its_own_needles():
    """The gpu_experiment driver's rounds: one sample per subtask, seeded by the round."""
    samples = [
        sample
        for round_index in range(3)
        for sample in run_niah(
            _RecordingNIAHModel(),
            sizes=[400],
            samples_per_task=1,
            seed=round_index,
            subtasks=["niah_single_1", "niah_single_2"],
        ).samples
    ]
    expected = [[s.expected for s in samples if s.subtask == task] for task in ("niah_single_1", "niah_single_2")]
    assert all(a != b for a, b in zip(*expected))


def test_niah_scores_routed_ids_decoding_beside_free_decoding(checkpoint):
    template = TemplateConfig()  # `[12]` in the tokenizer's own (BPE-merged) digits
    model = EvalModel.load(
        checkpoint,
        template=template,
        settings=LoopSettings(max_rounds=1, max_round_tokens=12, max_answer_tokens=3, show_progress=False),
    )
    for memory_id in (1, 9, 12, 307):
        text = model.tokenizer.decode(model.memory_id_tokens(memory_id))
        assert [template.parse_memory_id(m) for m in re.findall(template.memory_id_pattern(), text)] == [memory_id]
    report = run_niah(
        model, sizes=[200], samples_per_task=2, subtasks=["niah_single_1", "niah_multikey_1"], routed_ids_too=True
    )
    assert all(s.routed_ids_score is not None and s.routed_ids_retrieved is not None for s in report.samples)
    assert set(report.accuracy("routed_ids_score")[200]) == {"niah_single_1", "niah_multikey_1", "average"}
    # Each router layer's selection for the question, as memory IDs of the sample's own memory.
    config = model.model.config
    for sample in report.samples:
        assert len(sample.routed_by_layer) == len(config.router_layers)
        assert all(
            len(ids) == config.top_k_docs and len(set(ids)) == len(ids) and min(ids) >= 1
            for ids in sample.routed_by_layer
        )


def test_niah_misses_are_told_apart_by_routing_written_ids_and_value():
    def sample(score, retrieved, by_layer, size=100):
        return NIAHSample(
            subtask="niah_single_1",
            memory_tokens=size,
            encoded_tokens=size,
            score=score,
            answer="",
            expected=["1"],
            retrieved_ids=retrieved,
            needle_ids=[7],
            routed_by_layer=by_layer,
        )

    right = sample(1.0, [7], [[7]])
    routing = sample(0.0, [3], [[3], [4]])
    misread = sample(0.0, [17], [[3], [7]])  # one layer found the needle; the written ID is another
    value = sample(0.0, [7], [[7]])
    unknown = sample(0.0, [3], None)
    assert [s.miss_kind() for s in (right, routing, misread, value, unknown)] == [
        None,
        "routing",
        "id",
        "value",
        "id_or_routing",
    ]
    report = NIAHReport([right, routing, misread, value, unknown, sample(0.0, [3], [[3]], size=200)])
    assert report.miss_kinds() == {100: {"routing": 1, "id": 1, "value": 1, "id_or_routing": 1}, 200: {"routing": 1}}


@pytest.mark.parametrize("pin", [True, False])
def test_run_qa_passes_the_pinning_choice_to_the_memory(pin):
    """gpu_experiment asks its 16-question memories unpinned (pinning 1M tokens cost more than the questions)."""
    pinned = []

    class Model:
        settings = SimpleNamespace(show_progress=False)
        model = SimpleNamespace(config=SimpleNamespace(top_k_docs=1))

        def encode_memory(self, documents, pin=True):
            pinned.append(pin)
            return SimpleNamespace(num_docs=len(documents), num_tokens=20 * len(documents))

        def interleave(self, store, trace_k=0):
            return store

        def ask(self, loop, question):
            return SimpleNamespace(answer="Paris", retrieved_ids=[1], rounds=[None], first_routing=[])

    dataset = RetrievalDataset(
        corpus=[Document("d0", "The capital is Paris.")],
        records=[RetrievalRecord(query="Which capital?", answer="Paris", positives=["d0"])],
    )
    report = run_qa(Model(), dataset, pin=pin)
    assert pinned == [pin] and report.items[0].exact_match == 1.0
