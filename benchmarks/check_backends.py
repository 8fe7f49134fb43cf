"""Check every MSA attention backend on the GPU against the CPU fp32 path.

    python eval/check_backends.py [--seeds 3]

The CPU fp32 path (masked SDPA) is itself tested against the loop-by-loop reference in
`tests/`. Each GPU backend runs the same model and batch in bf16; we report the relative
error ||gpu - cpu|| / ||cpu|| of logits, losses and every parameter gradient (the worst
single parameter and all of them together), and whether the document selection agrees.
bf16 operands land between 1e-3 and 1e-2.

Some inputs are ill-conditioned in bf16 whatever the kernel: a gradient that sums many
cancelling terms can be 30% off in bf16 on the CPU too. So each seed also runs the CPU SDPA
path in bf16 (`cpu_bf16`), and a GPU backend passes a quantity when its error is under
`--tolerance` or at most `--floor-ratio` times that CPU bf16 error: the backend then adds
nothing that bf16 arithmetic itself does not. Likewise its document selection must equal the
fp32 one, or the CPU bf16 run's where bf16 rounding flips a near-tie between documents.

The `packed` case holds two rows of three examples each, the last row padded, as the trainer
packs them; the last case is a row without any document (no memory, no aux loss), which takes
the backends' no-memory path.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from benchmarks.bench_train import random_memory_row
from msa_modeling import MSAForCausalLM
from msa_modeling.attention import torch_varlen_available


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float().cpu() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def run(model: MSAForCausalLM, batch: dict, device: str):
    model.zero_grad(set_to_none=True)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "doc_lengths"}
    out = model(**inputs, return_logits=True)
    (out.lm_loss if out.aux_loss is None else out.lm_loss + out.aux_loss).backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def memoryless_row(row_length: int, generator: torch.Generator, vocab_size: int, prefix_length: int = 32,
                   answer_length: int = 32) -> dict[str, torch.Tensor]:
    """A row of prefix and question only: no document, so no routing and no memory."""
    doc_ids = torch.tensor([-2] * prefix_length + [0] * (row_length - prefix_length))
    input_ids = torch.randint(0, vocab_size, (row_length,), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[-answer_length:] = input_ids[-answer_length:]
    return {"input_ids": input_ids[None], "doc_ids": doc_ids[None], "labels": labels[None],
            "aux_labels": torch.zeros_like(doc_ids)[None]}


def packed_rows(row_length: int, generator: torch.Generator, vocab_size: int, examples: int = 3,
                padding: int = 100) -> dict[str, torch.Tensor]:
    """Two rows of `examples` examples each (`example_ids` set); the second row ends in padding."""
    rows = []
    for row in range(2):
        tail = padding if row == 1 else 0
        lengths = [(row_length - tail) // examples] * examples
        lengths[-1] += row_length - tail - sum(lengths)
        parts = [random_memory_row(n, generator, doc_length=(30, 400), vocab_size=vocab_size, prefix_length=8 * e,
                                   prompt_length=24, answer_length=16) for e, n in enumerate(lengths)]
        columns = {key: torch.cat([part[key][0] for part in parts]) for key in ("input_ids", "doc_ids", "labels", "aux_labels")}
        columns["example_ids"] = torch.cat([torch.full((n,), e) for e, n in enumerate(lengths)])
        pad = {"input_ids": 0, "doc_ids": -1, "labels": -100, "aux_labels": 0, "example_ids": -1}
        rows.append({key: torch.cat([value, value.new_full((tail,), pad[key])]) for key, value in columns.items()})
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


QUANTITIES = ("logits", "lm_loss", "aux_loss", "doc_scores", "grads")


def compare(seed: int, backend: str, got, grads: dict, expected, expected_grads: dict) -> dict:
    """Relative errors of one run against the fp32 CPU reference (absent quantities are 0)."""
    maybe = lambda a, b: 0.0 if b is None else relative_error(a, b)  # noqa: E731
    worst_name = max(grads, key=lambda n: relative_error(grads[n], expected_grads[n]))
    same = expected.selected_docs is None or bool(torch.equal(got.selected_docs.cpu(), expected.selected_docs))
    return {
        "seed": seed,
        "backend": backend,
        "logits": relative_error(got.logits, expected.logits),
        "lm_loss": relative_error(got.lm_loss, expected.lm_loss),
        "aux_loss": maybe(got.aux_loss, expected.aux_loss),
        "doc_scores": maybe(got.doc_scores, expected.doc_scores),
        "grads": relative_error(torch.cat([g.flatten() for g in grads.values()]),
                                torch.cat([expected_grads[n].flatten() for n in grads])),
        "worst_grad": relative_error(grads[worst_name], expected_grads[worst_name]),
        "worst_grad_param": worst_name,
        "same_selection": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--row-length", type=int, default=3000)
    parser.add_argument("--tolerance", type=float, default=2e-2)
    parser.add_argument("--floor-ratio", type=float, default=1.25,
                        help="a quantity also passes within this factor of the CPU bf16 run's error")
    parser.add_argument("--out", default="check_backends.json")
    parser.add_argument("--backends", nargs="+", help="GPU backends to check (default: every one available)")
    args = parser.parse_args()
    backends = ["sdpa", "flex"] + (["varlen"] if torch_varlen_available() else [])
    backends += ["flash_attn"] if importlib.util.find_spec("flash_attn") else []
    backends = args.backends or backends

    rows, failures = [], 0
    cases = [(seed, "memory") for seed in range(args.seeds)] + [(args.seeds, "packed"), (args.seeds + 1, "no memory")]
    for seed, case in cases:
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
        generator = torch.Generator().manual_seed(seed)
        if case == "memory":
            batch = random_memory_row(args.row_length, generator, doc_length=(30, 400), vocab_size=1024)
        elif case == "packed":
            batch = packed_rows(args.row_length, generator, vocab_size=1024)
        else:
            batch = memoryless_row(args.row_length, generator, vocab_size=1024)
        expected, expected_grads = run(reference_model, batch, "cpu")
        bf16, bf16_grads = run(copy.deepcopy(reference_model).to(torch.bfloat16), batch, "cpu")
        floor = compare(seed, "cpu_bf16", bf16, bf16_grads, expected, expected_grads)
        floor.update(case=case, **{"pass": None})
        rows.append(floor)
        for backend in backends:
            model = copy.deepcopy(reference_model).to("cuda", torch.bfloat16)
            model.config.attn_backend = backend
            model.model._attention_backends = {}
            try:
                got, grads = run(model, batch, "cuda")
                row = compare(seed, backend, got, grads, expected, expected_grads)
                # Where bf16 itself flips a near-tie in routing, agreeing with the CPU bf16 run is enough.
                row["same_selection_as_cpu_bf16"] = bf16.selected_docs is None or bool(
                    torch.equal(got.selected_docs.cpu(), bf16.selected_docs)
                )
            except Exception as error:  # noqa: BLE001 - report the backend and go on
                rows.append({"seed": seed, "case": case, "backend": backend, "error": f"{type(error).__name__}: {error}"[:300]})
                failures += 1
                continue
            # NaN fails every comparison, so it can never pass.
            row["pass"] = (row["same_selection"] or row["same_selection_as_cpu_bf16"]) and all(
                row[k] < args.tolerance or row[k] <= args.floor_ratio * floor[k] for k in QUANTITIES
            )
            row["case"] = case
            failures += not row["pass"]
            rows.append(row)

    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tolerance": args.tolerance,
                   "floor_ratio": args.floor_ratio, "rows": rows}, f, indent=2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; relative error against fp32 on the CPU")
    print(f"{'seed':>4} {'case':<10}{'backend':<11}{'logits':>9}{'lm':>9}{'aux':>9}{'scores':>9}{'grads':>9}{'worst':>9}"
          "  sel  pass  (worst: per-parameter)")

    def selection(r: dict) -> str:
        """ok: the fp32 selection; bf16: the CPU bf16 run's, where bf16 flips a near-tie; DIFF: neither."""
        return "ok" if r["same_selection"] else "bf16" if r.get("same_selection_as_cpu_bf16") else "DIFF"

    for r in rows:
        if "error" in r:
            print(f"{r['seed']:>4} {r['case']:<10}{r['backend']:<11}ERROR {r['error']}")
            continue
        verdict = "-" if r["pass"] is None else str(r["pass"])
        print(
            f"{r['seed']:>4} {r['case']:<10}{r['backend']:<11}{r['logits']:>9.2e}{r['lm_loss']:>9.2e}{r['aux_loss']:>9.2e}"
            f"{r['doc_scores']:>9.2e}{r['grads']:>9.2e}{r['worst_grad']:>9.2e}  {selection(r)}"
            f"  {verdict:<5} {r['worst_grad_param']}"
        )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
