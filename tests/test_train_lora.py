"""LoRA stages (`stages.<name>.lora`): peft adapters on the chosen linear layers (backbone and
router) train through the DeepSpeed trainer with every other weight frozen, and the stage exports
either the merged MSA model or the adapter over its base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from batches import random_packed_batch, tiny_msa
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from train_runs import TINY_RECIPE, failure_report, run_launcher
from transformers import AutoModelForCausalLM

from data.tokenization import load_tokenizer
from msa_modeling import MSAForCausalLM
from train.config import RecipeError, load_recipe
from train.export_files import is_complete_export
from train.model_setup import add_lora_adapters, build_from_backbone, load_stage_model, parameter_groups

# The backbone's query and value projections and the router's query projection; `\.q_proj$`
# does not match `router_q_proj` (no dot before `q`).
TARGETS = r"['\.(q|v)_proj$', '\.router_q_proj$']"


def lora_overrides(output_dir: Path, export: str) -> list[str]:
    return [
        f"run.output_dir={output_dir}",
        "tracking.wandb=disabled",
        "tracking.progress_bar=false",
        "stages.cpt_warmup.budget.steps=3",
        "stages.cpt_warmup.eval.sources={}",
        "stages.cpt_warmup.checkpoint_every_steps=100",
        "checkpoint.save_final=false",
        f"stages.cpt_warmup.lora={{target_modules: {TARGETS}, rank: 4, alpha: 8.0, export: {export}}}",
    ]


def stage_of(overrides: list[str]):  # noqa: ANN201
    return load_recipe(TINY_RECIPE, overrides).stage("cpt_warmup")


def test_lora_groups_split_the_adapters_and_freeze_everything_else(tmp_path: Path) -> None:
    stage = stage_of(lora_overrides(tmp_path, "merged"))  # groups: router (3e-3), backbone ('.*', 3e-4)
    model = add_lora_adapters(tiny_msa(0), stage.lora, stage.name)
    groups = {group["name"]: group for group in parameter_groups(model, stage)}
    names = {id(param): name for name, param in model.named_parameters()}
    router = [names[id(p)] for p in groups["router"]["params"]]
    backbone = [names[id(p)] for p in groups["backbone"]["params"]]
    layers = model.config.num_hidden_layers
    assert len(router) == 2 * len(model.config.router_layers)  # lora_A and lora_B of each router_q_proj
    assert len(backbone) == 2 * 2 * layers  # of each q_proj and v_proj
    assert all(".router_q_proj.lora_" in name for name in router)
    assert all(".lora_" in name and ".router_" not in name for name in backbone)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == set(router) | set(backbone)


def test_lora_pattern_that_matches_no_linear_layer_is_refused(tmp_path: Path) -> None:
    overrides = lora_overrides(tmp_path, "merged")
    overrides[-1] = "stages.cpt_warmup.lora={target_modules: ['\\.q_proj$', 'embed_tokens']}"
    stage = stage_of(overrides)
    with pytest.raises(ValueError, match=r"lora.target_modules\[1\] = 'embed_tokens' matches no linear layer"):
        add_lora_adapters(tiny_msa(0), stage.lora, stage.name)


def test_lora_on_a_tied_lm_head_is_refused(tmp_path: Path) -> None:
    overrides = lora_overrides(tmp_path, "merged")
    overrides[-1] = "stages.cpt_warmup.lora={target_modules: ['\\.q_proj$', 'lm_head']}"
    stage = stage_of(overrides)
    with pytest.raises(ValueError, match="match lm_head, whose weight is tied"):
        add_lora_adapters(tiny_msa(0, backbone_overrides={"tie_word_embeddings": True}), stage.lora, stage.name)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("{target_modules: []}", "lora.target_modules is empty"),
        ("{target_modules: ['(q']}", r"lora.target_modules\[0\] = '\(q' is not a regex"),
        ("{target_modules: [q_proj], rank: 0}", "lora.rank = 0 must be greater than 0"),
        ("{target_modules: [q_proj], export: full}", "must be one of \\['merged', 'adapter'\\]"),
    ],
)
def test_lora_settings_are_validated(setting: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(TINY_RECIPE, [f"stages.cpt_warmup.lora={setting}"])


@pytest.mark.integration
def test_lora_stage_trains_adapters_and_exports_merged_or_adapter(tmp_path: Path) -> None:
    exports = {}
    # The merged run under ZeRO-3 (the adapted layers partitioned, consolidated for the export),
    # the adapter run under ZeRO-2: one trajectory on one rank.
    for export, zero_stage in (("merged", 3), ("adapter", 2)):
        overrides = [*lora_overrides(tmp_path / export, export), f"deepspeed.zero_stage={zero_stage}"]
        result = run_launcher("pretrain", ["--stage", "cpt_warmup", *overrides])
        assert result.returncode == 0, failure_report(result)
        exports[export] = tmp_path / export / "stages/cpt_warmup/export"
        assert is_complete_export(exports[export])
    merged_dir, adapter_dir = exports["merged"], exports["adapter"]

    # Only the adapters trained: the adapter's base (written from the trained engine's weights)
    # is the model the stage converted from its backbone, and every lora_B (zero at start) moved.
    recipe = load_recipe(TINY_RECIPE, lora_overrides(tmp_path / "adapter", "adapter"))
    vocab_size = load_tokenizer(adapter_dir).vocab_size
    start = build_from_backbone(recipe.model, vocab_size, recipe.run.seed).state_dict()
    base = load_file(adapter_dir / "base/model.safetensors")
    assert base.keys() == start.keys() - {"lm_head.weight"}  # the tied head is written once
    for name, tensor in base.items():
        assert torch.equal(tensor, start[name]), name
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if ".lora_B." in name]
    assert len(lora_b) == 2 * 4 + len(json.loads((adapter_dir / "base/config.json").read_text())["router_layers"])
    assert all(tensor.abs().sum() > 0 for tensor in lora_b)

    # The adapter reloads, with AutoPeftModelForCausalLM (its base named in adapter_config.json)
    # and with PeftModel over the base; peft's own merge gives the merged export's logits.
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    assert isinstance(peft_model.get_base_model(), MSAForCausalLM)
    over_base = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(adapter_dir / "base"), adapter_dir
    ).eval()
    peft_merged = peft_model.merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(exported) is MSAForCausalLM and type(peft_merged) is MSAForCausalLM
    batch = random_packed_batch(5)
    with torch.no_grad():
        want = peft_merged(**batch, return_logits=True)
        for model in (exported, over_base):
            got = model(**batch, return_logits=True)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.selected_docs, want.selected_docs)
        # The adapters changed the model: the base alone predicts otherwise.
        plain = AutoModelForCausalLM.from_pretrained(adapter_dir / "base").eval()(**batch, return_logits=True)
    assert not torch.allclose(plain.logits, want.logits, atol=1e-3)

    # A later stage starting from the adapter export starts from the merged model.
    following = load_stage_model("previous", recipe.model, adapter_dir, vocab_size, recipe.run.seed).eval()
    with torch.no_grad():
        torch.testing.assert_close(following(**batch, return_logits=True).logits, want.logits, rtol=0, atol=0)

    # The merged export is a plain MSA export: generate() gives peft's merged model's tokens.
    prompt = batch["input_ids"][:1, :8]
    settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert exported.generate(prompt, **settings).tolist() == peft_merged.generate(prompt, **settings).tolist()
