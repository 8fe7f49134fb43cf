"""peft LoRA on an MSA model with `task_type="CAUSAL_LM"`: training with MSA inputs, saving,
reloading with `AutoPeftModelForCausalLM`, merging, and generating."""

from __future__ import annotations

import torch
from batches import random_packed_batch, tiny_msa
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from msa_modeling import MSAForCausalLM

TARGETS = ["q_proj", "v_proj", "router_q_proj", "router_k_proj"]


def test_lora_causal_lm_trains_saves_reloads_and_merges(tmp_path):
    base = tiny_msa(31)
    base.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=TARGETS))
    batch = random_packed_batch(31)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        output = model(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(output.loss))
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(**batch, return_logits=True)
    model.save_pretrained(tmp_path / "adapter")

    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(reloaded, PeftModel) and isinstance(reloaded.get_base_model(), MSAForCausalLM)
    merged = reloaded.merge_and_unload()
    assert type(merged) is MSAForCausalLM
    with torch.no_grad():
        for candidate in (reloaded, merged):
            got = candidate(**batch, return_logits=True)
            torch.testing.assert_close(got.logits, trained.logits, rtol=1e-4, atol=1e-5)
            assert torch.equal(got.selected_docs, trained.selected_docs)
            torch.testing.assert_close(got.doc_scores, trained.doc_scores, rtol=1e-4, atol=1e-5)
    # The adapter changed the model: the base alone predicts otherwise.
    with torch.no_grad():
        plain = tiny_msa(31)(**batch, return_logits=True)
    assert not torch.allclose(plain.logits, trained.logits, atol=1e-3)

    ids = batch["input_ids"][:1, :6]
    generated = reloaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert generated.tolist() == merged.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None).tolist()
