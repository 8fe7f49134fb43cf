"""Every backbone family on a tiny random config: empty-memory equivalence with the Hugging Face
backbone, fast path against the loop-by-loop reference, save/load, a DeepSpeed step on CPU,
and the features MSA rejects (binding sliding windows, soft-capping on kernels without it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from batches import FAMILIES, VOCAB, random_packed_batch, tiny_backbone, tiny_msa
from reference_parity import compare
from train_runs import free_port
from transformers import AutoModelForCausalLM

from msa_modeling import MSAForCausalLM
from msa_modeling.attention import SDPABackend, VarlenBackend

TESTS = Path(__file__).parent


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_memory_matches_backbone(family):
    backbone = tiny_backbone(family, 4)
    model = MSAForCausalLM.from_backbone(backbone, query_position_offset=0, top_k_docs=2, chunk_size=4).eval()
    input_ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone(input_ids).logits
        got = model(input_ids).logits
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen3"])  # Qwen3: test_against_reference.py
def test_fast_path_matches_reference(family):
    model = tiny_msa(1, family=family, top_k_docs=2, chunk_size=3).train()
    fast = compare(model, random_packed_batch(1))
    assert not fast.selected_docs.all()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_gives_identical_logits(family, tmp_path):
    model = tiny_msa(2, family=family)
    batch = random_packed_batch(2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MSAForCausalLM and loaded.config.backbone_model_type == family
    with torch.no_grad():
        expected = model(**batch, return_logits=True).logits
        got = loaded(**batch, return_logits=True).logits
    assert torch.equal(got, expected)


_DEEPSPEED_STEP = """
import json, sys
import deepspeed, torch
sys.path.insert(0, sys.argv[1])
from batches import FAMILIES, random_packed_batch, tiny_msa

deepspeed.init_distributed(dist_backend="gloo")
config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
}
results = {}
for family in FAMILIES:
    model = tiny_msa(3, family=family).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = engine(**random_packed_batch(3)).loss
    engine.backward(loss)
    engine.step()
    moved = sum(not torch.equal(before[n], p.detach()) for n, p in engine.module.named_parameters())
    results[family] = {"loss": float(loss), "moved": moved, "total": len(before)}
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.integration
def test_deepspeed_zero2_step_on_cpu_for_every_family():
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_STEP, str(TESTS)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    results = json.loads(lines[-1].removeprefix("RESULTS "))
    assert sorted(results) == sorted(FAMILIES)
    for family, result in results.items():
        assert torch.isfinite(torch.tensor(result["loss"])), family
        # Every parameter got a gradient and an Adam step (router layers included).
        assert result["moved"] == result["total"], (family, result)


# ---------------------------------------------------------------- what MSA rejects


def test_document_longer_than_a_sliding_window_is_rejected():
    model = tiny_msa(5, family="mistral", backbone_overrides=dict(sliding_window=6))
    batch = random_packed_batch(5, doc_length=(7, 9))
    with pytest.raises(ValueError, match="sliding window of layer 0"):
        model(**batch)


def test_query_context_longer_than_a_sliding_window_is_rejected_only_where_it_binds():
    # Window 12: every segment fits, and so does [prefix ; query] (at most 3 + 8 tokens), but
    # the chunks of two 10-token documents (3 each at P=4) push router layers past it.
    batch = random_packed_batch(
        6,
        docs_per_example=(3, 3),
        doc_length=(10, 10),
        prefix_length=(3, 3),
        prompt_length=(3, 3),
        answer_length=(3, 3),
    )
    with torch.no_grad():
        tiny_msa(6, family="gemma3_text", backbone_overrides=dict(sliding_window=12), router_layers=[1, 3])(**batch)
        with pytest.raises(ValueError, match="sliding window of layer 2"):
            tiny_msa(6, family="gemma3_text", backbone_overrides=dict(sliding_window=12), router_layers=[2, 3])(**batch)


def test_softcap_is_rejected_by_a_kernel_without_it_and_applied_by_sdpa():
    model = tiny_msa(7, family="gemma2")
    batch = random_packed_batch(7)
    model.model._attention_backends = {"cpu": VarlenBackend("varlen", kernel=None)}
    with pytest.raises(ValueError, match="soft-capping"):
        model(**batch)
    # The soft-cap binds on this tiny config, so leaving it out would change the logits.
    model.model._attention_backends = {"cpu": SDPABackend()}
    with torch.no_grad():
        capped = model(**batch, return_logits=True).logits
        for layer in model.model.layers:
            layer.self_attn.softcap = None
        uncapped = model(**batch, return_logits=True).logits
    assert not torch.allclose(capped, uncapped, atol=1e-3)


def test_bidirectional_gemma_is_rejected():
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        MSAForCausalLM.from_backbone(tiny_backbone("gemma3_text", 0, use_bidirectional_attention=True))


def test_unknown_backbone_family_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="no MSA adapter for backbone model_type 'gpt2'"):
        MSAForCausalLM.from_backbone(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)))
