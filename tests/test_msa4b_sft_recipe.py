"""recipes/msa4b_sft.yaml end to end on a tiny model in the released MSA-4B layout: convert the
released folder to ours, run the recipe's SFT stages through the launcher, export, convert back,
and load the result both ways (docs/RELEASED_MSA4B.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from batches import tiny_msa
from safetensors.torch import load_file
from train_runs import REPO, failure_report, run_launcher
from transformers import AutoModelForCausalLM

from data.loader import PackedRowLoader
from data.tokenization import load_tokenizer
from msa_modeling import MSAConfig
from msa_modeling.convert_reference import main as convert
from msa_modeling.inference import reference_protocol as rp
from train.tokenizer import train_tiny_tokenizer

pytestmark = pytest.mark.integration

RECIPE = REPO / "recipes" / "msa4b_sft.yaml"
STAGES = ("sft_short", "sft_long")
TOP_K = 2
CITIES = ["Paris", "Berlin", "Rome", "Madrid", "Vienna", "Oslo", "Lisbon", "Prague"]
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Austria", "Norway", "Portugal", "Czechia"]
# The engine's marker strings, each a single token of the released tokenizer.
SPECIAL_STRINGS = ["<|im_start|>", "<|im_end|>", rp.DELIMITER, rp.END_OF_RETRIEVAL]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_data(folder: Path) -> dict[str, Path]:
    """A corpus of city facts, QA records over one document each, and two-hop interleave records."""
    folder.mkdir()
    corpus = [
        {"_id": f"c{i}", "text": f"{city} is the capital of {country}."}
        for i, (city, country) in enumerate(zip(CITIES, COUNTRIES))
    ]
    corpus += [{"_id": f"p{i}", "text": f"Ana lives in {city}."} for i, city in enumerate(CITIES[:4])]
    qa = [
        {
            "query": f"Which country has {city} as its capital?",
            "positives": [f"c{i}"],
            "negatives": [f"c{(i + 1) % len(CITIES)}"],
            "answer": country,
        }
        for i, (city, country) in enumerate(zip(CITIES, COUNTRIES))
    ]
    interleave = [
        {
            "query": "In which country does Ana live?",
            "hops": [[f"p{i}"], [f"c{i}"]],
            "negatives": [f"c{(i + 2) % len(CITIES)}"],
            "answer": COUNTRIES[i],
        }
        for i in range(4)
    ]
    return {
        "corpus": write_jsonl(folder / "corpus.jsonl", corpus),
        "qa": write_jsonl(folder / "qa_records.jsonl", qa),
        "interleave": write_jsonl(folder / "interleave_records.jsonl", interleave),
    }


def released_checkpoint(folder: Path, texts: list[str]) -> Path:
    """A tiny random Qwen3-shaped MSA model with its tokenizer, written in the released layout
    (scaled dot-product routing and the question at 3 + k, as the released model is served)."""
    # The protocol's fixed wording is in the training text, so that it takes few tokens, as in the released tokenizer.
    wording = [rp.QUESTION_FORMAT, rp.AFTER_RETRIEVAL_FORMAT, rp.ANSWER_FORMAT, "user"]
    tokenizer = train_tiny_tokenizer([*texts, *wording] * 20, 320, SPECIAL_STRINGS)
    model = tiny_msa(
        0,
        backbone_overrides={"vocab_size": len(tokenizer)},
        top_k_docs=TOP_K,
        query_position_offset=TOP_K,
        routing_tokens="prompt",
        routing_score="scaled_dot",
    )
    ours = folder / "tiny-ours"
    model.save_pretrained(ours)
    tokenizer.save_pretrained(str(ours))
    convert(["--to", "reference", str(ours), str(folder / "tiny-released")])
    return folder / "tiny-released"


def test_the_msa4b_recipe_fine_tunes_a_released_layout_model_and_converts_back(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    texts = [json.loads(line)["text"] for line in data["corpus"].read_text().splitlines()]
    texts += [json.loads(line)["query"] for line in data["qa"].read_text().splitlines()]
    released = released_checkpoint(tmp_path, texts)
    # As the user gets it: no msa_train block (that is how our own checkpoints travel).
    config = json.loads((released / "config.json").read_text())
    del config["msa_train"]
    (released / "config.json").write_text(json.dumps(config))

    converted = tmp_path / "MSA-4B-ours"
    convert(["--to", "ours", str(released), str(converted)])
    run_dir = tmp_path / "run"
    memory = "{memory_tokens: 96, max_memory_docs: 8}"
    overrides = [
        f"run.output_dir={run_dir}",
        f"tokenizer.path={converted}",
        "model.dtype=float32",  # CPU
        "activations.checkpointing=false",
        "tracking.progress_bar=false",
        "tracking.log_every_steps=1",
        "checkpoint.save_final=false",
        f"data.sources.qa.source.path={data['qa']}",
        f"data.sources.qa.source.corpus_path={data['corpus']}",
        f"data.sources.interleave.source.path={data['interleave']}",
        f"data.sources.interleave.source.corpus_path={data['corpus']}",
        f"data.sources.qa.memory={memory}",
        f"data.sources.interleave.memory={memory}",
        "data.sources.qa.max_example_tokens=512",
        "data.sources.interleave.max_example_tokens=512",
        f"stages.sft_short.init_from={converted}",
    ]
    for stage in STAGES:
        overrides += [
            f"stages.{stage}.row_length=512",
            f"stages.{stage}.micro_batch_tokens=512",
            f"stages.{stage}.global_batch_tokens=512",
            f"stages.{stage}.budget.steps=2",
            f"stages.{stage}.checkpoint_every_steps=2",
            f"stages.{stage}.schedule.warmup_steps=0",
            f"stages.{stage}.optimizer.lr=1.0e-3",
        ]
    result = run_launcher("sft", overrides, recipe=RECIPE)  # as documented: launch/sft.py
    assert result.returncode == 0, failure_report(result)

    # The samples are the engine's prompts: its 3-token prefix and 0-based documents in their own turns.
    row = PackedRowLoader(run_dir / "data" / "qa", 512, seed=0).next_row()
    decode = load_tokenizer(converted).decode
    first_example = row["example_ids"] == 0
    assert decode(row["input_ids"][(row["doc_ids"] == -2) & first_example].tolist()) == rp.PREFIX
    first_doc = row["input_ids"][(row["doc_ids"] == 1) & first_example].tolist()
    assert decode(first_doc).startswith(rp.DOC_ID_FORMAT.format(i=0)) and decode(first_doc).endswith(rp.DOC_SUFFIX)

    export = run_dir / "stages" / "sft_long" / "export"
    start, finish = load_file(converted / "model.safetensors"), load_file(export / "model.safetensors")
    assert start.keys() == finish.keys()
    assert any(not torch.equal(start[name], finish[name]) for name in start), "SFT changed no weight"
    # The run's tokenizer is the converted folder's: the same ids for the engine's strings.
    run_tokenizer, model_tokenizer = load_tokenizer(export), load_tokenizer(converted)
    assert run_tokenizer.vocab_size == model_tokenizer.vocab_size
    probe = rp.PREFIX + rp.DOC_ID_FORMAT.format(i=0) + "Paris" + rp.DOC_SUFFIX + rp.END_OF_RETRIEVAL
    assert run_tokenizer.encode(probe) == model_tokenizer.encode(probe)

    back = tmp_path / "MSA-4B-sft"
    convert(["--to", "reference", str(export), str(back)])
    written = json.loads((back / "config.json").read_text())
    assert written["model_type"] == "msa" and written["architectures"] == ["MSAForCausalLM"]
    assert written["msa_config"] == config["msa_config"] | {"doc_top_k": TOP_K}
    assert written["rope_theta"] == config["rope_theta"] and written["torch_dtype"] == "float32"
    assert "msa_train" not in written  # it goes back as the released model came
    released_tensors, final_tensors = load_file(released / "model.safetensors"), load_file(back / "model.safetensors")
    assert released_tensors.keys() == final_tensors.keys()
    assert {name: t.shape for name, t in released_tensors.items()} == {n: t.shape for n, t in final_tensors.items()}
    tokenizer_config = json.loads((back / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "Qwen2TokenizerFast"

    # The final folder reads into our code again, as the converted released model did.
    convert(["--to", "ours", str(back), str(tmp_path / "reloaded")])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "reloaded")
    assert reloaded.config.routing_score == "scaled_dot"
    assert reloaded.config.top_k_docs == reloaded.config.query_position_offset == TOP_K
    assert MSAConfig.from_pretrained(tmp_path / "reloaded").reference_msa_config
    for name, tensor in load_file(export / "model.safetensors").items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
