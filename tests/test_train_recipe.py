"""Recipes: validation errors name the key, the file and the closest valid name; overrides;
the schedule, batch geometry and parameter groups derived from a stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from batches import tiny_msa
from train_runs import REPO, TINY_RECIPE, failure_report, run_launcher

from train.config import MOVED_KEYS, RecipeError, load_recipe
from train.engine import batch_geometry, deepspeed_config
from train.model_setup import parameter_groups
from train.schedule import LRMultiplier
from train.trainer import configure_layer_execution, total_steps

QWEN3_4B_RECIPE = REPO / "recipes" / "qwen3_4b.yaml"


def recipe_with(tmp_path: Path, old: str, new: str) -> Path:
    text = TINY_RECIPE.read_text()
    assert old in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_shipped_recipes_validate() -> None:
    tiny = load_recipe(TINY_RECIPE)
    assert [s.name for s in tiny.stages] == ["cpt_warmup", "cpt_main", "sft_short", "sft_long"]
    paper = load_recipe(QWEN3_4B_RECIPE)
    warmup, main = paper.stage("cpt_warmup"), paper.stage("cpt_main")
    assert (warmup.loss_weights.lm, warmup.loss_weights.aux) == (0.1, 1.0)
    assert (main.loss_weights.lm, main.loss_weights.aux) == (1.0, 0.1)
    assert warmup.budget.tokens + main.budget.tokens == pytest.approx(158.95e9)
    assert main.optimizer.lr * main.schedule.final_lr_ratio == pytest.approx(6e-6)
    assert [s.row_length for s in paper.stages if s.phase == "sft"] == [8192, 65536]
    gpu_check = load_recipe(REPO / "recipes" / "qwen3_1b_synthetic.yaml")
    assert gpu_check.deepspeed.zero_stage == 3 and gpu_check.model.dtype == "bfloat16"


def test_mistyped_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = recipe_with(tmp_path, "checkpoint_every_steps: 3", "checkpoint_every_step: 3")
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    message = str(error.value)
    assert str(path) in message
    assert "stages[0].checkpoint_every_step" in message
    assert "did you mean 'checkpoint_every_steps'" in message


def test_mistyped_nested_data_key_is_caught(tmp_path: Path) -> None:
    path = recipe_with(tmp_path, "memory: {memory_tokens: 160", "memory: {memory_token: 160")
    with pytest.raises(RecipeError, match=r"data\.sources\.kv_retrieval\.memory\.memory_token.*'memory_tokens'"):
        load_recipe(path)


def test_mistyped_model_settings_are_caught() -> None:
    with pytest.raises(RecipeError, match=r"unknown key model\.msa\.top_k_doc .*'top_k_docs'"):
        load_recipe(TINY_RECIPE, ["model.msa.top_k_doc=4"])
    with pytest.raises(RecipeError, match=r"unknown key model\.inline_config\.hiden_size .*'hidden_size'"):
        load_recipe(TINY_RECIPE, ["model.inline_config.hiden_size=32"])


def test_wrong_type_and_bad_choice(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\[0\]\.row_length = 'long' is not a int"):
        load_recipe(recipe_with(tmp_path, "row_length: 256", "row_length: long"))
    with pytest.raises(RecipeError, match=r"anneal = 'cosin' must be one of .*did you mean 'cosine'"):
        load_recipe(TINY_RECIPE, ["stages.cpt_main.schedule.anneal=cosin"])


def test_overrides_by_stage_name_and_index() -> None:
    recipe = load_recipe(
        TINY_RECIPE,
        [
            "stages.cpt_main.budget.tokens=1.5e4",
            "stages.0.param_groups.0.lr=0.01",
            "deepspeed.zero_stage=3",
            "stages.cpt_warmup.eval.sources={}",
        ],
    )
    assert recipe.stage("cpt_main").budget.tokens == 15000.0
    assert recipe.stages[0].param_groups[0].lr == 0.01
    assert recipe.deepspeed.zero_stage == 3
    assert recipe.stages[0].eval.sources == {}


def test_mistyped_override_names_the_command_line() -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe(TINY_RECIPE, ["deepspeed.zero_stge=3"])
    assert "command-line overrides" in str(error.value)
    assert "did you mean 'zero_stage'" in str(error.value)


def test_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not a multiple of row_length"):
        load_recipe(TINY_RECIPE, ["stages.cpt_warmup.micro_batch_tokens=300"])
    with pytest.raises(RecipeError, match="exactly one of budget.tokens or budget.steps"):
        load_recipe(TINY_RECIPE, ["stages.cpt_warmup.budget.tokens=100"])
    with pytest.raises(RecipeError, match="unknown data source 'kv_retrival'.*'kv_retrieval'"):
        load_recipe(TINY_RECIPE, ["stages.cpt_warmup.sources={kv_retrival: 1.0}"])
    with pytest.raises(RecipeError, match="no stage named 'sft_lng'.*'sft_long'"):
        load_recipe(TINY_RECIPE).stage("sft_lng")
    with pytest.raises(RecipeError, match="checkpointed_layers=2 needs activations.checkpointing: true"):
        load_recipe(TINY_RECIPE, ["activations.checkpointed_layers=2"])
    with pytest.raises(RecipeError, match="saved_attention_layers=2 needs activations.checkpointing: true"):
        load_recipe(TINY_RECIPE, ["activations.saved_attention_layers=2"])
    with pytest.raises(
        RecipeError, match="saved_attention_layers=2 counts among the activations.checkpointed_layers=1"
    ):
        load_recipe(
            TINY_RECIPE,
            [
                "activations.checkpointing=true",
                "activations.checkpointed_layers=1",
                "activations.saved_attention_layers=2",
            ],
        )
    with pytest.raises(RecipeError, match=r"stages\[1\] \(cpt_main\): chunk_size 0 must be at least 1"):
        load_recipe(TINY_RECIPE, ["stages.cpt_main.chunk_size=0"])


@pytest.mark.parametrize("old_key, new_key", sorted(MOVED_KEYS.items()))
def test_activation_keys_moved_out_of_deepspeed_say_where(tmp_path: Path, old_key: str, new_key: str) -> None:
    value = "true" if old_key.endswith("checkpointing") else "1"
    with pytest.raises(RecipeError, match=f"command-line overrides.*{old_key} moved to {new_key}"):
        load_recipe(TINY_RECIPE, [f"{old_key}={value}"])
    section, key = old_key.split(".")
    text = TINY_RECIPE.read_text().replace(f"{section}:\n", f"{section}:\n  {key}: {value}\n", 1)
    recipe_file = tmp_path / "old_keys.yaml"
    recipe_file.write_text(text)
    with pytest.raises(RecipeError, match=f"{recipe_file}: {old_key} moved to {new_key}"):
        load_recipe(recipe_file)


def test_layer_execution_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:

    import train.trainer

    def kinds(model) -> list[str]:
        return [type(layer).__name__ for layer in model.model.layers]

    compiled = []
    monkeypatch.setattr(train.trainer, "apply_compile", compiled.append)
    model = tiny_msa()
    layers = model.config.num_hidden_layers
    configure_layer_execution(model, load_recipe(TINY_RECIPE))
    assert (set(kinds(model)), compiled) == ({"MSADecoderLayer"}, [])
    recipe = load_recipe(
        TINY_RECIPE,
        [
            "activations.checkpointing=true",
            "activations.checkpointed_layers=2",
            "activations.saved_attention_layers=1",
            "model.compile=true",
        ],
    )
    configure_layer_execution(model, recipe)
    assert kinds(model)[:3] == ["CheckpointedLayer", "CheckpointedLayer", "MSADecoderLayer"] and compiled == [model]
    assert [layer.keep_attention for layer in model.model.layers[:2]] == [True, False]

    model = tiny_msa()
    recipe = load_recipe(
        TINY_RECIPE,
        ["activations.checkpointing=true", "activations.offloaded_layers=1", "activations.offload_prefetch_layers=3"],
    )
    configure_layer_execution(model, recipe)
    assert kinds(model) == ["OffloadedLayer"] + ["CheckpointedLayer"] * (layers - 1)
    assert model.model.layers[0].offload.prefetch_layers == 3

    recipe = load_recipe(
        TINY_RECIPE, ["activations.checkpointing=true", f"activations.checkpointed_layers={layers + 1}"]
    )
    with pytest.raises(ValueError, match=f"checkpointed_layers={layers + 1} .*but the model has {layers} layers"):
        configure_layer_execution(tiny_msa(), recipe)
    recipe = load_recipe(
        TINY_RECIPE,
        [
            "activations.checkpointing=true",
            "activations.offloaded_layers=1",
            f"activations.checkpointed_layers={layers}",
        ],
    )
    with pytest.raises(ValueError, match=f"checkpointed_layers={layers} \\(after 1 offloaded\\)"):
        configure_layer_execution(tiny_msa(), recipe)
    recipe = load_recipe(
        TINY_RECIPE,
        [
            "activations.checkpointing=true",
            f"activations.offloaded_layers={layers - 1}",
            "activations.saved_attention_layers=2",
        ],
    )
    with pytest.raises(ValueError, match="saved_attention_layers=2 but only 1 layers are recomputed"):
        configure_layer_execution(tiny_msa(), recipe)
    with pytest.raises(RecipeError, match="offloaded_layers=-1 .* must be >= 0"):
        load_recipe(TINY_RECIPE, ["activations.offloaded_layers=-1"])


@pytest.mark.integration
def test_launcher_rejects_a_typo_before_any_work(tmp_path: Path) -> None:
    path = recipe_with(tmp_path, "zero_stage: 2", "zero_stages: 2")
    result = run_launcher("pretrain", [f"run.output_dir={tmp_path / 'run'}"], recipe=path)
    assert result.returncode == 2, failure_report(result)
    assert not (tmp_path / "run").exists()


def test_zero_settings_reach_the_deepspeed_config() -> None:
    def zero_block(overrides: list[str]) -> dict:
        recipe = load_recipe(TINY_RECIPE, overrides)
        return deepspeed_config(recipe, recipe.stages[0], 1, 1, 1, on_cpu=True)["zero_optimization"]

    assert zero_block(["deepspeed.zero_stage=2"]) == {"stage": 2}
    assert zero_block(["deepspeed.zero_stage=3"]) == {"stage": 3, "memory_efficient_linear": False}
    assert zero_block(
        [
            "deepspeed.zero_stage=3",
            "deepspeed.zero_config={stage3_max_reuse_distance: 0, stage3_prefetch_bucket_size: 50000000}",
        ]
    ) == {
        "stage": 3,
        "memory_efficient_linear": False,
        "stage3_max_reuse_distance": 0,
        "stage3_prefetch_bucket_size": 5 * 10**7,
    }
    with pytest.raises(RecipeError, match="set the ZeRO stage with deepspeed.zero_stage"):
        load_recipe(TINY_RECIPE, ["deepspeed.zero_config={stage: 3}"])


def test_schedule_warms_up_then_anneals_to_the_final_ratio() -> None:
    cosine = LRMultiplier(total_steps=10, warmup_steps=2, anneal="cosine", final_ratio=0.1)
    assert [cosine(s) for s in (0, 1)] == [0.5, 1.0]
    assert cosine(2) == 1.0 and cosine(10) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.1)
    assert cosine(6) == pytest.approx(0.55)
    linear = LRMultiplier(total_steps=10, warmup_steps=0, anneal="linear", final_ratio=0.0)
    assert linear(5) == pytest.approx(0.5)


def test_batch_geometry_and_token_budget() -> None:
    stage = load_recipe(TINY_RECIPE).stage("cpt_main")
    assert batch_geometry(stage, world_size=1) == (2, 2)
    assert batch_geometry(stage, world_size=2) == (2, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        batch_geometry(stage, world_size=4)
    assert total_steps(stage) == 6


def test_parameter_groups_route_router_weights_and_freeze_the_backbone() -> None:
    from batches import tiny_msa

    model = tiny_msa()
    recipe = load_recipe(TINY_RECIPE, ["stages.cpt_warmup.param_groups.1.frozen=true"])
    groups = parameter_groups(model, recipe.stage("cpt_warmup"))
    assert [g["name"] for g in groups] == ["router"]
    router_names = {n for n, p in model.named_parameters() if any(p is q for q in groups[0]["params"])}
    assert router_names and all(re.search(r"\.router_(q|k)_proj\.", n) for n in router_names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in router_names)
    recipe = load_recipe(TINY_RECIPE, ["stages.cpt_warmup.param_groups=[{name: router, pattern: 'router_'}]"])
    with pytest.raises(ValueError, match="match no param_groups pattern"):
        parameter_groups(model, recipe.stage("cpt_warmup"))
    recipe = load_recipe(
        TINY_RECIPE,
        ["stages.cpt_warmup.param_groups=[{name: all, pattern: '.*'}, {name: router, pattern: 'router_'}]"],
    )
    with pytest.raises(ValueError, match="param group 'router' .* matches no parameter"):
        parameter_groups(model, recipe.stage("cpt_warmup"))
    assert isinstance(groups[0]["params"][0], torch.nn.Parameter)


def test_stage_starts_from_a_backbone_checkpoint_or_an_msa_export(tmp_path: Path) -> None:
    from batches import tiny_msa, tiny_qwen3

    from train.model_setup import load_stage_model

    model_config = load_recipe(TINY_RECIPE, ["model.dtype=float32"]).model
    tiny_qwen3().save_pretrained(tmp_path / "backbone")
    converted = load_stage_model(str(tmp_path / "backbone"), model_config, None, vocab_size=97, seed=0)
    assert type(converted).__name__ == "MSAForCausalLM" and converted.config.top_k_docs == 2
    tiny_msa().save_pretrained(tmp_path / "msa")
    reloaded = load_stage_model("previous", model_config, tmp_path / "msa", vocab_size=97, seed=0)
    assert reloaded.config.chunk_size == 4  # the export's own settings, not the recipe's


def test_random_backbone_is_drawn_on_the_requested_device() -> None:
    from train.model_setup import load_stage_model

    model_config = load_recipe(TINY_RECIPE).model
    on_meta = load_stage_model("backbone", model_config, None, vocab_size=97, seed=0, device=torch.device("meta"))
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    # Naming the CPU draws the same weights as the default path, so CPU runs are unchanged.
    default = load_stage_model("backbone", model_config, None, vocab_size=97, seed=0)
    on_cpu = load_stage_model("backbone", model_config, None, vocab_size=97, seed=0, device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), on_cpu.state_dict().values()))


def test_tokenizer_from_a_path_gets_the_template_tokens(tmp_path: Path) -> None:
    from train.tokenizer import prepare_tokenizer, train_tiny_tokenizer

    train_tiny_tokenizer(["a small corpus of words"] * 10, 300, []).save_pretrained(tmp_path / "base")
    tokenizer = prepare_tokenizer(
        tmp_path / "run_tokenizer", ["<|object_ref_end|>", "<End-of-Retrieve>"], str(tmp_path / "base")
    )
    assert tokenizer.encode("[3]<|object_ref_end|>")[-1] == tokenizer.special_token_ids["<|object_ref_end|>"]
    assert len(tokenizer.encode("<End-of-Retrieve>")) == 1
    assert (tmp_path / "run_tokenizer/tokenizer.json").is_file()


def test_tiny_tokenizer_with_individual_digits_splits_every_number(tmp_path: Path) -> None:
    from train.tokenizer import prepare_tokenizer

    texts = [f"The magic number of item {i} is {(i * 7919) % 10_000_000:07d}." for i in range(400)]
    value = "The magic number of item 5 is 7776424."
    pieces = {}
    for split in (False, True):
        tokenizer = prepare_tokenizer(tmp_path / f"digits_{split}", [], None, texts, 600, tiny_individual_digits=split)
        ids = tokenizer.encode(value)
        assert tokenizer.decode(ids) == value
        pieces[split] = [tokenizer.decode([i]) for i in ids]
    assert pieces[True][-8:] == list("7776424.")
    # Merged, BPE learns digit groups from so many numbers.
    assert any(len(p.strip()) > 1 and p.strip().isdigit() for p in pieces[False])


def test_a_stage_can_set_its_own_activations() -> None:
    """An 8K stage may keep what a 64K stage recomputes: the stage's section wins over the recipe's."""
    recipe = load_recipe(
        TINY_RECIPE,
        [
            "activations.checkpointing=true",
            "stages.sft_short.activations={checkpointing: true, checkpointed_layers: 1}",
        ],
    )
    kinds = {}
    for stage in recipe.stages:
        model = tiny_msa()
        configure_layer_execution(model, recipe, stage)
        kinds[stage.name] = [type(layer).__name__ for layer in model.model.layers]
    layers = len(kinds["sft_short"])
    assert kinds["sft_short"] == ["CheckpointedLayer"] + ["MSADecoderLayer"] * (layers - 1)
    assert kinds["cpt_main"] == ["CheckpointedLayer"] * layers
    with pytest.raises(RecipeError, match="stages.sft_short.activations.checkpointed_layers=1 needs"):
        load_recipe(TINY_RECIPE, ["stages.sft_short.activations={checkpointed_layers: 1}"])
