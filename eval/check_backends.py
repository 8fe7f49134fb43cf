"""Check every MSA attention backend on the GPU against the CPU fp32 path.

    python eval/check_backends.py [--seeds 3]

The CPU fp32 path (masked SDPA) is itself tested against the loop-by-loop reference in
`tests/`. Each GPU backend runs the same model and batch in bf16; we report the relative
error ||gpu - cpu|| / ||cpu|| of logits, losses and every parameter gradient (the
worst single parameter and all of them together), and whether the document selection agrees. bf16 operands land between 1e-3
and 1e-2; the check fails above `--tolerance`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys

import torch
from bench_train import random_memory_row
from transformers import Qwen3Config, Qwen3ForCausalLM

from msa_modeling import MSAForCausalLM
from msa_modeling.attention import torch_varlen_available


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float().cpu() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def run(model: MSAForCausalLM, batch: dict, device: str):
    model.zero_grad(set_to_none=True)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "doc_lengths"}
    out = model(**inputs, return_logits=True)
    (out.lm_loss + out.aux_loss).backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--row-length", type=int, default=3000)
    parser.add_argument("--tolerance", type=float, default=2e-2)
    parser.add_argument("--out", default="check_backends.json")
    args = parser.parse_args()
    backends = ["sdpa", "flex"] + (["varlen"] if torch_varlen_available() else [])
    backends += ["flash_attn"] if importlib.util.find_spec("flash_attn") else []

    rows, failures = [], 0
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        backbone = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
            )
        )
        # Round the weights to bf16 first, so that the comparison measures arithmetic, not weight rounding.
        reference_model = MSAForCausalLM.from_backbone(backbone, top_k_docs=4, chunk_size=64, attn_backend="sdpa")
        reference_model = reference_model.to(torch.bfloat16).float().train()
        batch = random_memory_row(args.row_length, torch.Generator().manual_seed(seed), doc_length=(30, 400), vocab_size=1024)
        expected, expected_grads = run(reference_model, batch, "cpu")
        for backend in backends:
            model = copy.deepcopy(reference_model).to("cuda", torch.bfloat16)
            model.config.attn_backend = backend
            model.model._attention_backends = {}
            try:
                got, grads = run(model, batch, "cuda")
            except Exception as error:  # noqa: BLE001 - report the backend and go on
                rows.append({"seed": seed, "backend": backend, "error": f"{type(error).__name__}: {error}"[:300]})
                failures += 1
                continue
            worst_name = max(grads, key=lambda n: relative_error(grads[n], expected_grads[n]))
            all_grads = relative_error(torch.cat([g.flatten() for g in grads.values()]), torch.cat([expected_grads[n].flatten() for n in grads]))
            row = {
                "seed": seed,
                "backend": backend,
                "logits": relative_error(got.logits, expected.logits),
                "lm_loss": relative_error(got.lm_loss, expected.lm_loss),
                "aux_loss": relative_error(got.aux_loss, expected.aux_loss),
                "doc_scores": relative_error(got.doc_scores, expected.doc_scores),
                "grads": all_grads,
                "worst_grad": relative_error(grads[worst_name], expected_grads[worst_name]),
                "worst_grad_param": worst_name,
                "same_selection": bool(torch.equal(got.selected_docs.cpu(), expected.selected_docs)),
            }
            # NaN fails every comparison, so it can never pass.
            row["pass"] = row["same_selection"] and all(row[k] < args.tolerance for k in ("logits", "lm_loss", "aux_loss", "doc_scores", "grads"))
            failures += not row["pass"]
            rows.append(row)

    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; relative error of bf16 GPU vs fp32 CPU")
    print(f"{'seed':>4} {'backend':<11}{'logits':>9}{'lm':>9}{'aux':>9}{'scores':>9}{'grads':>9}{'worst':>9}  sel  pass  (worst: per-parameter)")
    for r in rows:
        if "error" in r:
            print(f"{r['seed']:>4} {r['backend']:<11}ERROR {r['error']}")
            continue
        print(
            f"{r['seed']:>4} {r['backend']:<11}{r['logits']:>9.2e}{r['lm_loss']:>9.2e}{r['aux_loss']:>9.2e}"
            f"{r['doc_scores']:>9.2e}{r['grads']:>9.2e}{r['worst_grad']:>9.2e}  {'ok' if r['same_selection'] else 'DIFF'}  {r['pass']}  {r['worst_grad_param']}"
        )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
