"""All four stages of recipes/tiny.yaml in one process: each stage starts from the previous
stage's export, the final export loads with AutoModelForCausalLM, and the tracked metrics
land in metrics.jsonl and in an offline W&B run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_runs import failure_report, run_launcher
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import msa_modeling  # noqa: F401  (registers model_type "msa")
from train.config import load_recipe

pytestmark = pytest.mark.integration

STAGES = ("cpt_warmup", "cpt_main", "sft_short", "sft_long")
LOGGED_KEYS = {
    "loss",
    "lm_loss",
    "aux_loss",
    "recall@1",
    "recall@5",
    "recall@10",
    "recall@1/layer_2",
    "recall@10/layer_3",
    "lr/router",
    "lr/backbone",
    "grad_norm",
    "tokens_per_s_per_device",
    "mfu",
    "tokens_seen",
    "tokens_budget",
    "memory_gb",
    "step",
}


def test_tiny_recipe_runs_every_stage_from_the_previous_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_launcher(
        "run_all",
        [
            f"run.output_dir={run_dir}",
            "tracking.wandb=offline",
            "tracking.progress_bar=false",
            "stages.cpt_warmup.budget.steps=2",
            "stages.cpt_warmup.checkpoint_every_steps=1",
            "stages.cpt_main.budget.tokens=3072",
            "stages.sft_short.budget.steps=2",
            "stages.sft_long.budget.steps=1",
            # At LR 1e-30 (recipes refuse 0) an AdamW step moves no weight by even one ulp, so sft_long's
            # export can only equal sft_short's if the stage started from that export.
            "stages.sft_long.optimizer.lr=1e-30",
            "checkpoint.save_final=false",
        ],
    )
    assert result.returncode == 0, failure_report(result)
    for stage in STAGES:
        assert (run_dir / "stages" / stage / "export" / "model.safetensors").is_file(), stage
    started_from = load_file(run_dir / "stages/sft_short/export/model.safetensors")
    finished = load_file(run_dir / "stages/sft_long/export/model.safetensors")
    assert started_from.keys() == finished.keys()
    for name, weight in started_from.items():
        assert torch.equal(weight, finished[name]), name
    warmup_export = load_file(run_dir / "stages/cpt_warmup/export/model.safetensors")
    assert not all(torch.equal(weight, warmup_export[name]) for name, weight in started_from.items())

    # Checkpoints rotate: keep_last 2 of the warm-up's step 1 and step 2 checkpoints.
    warmup = run_dir / "stages/cpt_warmup"
    assert sorted(p.name for p in (warmup / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert (warmup / "checkpoints/latest").read_text() == "step_00000002"
    # Without save_final, a stage shorter than its checkpoint interval leaves no checkpoint, only its export.
    assert not (run_dir / "stages/sft_long/checkpoints/latest").exists()

    records = [json.loads(line) for line in (warmup / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2]
    assert set(train_records[0]) >= LOGGED_KEYS
    assert train_records[-1]["tokens_seen"] == train_records[-1]["tokens_budget"] == 2048
    assert any("eval/recall@1" in r for r in records)
    main_records = [json.loads(line) for line in (run_dir / "stages/cpt_main/metrics.jsonl").read_text().splitlines()]
    # The LR logged is the one each step used: 1 warm-up step at the peak, the anneal from the peak
    # (step 2), then below it (step 3), towards final_lr_ratio.
    main_lrs = [r["lr/all"] for r in main_records if "lr/all" in r]
    assert main_lrs[0] == main_lrs[1] > main_lrs[2]

    wandb_logs = list((warmup / "wandb").glob("offline-run-*/run-*.wandb"))
    assert wandb_logs, "no offline W&B run"
    assert b"recall@1/layer_3" in wandb_logs[0].read_bytes() and b"mfu" in wandb_logs[0].read_bytes()

    export = run_dir / "stages/sft_long/export"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "MSAForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(tokenizer) == model.config.vocab_size
    assert load_recipe(export / "recipe.yaml").stages[-1].name == "sft_long"
    ids = torch.tensor([tokenizer.encode("Question: What is the home town of Alice Berg?")])
    assert torch.isfinite(model(ids).logits).all()
    # The export carries its modeling code for trust_remote_code, and generates through transformers.
    assert (
        json.loads((export / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        == "modeling_msa.MSAForCausalLM"
    )
    assert (export / "modeling_msa.py").is_file() and (export / "backbones_qwen3.py").is_file()
    generated = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        "Question: What is the home town of Alice Berg?", max_new_tokens=4, do_sample=False
    )
    assert generated[0]["generated_text"].startswith("Question: What is the home town of Alice Berg?")
