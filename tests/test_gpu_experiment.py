"""Pieces of the GPU-scale experiment driver that can be checked on the CPU in seconds.

The whole driver at toy scale (`python -m experiments.gpu --smoke`) takes about
three minutes on 2 CPU cores, so it is documented in docs/EXPERIMENTS.md, not run here.
"""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import write_tiny_export
from memories import training_row

from data.records import Document
from eval.harness import LoopSettings
from experiments.gpu import driver, plan, report, stats, training
from experiments.gpu import evaluation as eval_jobs
from train.config import load_recipe
from train.runner import tokenizer_texts as runner_tokenizer_texts
from train.tracking import stage_curves


@pytest.fixture(scope="module")
def global_position_export(tmp_path_factory):
    """A trainer-export-shaped folder of a tiny model trained with document_positions=False."""
    return write_tiny_export(
        tmp_path_factory.mktemp("global_positions_export"),
        top_k_docs=2,
        chunk_size=4,
        query_position_offset=3,
        document_positions=False,
    )


def test_global_position_evaluation_matches_the_training_forward(global_position_export):
    """The `global_positions` variant is evaluated through the plain library path: documents
    encoded at their offsets in the memory, the question after the whole memory. That reproduces
    the training forward of the `[prefix][documents][question][answer]` row."""
    model = eval_jobs.load_eval_model(
        global_position_export, "cpu", LoopSettings(max_batch_tokens=64, show_progress=False)
    )
    assert model.model.config.document_positions is False
    documents = [
        Document(str(i), text)
        for i, text in enumerate(
            ["the cat sat on the mat", "a bird flew", "seven is a number", "the capital is far away", "blue"]
        )
    ]
    store = model.encode_memory(documents)
    generator = model.interleave(store).generator
    rendered = model.render_documents(documents)
    question, answer = model.query_ids("where did the cat sit?"), model.tokenizer.encode("on the mat")
    assert generator.query_start == len(model.prefix_ids()) + sum(len(doc) for doc in rendered)

    row = training_row({"prefix": model.prefix_ids(), "docs": rendered, "question": question, "answer": answer})
    with torch.no_grad():
        trained = model.model(**row, return_logits=True)
    logits, cache = generator.prefill(question)
    first_answer = len(row["input_ids"][0]) - len(answer)
    torch.testing.assert_close(logits, trained.logits[0, first_answer - 1], rtol=1e-4, atol=1e-5)
    for offset, token in enumerate(answer[:-1]):
        logits = generator.decode(cache, token)
        torch.testing.assert_close(logits, trained.logits[0, first_answer + offset], rtol=1e-4, atol=1e-5)
    for routing, selected in zip(cache.routing, trained.selected_docs):
        assert sorted(routing.docs.tolist()) == selected.nonzero().flatten().tolist()


def test_variant_overrides_express_the_three_ablations():
    recipe = load_recipe(plan.DEFAULT_RECIPE)
    load = lambda variant: load_recipe(plan.DEFAULT_RECIPE, plan.variant_overrides(recipe, variant))  # noqa: E731
    assert plan.variant_overrides(recipe, "main") == []
    assert all(stage.loss_weights.aux == 0 for stage in load("no_aux").stages)
    assert load("global_positions").model.msa["document_positions"] is False
    no_interleave = load("no_interleave")
    kinds = {name: values["sample_kind"] for name, values in no_interleave.data.sources.items()}
    for stage, original in zip(no_interleave.stages, recipe.stages):
        assert all(kinds[name] != "interleave" for name in stage.sources)
        assert sorted(stage.sources.values()) == sorted(original.sources.values())
    used = {name for stage in recipe.stages for name in stage.sources}
    assert any(kinds[name] == "interleave" for name in used)


def test_the_recipe_trains_the_ids_and_chunks_that_evaluation_uses():
    """Evaluation memories reach 64 times the longest training row, so their documents' IDs reach
    about 64 times a training memory's; the evaluated model reads the chunk size it trained on."""
    recipe = load_recipe(plan.DEFAULT_RECIPE)
    sources = recipe.data.sources
    largest = max(values["memory"]["max_memory_docs"] for values in sources.values())
    assert all(values["memory"]["id_offset_max"] >= 64 * largest for values in sources.values())
    assert {stage.chunk_size or recipe.model.msa["chunk_size"] for stage in recipe.stages} == {1}


def test_capped_tokenizer_texts_equal_the_runners(tmp_path):
    recipe = load_recipe(plan.DEFAULT_RECIPE)
    recipe = load_recipe(plan.DEFAULT_RECIPE, plan.smoke_overrides(recipe))
    limit = recipe.tokenizer.train_tiny.sample_records
    assert training.tokenizer_texts(recipe, tmp_path, limit) == list(runner_tokenizer_texts(recipe, tmp_path, limit))


def test_evaluation_asks_in_the_template_of_the_last_stages_qa_source():
    recipe = load_recipe(plan.DEFAULT_RECIPE)
    trained = eval_jobs.qa_template(recipe)
    assert trained == {"id_digits": [f"<id{d}>" for d in range(10)]}  # the recipe's dedicated ID tokens
    custom = load_recipe(
        plan.DEFAULT_RECIPE, ["data.sources.needles_single_qa_long.template.answer_format='A: {answer}'"]
    )
    assert eval_jobs.qa_template(custom) == {**trained, "answer_format": "A: {answer}"}
    # An earlier stage's template is not the one the evaluated export was last trained with.
    earlier = load_recipe(plan.DEFAULT_RECIPE, ["data.sources.needles_single_qa.template.answer_format='A: {answer}'"])
    assert eval_jobs.qa_template(earlier) == trained


def test_a_gpu_named_several_times_runs_that_many_variants_at_once():
    assert plan.assign_worker_slots(4, [0, 0, 0]) == [(0, 0), (0, 1), (0, 2), (0, 0)]
    assert plan.assign_worker_slots(3, [0, 1]) == [(0, 0), (1, 1), (0, 0)]
    assert plan.assign_worker_slots(2, [-1]) == [(-1, 0), (-1, 0)]
    with pytest.raises(ValueError, match="no worker slots"):
        plan.assign_worker_slots(1, [])


def test_step_planner_fits_the_stages_to_the_time_left():
    # Two stages of 100 steps x 1000 tokens at 1000 tokens/s need 200 s; 100 s are left.
    planner = plan.StepPlanner(
        [(100, 1000), (100, 1000)], deadline=100.0, tokens_per_s=1000.0, overhead_s=0.0, max_scale=2.0, min_steps=5
    )
    assert planner.steps_for(0, now=0.0) == (50, 0.5)
    # Measured at twice the speed, the second stage may use more than its recipe steps, up to max_scale.
    planner.update(tokens_per_s=4000.0, overhead_s=0.0)
    steps, scale = planner.steps_for(1, now=50.0)
    assert steps == 180 and scale == pytest.approx(1.8)
    assert planner.steps_for(1, now=99.9)[0] == 5  # never below min_steps


def test_cost_model_learns_question_time_from_small_jobs_and_rate_from_large_ones():
    costs = eval_jobs.CostModel(encode_tokens_per_s=1000.0, question_s=1.0, min_tokens=10_000)
    costs.observe(tokens=1000, questions=4, seconds=3.0)  # 1 s of encoding, 0.5 s per question
    assert costs.question_s == pytest.approx(0.5) and costs.encode_tokens_per_s == 1000.0
    costs.observe(tokens=40_000, questions=2, seconds=11.0)  # 10 s of encoding
    assert costs.encode_tokens_per_s == pytest.approx(4000.0)
    assert costs.predict(8000, 2) == pytest.approx(3.0)
    # Eight small memories add up to more than min_tokens, but measure questions, not the rate.
    costs.observe(tokens=8 * 2000, questions=8, seconds=12.0, memory_tokens=2000)  # 4 s encoding, 1 s a question
    assert costs.encode_tokens_per_s == pytest.approx(4000.0) and costs.question_s == pytest.approx(0.75)


def test_acceptance_compares_the_subtasks_measured_at_both_sizes():
    samples = lambda tasks: [{"subtask": t} for t in tasks]  # noqa: E731
    niah = {
        "16": {
            "accuracy": {"a": 1.0, "b": 0.5, "average": 0.75},
            "samples": samples("aabb"),
            "accuracy_routed_ids": {"a": 1.0, "average": 1.0},
        },
        "1024": {
            "accuracy": {"a": 0.9, "average": 0.9},
            "samples": samples("a"),
            "accuracy_routed_ids": {"a": 0.8, "average": 0.8},
        },
    }
    check = stats.acceptance({"eval": {"niah": niah}}, row=16)
    assert check["subtasks"] == ["a"] and check["relative_drop"] == pytest.approx(0.1) and check["passed"]
    assert (check["samples_at_L"], check["samples_at_64L"]) == (2, 1)
    routed = stats.acceptance({"eval": {"niah": niah}}, row=16, accuracy_key="accuracy_routed_ids")
    assert routed["relative_drop"] == pytest.approx(0.2) and routed["passed"] is False
    assert stats.acceptance({"eval": {}}, row=16)["passed"] is None


def test_later_niah_rounds_leave_time_for_router_recall_and_the_qa_jobs():
    settings = {"size_multiples": [1, 64, 8], "niah_subtasks": ["a"]}
    jobs = eval_jobs.eval_jobs(100, settings)
    kept = eval_jobs.jobs_kept_time_for(jobs, jobs[0])
    assert [(j["kind"], j["size"]) for j in kept] == [
        ("qa_recall", 100),
        ("multihop", 100),
        ("kv", 100),
        ("qa_recall", 6400),
    ]
    assert all(j in jobs[1:5] for j in kept) and {"kind": "qa_recall", "size": 800} in jobs


def test_paired_comparison_pairs_rounds_and_bounds_the_drop():
    def sample(task, score, routed):
        return {"subtask": task, "score": score, "routed_ids_score": routed}

    at_row = [sample("a", 1.0, 1.0), sample("b", 1.0, 1.0), sample("a", 1.0, 1.0), sample("b", 0.0, 1.0)]
    at_64 = [sample("a", 0.0, 1.0), sample("b", 1.0, 1.0), sample("a", 1.0, 1.0)]  # the deadline cut round 2's b
    pairs = stats.paired_niah_scores(at_row, at_64, ["a", "b"])
    assert pairs == {"a": [(1.0, 0.0), (1.0, 1.0)], "b": [(1.0, 1.0)]}
    comparison = stats.paired_niah_comparison(pairs)
    assert (comparison["pairs"], comparison["right_at_L_only"], comparison["right_at_64L_only"]) == (3, 1, 0)
    low, high = comparison["drop_interval_90"]
    # Resampling a's two pairs gives a drop of 0, 0.25 or 0.5 (b is always right at both sizes).
    assert (low, high) == (0.0, 0.5)
    assert stats.paired_niah_comparison(pairs) == comparison  # seeded

    routed = stats.paired_niah_comparison(stats.paired_niah_scores(at_row, at_64, ["a", "b"], "routed_ids_score"))
    assert routed["drop_interval_90"] == [0.0, 0.0] and routed["right_at_L_only"] == 0

    niah = {
        "16": {"accuracy": {"a": 1.0, "b": 0.5}, "samples": at_row},
        "1024": {"accuracy": {"a": 0.5, "b": 1.0}, "samples": at_64},
    }
    check = stats.acceptance({"eval": {"niah": niah}}, row=16)
    assert check["pairs"] == 3 and check["drop_interval_90"] == [0.0, 0.5]
    assert stats.paired_niah_comparison({"a": []})["drop_interval_90"] is None


def test_merge_adds_the_other_variants_of_an_earlier_run(tmp_path):
    run = {
        "recipe": "/repo/recipes/qwen3_350m_synthetic.yaml",
        "overrides": [],
        "longest_row": 16384,
        "smoke": False,
        "niah_matched": True,
        "variants": {"main": {"status": "done", "steps": 1}},
    }
    earlier = {
        **run,
        "recipe": "/elsewhere/recipes/qwen3_350m_synthetic.yaml",
        "device": "cuda: H200",
        "variants": {"main": {"status": "old"}, "no_aux": {"status": "done", "acceptance": {"passed": True}}},
    }
    (tmp_path / "a.json").write_text(json.dumps(earlier))
    report.merge_variants(run, [tmp_path / "a.json"])
    assert run["variants"]["main"] == {"status": "done", "steps": 1}  # this run's own result wins
    assert run["variants"]["no_aux"]["status"] == "done"
    assert run["variants"]["no_aux"]["merged_from"] == str(tmp_path / "a.json")
    assert run["variants"]["no_aux"]["acceptance"]["passed"] is None  # judged again: it has no NIAH samples
    (tmp_path / "b.json").write_text(json.dumps({**earlier, "longest_row": 1536}))
    with pytest.raises(ValueError, match="longest_row is 1536, this run's is 16384"):
        report.merge_variants(run, [tmp_path / "b.json"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        report.merge_variants(run, [tmp_path / "missing.json"])
    # A file from before matched NIAH (no key, or false) asked other questions at each size: refused, not mixed.
    for old_file in (
        {key: value for key, value in earlier.items() if key != "niah_matched"},
        {**earlier, "niah_matched": False},
    ):
        (tmp_path / "old.json").write_text(json.dumps(old_file))
        with pytest.raises(ValueError, match="old.json: its NIAH samples draw their own questions"):
            report.merge_variants(run, [tmp_path / "old.json"])
    assert "no_aux" in run["variants"] and set(run["variants"]) == {"main", "no_aux"}


def test_summary_table_reports_whether_the_model_wrote_the_routed_id():
    row = 1024
    results = {
        "longest_row": row,
        "variants": {
            "main": {
                "status": "ok",
                "eval": {
                    "qa_recall": {
                        str(row): {"ids_from_routed": 0.75, "router_recall": {"recall@1": 1.0}},
                        str(64 * row): {"ids_from_routed": 0.25},
                    }
                },
            }
        },
    }
    table = report.summary_table(results).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert len(header) == len(cells) == table[1].count("---")
    assert cells[header.index("ID = routed @1K / @64K")] == "0.750 / 0.250"


def test_summary_table_reports_the_held_out_split_and_the_training_a_resumed_run_reused():
    curves = [
        {
            "stage": "sft_long",
            "train": [{"step": 87, "lm_loss": 0.38, "recall@1": 0.0}],
            "eval": [{"step": 40, "lm_loss": 0.2, "recall@1": 0.5}, {"step": 87, "lm_loss": 0.04, "recall@1": 1.0}],
        }
    ]
    fresh = {
        "status": "ok",
        "curves": curves,
        "stages": [{"steps": 87, "wall_s": 30.4}],
        "timing": {"started": 100.0, "train_end": 478.4},
    }
    resumed = {
        **fresh,
        "stages": [{"steps": 34, "wall_s": 14.8, "reused": True}, {"steps": 87, "wall_s": 23.4, "reused": True}],
        "timing": {"started": 100.0, "train_end": 114.0},
    }
    table = report.summary_table({"longest_row": 1024, "variants": {"fresh": fresh, "resumed": resumed}}).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    column = header.index
    assert rows["fresh"][column("final LM loss (eval split)")] == "0.040"
    assert rows["fresh"][column("final recall@1 (eval split)")] == "1.000"
    assert rows["fresh"][column("train s")] == "378"
    assert rows["resumed"][column("train s")] == "38 (reused)"


def test_stage_curves_keep_each_router_layers_eval_recall(tmp_path):
    stage = tmp_path / "stages" / "sft_short"
    stage.mkdir(parents=True)
    records = [
        {
            "step": 1,
            "loss": 2.0,
            "lm_loss": 1.9,
            "recall@1": 0.5,
            "recall@1/layer_0": 0.9,
            "recall@1/layer_1": 0.1,
            "memory_gb": 35.5,
        },
        {"step": 1, "eval/loss": 2.5, "eval/recall@1": 0.5, "eval/recall@1/layer_0": 0.9, "eval/recall@1/layer_1": 0.1},
    ]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    [curve] = stage_curves(tmp_path, ["cpt_main", "sft_short"])  # cpt_main never ran
    assert curve["stage"] == "sft_short"
    assert curve["eval"] == [
        {
            "step": 1,
            "loss": 2.5,
            "lm_loss": None,
            "aux_loss": None,
            "recall@1": 0.5,
            "recall@5": None,
            "recall@10": None,
            "recall@1/layer_0": 0.9,
            "recall@1/layer_1": 0.1,
        }
    ]
    assert curve["train"][0]["recall@1"] == 0.5 and "recall@1/layer_0" not in curve["train"][0]
    assert curve["train"][0]["memory_gb"] == 35.5  # the peak, so a recipe's memory claims can be checked


def test_evaluation_measures_niah_and_routing_at_l_and_64l_first():
    settings = {"size_multiples": [1, 64, 8], "niah_subtasks": ["niah_single_1", "niah_multikey_1"]}
    jobs = eval_jobs.eval_jobs(100, settings)
    assert jobs[0] == {"kind": "niah_rounds", "sizes": [100, 6400]}
    # The cheap jobs at L before router recall at 64L, so that a short deadline skips only that one.
    assert [(job["kind"], job.get("size")) for job in jobs[1:5]] == [
        ("qa_recall", 100),
        ("multihop", 100),
        ("kv", 100),
        ("qa_recall", 6400),
    ]
    assert [(job["kind"], job["size"]) for job in jobs if job["kind"] == "niah"] == [("niah", 800)] * 2
    assert ("qa_recall", 800) in {(job["kind"], job.get("size")) for job in jobs}


def _fake_niah(monkeypatch, clock: list[float], seconds_per_token: float, fail_at: int | None = None) -> list[tuple]:
    """run_niah replaced by one that advances `clock` by the memory's cost and records its calls."""
    from eval import niah

    calls = []

    def run_niah(model, sizes, samples_per_task, subtasks, seed, routed_ids_too):
        assert samples_per_task == 1 and routed_ids_too and len(sizes) == 1
        calls.append((sizes[0], subtasks[0], seed))
        if len(calls) == fail_at:
            raise RuntimeError("CUDA out of memory")
        clock[0] += sizes[0] * seconds_per_token
        sample = niah.NIAHSample(
            subtask=subtasks[0],
            memory_tokens=sizes[0],
            encoded_tokens=sizes[0],
            score=float(sizes[0] < 1000),
            answer="1",
            expected=["1"],
            retrieved_ids=[1],
            needle_ids=[1],
            routed_ids_score=1.0,
            routed_ids_answer="1",
            routed_ids_retrieved=[1],
        )
        return niah.NIAHReport(samples=[sample])

    monkeypatch.setattr(niah, "run_niah", run_niah)
    monkeypatch.setattr(eval_jobs.time, "time", lambda: clock[0])
    return calls


def test_niah_rounds_ask_both_sizes_equally_often_until_the_deadline(monkeypatch):
    clock = [0.0]
    calls = _fake_niah(monkeypatch, clock, seconds_per_token=0.01)  # a pair (100 + 6400 tokens) takes 65 s
    settings = {"niah_samples": 8, "niah_subtasks": ["a", "b"]}
    costs = eval_jobs.CostModel(encode_tokens_per_s=100.0, question_s=0.0, min_tokens=400)
    evaluation, reports, saves = {"niah": {}, "skipped": []}, {}, []
    eval_jobs.run_niah_rounds(
        None,
        [100, 6400],
        settings,
        costs,
        soft_deadline=200.0,
        hard_deadline=300.0,
        reports=reports,
        evaluation=evaluation,
        save=lambda: saves.append(1),
    )
    # Three pairs end by 195 s; a fourth would end at 260 s, after the soft deadline.
    assert calls == [(100, "a", 0), (6400, "a", 0), (100, "b", 0), (6400, "b", 0), (100, "a", 1), (6400, "a", 1)]
    assert evaluation["skipped"] == [{"job": "niah rounds 2.. from b", "predicted_s": 65.0}]
    assert [s["subtask"] for s in evaluation["niah"]["100"]["samples"]] == ["a", "b", "a"]
    assert evaluation["niah"]["6400"]["accuracy"] == {"a": 0.0, "b": 0.0, "average": 0.0}
    assert evaluation["niah"]["100"]["seconds"] == pytest.approx(3.0) and len(saves) == 3
    check = stats.acceptance({"eval": evaluation}, row=100)
    assert (check["samples_at_L"], check["samples_at_64L"], check["passed"]) == (3, 3, False)


def test_the_first_niah_round_runs_past_the_soft_deadline_and_an_error_ends_the_rounds(monkeypatch):
    clock = [0.0]
    calls = _fake_niah(monkeypatch, clock, seconds_per_token=0.01, fail_at=4)
    settings = {"niah_samples": 8, "niah_subtasks": ["a", "b", "c"]}
    costs = eval_jobs.CostModel(encode_tokens_per_s=100.0, question_s=0.0, min_tokens=400)
    evaluation = {"niah": {}, "skipped": []}
    eval_jobs.run_niah_rounds(
        None,
        [100, 6400],
        settings,
        costs,
        soft_deadline=10.0,
        hard_deadline=100.0,
        reports={},
        evaluation=evaluation,
        save=lambda: None,
    )
    assert calls == [(100, "a", 0), (6400, "a", 0), (100, "b", 0), (6400, "b", 0)]
    assert (
        evaluation["errors"][0]["job"] == "niah@6400/b, round 1"
        and "out of memory" in evaluation["errors"][0]["traceback"]
    )
    assert len(evaluation["niah"]["100"]["samples"]) == 2 and len(evaluation["niah"]["6400"]["samples"]) == 1


def test_resumed_stages_keep_the_earlier_runs_records(monkeypatch, tmp_path):
    """`--resume` skips a stage whose export is complete; the summary still shows the steps that
    export was trained with, from the earlier run's record."""
    from types import SimpleNamespace

    import data.tokenization as tokenization
    import train.api as api
    import train.runner as runner

    recipe = load_recipe(plan.DEFAULT_RECIPE)
    names = [stage.name for stage in recipe.stages]
    complete = set(names[:-1])  # the last stage was cut off by the deadline
    is_complete = lambda path: path.parent.name in complete  # stages/<name>/export
    monkeypatch.setattr(api, "is_complete_export", is_complete)
    monkeypatch.setattr(runner, "is_complete_export", is_complete)
    monkeypatch.setattr(runner, "previous_export", lambda *args: None)
    monkeypatch.setattr(training, "wait_for_prep", lambda run_dir, deadline: {})
    monkeypatch.setattr(api, "init_distributed", lambda: SimpleNamespace(is_main=False, rank=1, world_size=2))
    monkeypatch.setattr(tokenization, "load_tokenizer", lambda path: SimpleNamespace(vocab_size=10))
    ran = []

    class StopAtTraining(Exception):
        pass

    def fake_trainer(*args, **kwargs):
        ran.append(args[1].name)
        raise StopAtTraining

    monkeypatch.setattr(runner, "StageTrainer", fake_trainer)
    spec = {
        "run_dir": str(tmp_path),
        "recipe": str(plan.DEFAULT_RECIPE),
        "overrides": [],
        "train_deadline": 1e12,
        "assumed_tokens_per_s": 1e5,
        "stage_overhead_s": 1.0,
        "max_step_scale": 1.0,
        "min_steps": 1,
    }
    earlier = {names[0]: {"stage": names[0], "steps": 34, "tokens_per_s": 9e4}}
    result = {"stages": [], "timing": {}, "errors": []}
    with pytest.raises(StopAtTraining):
        training.train_variant(spec, result, lambda: None, earlier)
    assert ran == [names[-1]]
    assert result["stages"][0] == {"stage": names[0], "steps": 34, "tokens_per_s": 9e4, "reused": True}
    assert [s["stage"] for s in result["stages"]] == names
    assert all(s.get("reused") for s in result["stages"][:-1]) and "reused" not in result["stages"][-1]


def test_steps_from_reads_mains_stage_steps_and_names_what_is_missing(tmp_path):
    names = [stage.name for stage in load_recipe(plan.DEFAULT_RECIPE).stages]
    stages = [{"stage": name, "steps": 10 * (i + 1)} for i, name in enumerate(names)]
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps({"variants": {"main": {"stages": stages}, "no_aux": {"stages": []}}}))
    assert plan.recorded_stage_steps(path, names) == {name: 10 * (i + 1) for i, name in enumerate(names)}
    with pytest.raises(ValueError, match=r"variant 'other'.*\['main', 'no_aux'\]"):
        plan.recorded_stage_steps(path, names, variant="other")
    path.write_text(json.dumps({"variants": {"main": {"stages": stages[:-1]}}}))
    with pytest.raises(ValueError, match=f"no step count for stage.*{names[-1]}"):
        plan.recorded_stage_steps(path, names)
    with pytest.raises(FileNotFoundError, match="--steps-from .*missing.json"):
        plan.recorded_stage_steps(tmp_path / "missing.json", names)


def test_fixed_steps_override_the_planner_whatever_the_time_left(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import data.tokenization as tokenization
    import train.api as api
    import train.runner as runner

    recipe = load_recipe(plan.DEFAULT_RECIPE)
    names = [stage.name for stage in recipe.stages]
    monkeypatch.setattr(api, "is_complete_export", lambda path: False)
    monkeypatch.setattr(runner, "is_complete_export", lambda path: False)
    monkeypatch.setattr(runner, "previous_export", lambda *args: None)
    monkeypatch.setattr(training, "wait_for_prep", lambda run_dir, deadline: {})
    monkeypatch.setattr(api, "init_distributed", lambda: SimpleNamespace(is_main=False, rank=1, world_size=2))
    monkeypatch.setattr(tokenization, "load_tokenizer", lambda path: SimpleNamespace(vocab_size=10))
    trained = []

    class FakeTrainer:
        def __init__(self, recipe, stage, *args):
            trained.append((stage.name, stage.budget.steps))

        def run(self):
            pass

    monkeypatch.setattr(runner, "StageTrainer", FakeTrainer)
    fixed = {name: 7 + i for i, name in enumerate(names)}
    # The deadline has passed: the planner alone would give every stage min_steps.
    spec = {
        "run_dir": str(tmp_path),
        "recipe": str(plan.DEFAULT_RECIPE),
        "overrides": [],
        "train_deadline": 0.0,
        "assumed_tokens_per_s": 1e5,
        "stage_overhead_s": 1.0,
        "max_step_scale": 1.0,
        "min_steps": 1,
        "fixed_steps": fixed,
    }
    result = {"stages": [], "timing": {}, "errors": []}
    training.train_variant(spec, result, lambda: None)
    assert trained == list(fixed.items())
    assert [record["steps"] for record in result["stages"]] == list(fixed.values())


def test_progress_snapshot_keeps_the_numbers_so_far_where_the_results_go(tmp_path):
    import argparse

    done, waiting = tmp_path / "main" / "run", tmp_path / "no_aux" / "run"
    done.mkdir(parents=True)
    waiting.mkdir(parents=True)
    (done / "result.json").write_text(json.dumps({"variant": "main", "status": "running", "stages": [{"steps": 3}]}))
    jobs = [
        driver.Job(name, 0, 0, run_dir, tmp_path / name / "spec.json", tmp_path / name / "worker.log")
        for name, run_dir in (("main", done), ("no_aux", waiting))
    ]
    args = argparse.Namespace(recipe=plan.DEFAULT_RECIPE, overrides=[], smoke=False, name="gpu_x", steps_from=None)
    report.write_progress_snapshot(jobs, args, "cuda", 16384, t0=0.0, results_dir=tmp_path)
    snapshot = json.loads((tmp_path / "gpu_x.json").read_text())
    assert snapshot["partial"] is True and snapshot["longest_row"] == 16384 and snapshot["niah_matched"] is True
    assert snapshot["variants"]["main"]["stages"] == [{"steps": 3}]
    assert snapshot["variants"]["no_aux"] == {"status": "not started"}


def test_steps_from_warns_when_the_recorded_training_leaves_too_little_evaluation(tmp_path):
    record = {
        "variants": {
            "main": {
                "device_name": "NVIDIA H100 80GB HBM3",
                "stages": [{"stage": "a", "steps": 3}],
                "timing": {"started": 1000.0, "train_end": 1300.0},
            }
        }
    }
    (tmp_path / "r.json").write_text(json.dumps(record))
    train_s, card = plan.recorded_training_seconds(tmp_path / "r.json")
    assert (train_s, card) == (300.0, "NVIDIA H100 80GB HBM3")
    margin = plan.TRAINING_TIME_MARGIN
    left = plan.warn_if_fixed_steps_leave_no_evaluation(train_s, card, 500.0, 1, 200.0)
    assert left == pytest.approx(500.0 - margin * 300.0) and left < 200.0
    assert plan.warn_if_fixed_steps_leave_no_evaluation(train_s, card, 600.0, 1, 200.0) > 200.0
    # Two variants sharing a GPU train at about half speed each.
    assert plan.warn_if_fixed_steps_leave_no_evaluation(train_s, card, 600.0, 2, 200.0) < 0.0
    assert plan.recorded_training_seconds(tmp_path / "missing.json") == (None, None)
    assert plan.warn_if_fixed_steps_leave_no_evaluation(None, None, 600.0, 1, 200.0) is None
