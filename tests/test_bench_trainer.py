"""The trainer benchmark: the recipe it runs, and a run of all three configurations on the CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from train_runs import REPO, failure_report, run_launcher

from train.benchmark import benchmark_recipe
from train.config import load_recipe


def test_the_benchmark_runs_the_stage_alone_from_a_random_backbone_of_the_shape(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "qwen3_4b.yaml")
    recipe, stage = benchmark_recipe(
        recipe,
        "sft_64k",
        steps=7,
        accumulation=1,
        world_size=2,
        shape="qwen3-4b",
        layers=18,
        synthetic=True,
        run_dir=tmp_path,
    )
    assert [s.name for s in recipe.stages] == ["sft_64k"]
    assert recipe.model.backbone is None and recipe.model.inline_config["num_hidden_layers"] == 18
    assert recipe.model.inline_config["hidden_size"] == 2560
    assert recipe.tokenizer.path is None and recipe.tokenizer.train_tiny is not None  # the checkpoint's is absent
    assert stage.sources == {"synthetic_65536": 1.0}
    assert recipe.data.sources["synthetic_65536"]["max_example_tokens"] == 65536
    assert stage.global_batch_tokens == 2 * 65536 and stage.budget.steps == 7 and stage.init_from == "backbone"
    assert stage.activations.saved_attention_layers == 26  # the stage's own settings are what gets measured
    assert not stage.eval.sources and not recipe.checkpoint.save_final and recipe.run.output_dir == str(tmp_path)


@pytest.mark.integration
def test_trainer_standalone_and_dense_run_on_the_same_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_launcher(
        "bench_trainer",
        [
            "--stage",
            "cpt_main",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
            "--out",
            str(out),
            "deepspeed.zero_stage=3",
        ],
    )
    assert result.returncode == 0, failure_report(result)
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"standalone", "trainer", "dense"}
    for name, numbers in report["results"].items():
        assert numbers["steps_timed"] == 2, name
        assert numbers["tokens_per_s_per_device"] > 0 and 0 < numbers["mfu"] < 1 and numbers["step_seconds"] > 0
    speed = {name: numbers["tokens_per_s_per_device"] for name, numbers in report["results"].items()}
    assert math.isclose(report["ratios"]["trainer / standalone tokens/s"], speed["trainer"] / speed["standalone"])
    assert report["zero_stage"] == 3 and report["world_size"] == 1
    # The trainer's own metrics are what the report summarises.
    steps = [json.loads(line) for line in (tmp_path / "run/stages/cpt_main/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "tokens_per_s_per_device" in r] == [1, 2, 3]
