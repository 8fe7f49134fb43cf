"""CPU smoke run of the MSA model: convert a tiny random Qwen3, train it briefly on a
synthetic key-value memory, report losses and router recall, save and reload it.

    python launch/demo.py [--steps 80] [--output runs/demo]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

import msa_modeling  # noqa: F401  (registers model_type "msa" with the Auto classes)
from msa_modeling import MSAForCausalLM

logger = logging.getLogger("msa_demo")

VOCAB = 256
KEY_TOKENS, VALUE_TOKENS = 3, 2


def key_value_row(generator: torch.Generator, num_docs: int, examples_per_row: int) -> dict[str, torch.Tensor]:
    """One packed row of `examples_per_row` examples, each a memory of `num_docs` key-value
    documents and a question (a key); the answer is that key's value."""
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "doc_ids", "example_ids", "labels", "aux_labels")}

    def add(tokens: torch.Tensor, doc: int, example: int, labelled: bool, positive: bool) -> None:
        columns["input_ids"].append(tokens)
        columns["doc_ids"].append(torch.full_like(tokens, doc))
        columns["example_ids"].append(torch.full_like(tokens, example))
        columns["labels"].append(tokens.clone() if labelled else torch.full_like(tokens, -100))
        columns["aux_labels"].append(torch.full_like(tokens, int(positive)))

    for example in range(examples_per_row):
        keys = torch.randint(10, VOCAB, (num_docs, KEY_TOKENS), generator=generator)
        values = torch.randint(10, VOCAB, (num_docs, VALUE_TOKENS), generator=generator)
        target = int(torch.randint(num_docs, (1,), generator=generator))
        add(torch.tensor([1]), -2, example, False, False)  # shared prefix: a "memory:" marker
        for doc in range(num_docs):
            add(torch.cat([keys[doc], torch.tensor([2]), values[doc]]), doc + 1, example, False, doc == target)
        add(torch.cat([torch.tensor([3]), keys[target], torch.tensor([4])]), 0, example, False, False)
        add(values[target], 0, example, True, False)
    return {name: torch.cat(parts).unsqueeze(0) for name, parts in columns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--docs", type=int, default=24, help="memory documents per example")
    parser.add_argument("--output", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)

    backbone = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
        )
    )
    model = MSAForCausalLM.from_backbone(
        backbone, top_k_docs=2, chunk_size=4, lm_loss_weight=1.0, aux_loss_weight=1.0, router_init="qk"
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    progress = tqdm(range(args.steps), desc="demo")
    for _ in progress:
        batch = key_value_row(generator, args.docs, examples_per_row=2)
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(
            lm=f"{out.lm_loss.item():.3f}", aux=f"{out.aux_loss.item():.3f}", r1=f"{out.router_recall['recall@1'].mean().item():.2f}"
        )
    logger.info("trained %d steps in %.1fs", args.steps, time.time() - start)

    model.eval()
    held_out = [key_value_row(torch.Generator().manual_seed(10_000 + i), args.docs, 2) for i in range(20)]
    with torch.no_grad():
        recall = torch.stack([model(**row).router_recall["recall@1"] for row in held_out]).mean(0)
    logger.info("held-out router recall@1 per router layer: %s (chance %.3f)", [round(r, 3) for r in recall.tolist()], 1 / args.docs)

    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    reloaded = AutoModelForCausalLM.from_pretrained(args.output).eval()
    with torch.no_grad():
        same = torch.equal(model(**held_out[0], return_logits=True).logits, reloaded(**held_out[0], return_logits=True).logits)
    logger.info("saved to %s; reloaded with AutoModelForCausalLM (%s), identical logits: %s", args.output, type(reloaded).__name__, same)
    if not same:
        raise SystemExit("reloaded model disagrees with the trained one")


if __name__ == "__main__":
    main()
