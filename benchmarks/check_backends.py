"""Check every MSA attention backend on the GPU.

    python -m benchmarks.check_backends [--seeds 3] [--plant-scale-error 0.05 --plant-backend varlen]

Two checks per case, each with a meaningful reference:
- fp32: `sdpa` and `flex` run the model in fp32 on the GPU (TF32 off) and must match the CPU fp32
  path (masked SDPA, itself tested against the loop-by-loop reference in `tests/`) within
  `--fp32-tolerance` (relative error of logits, losses, document scores and all gradients), with
  the same document selection. Only summation order differs, so the errors are ~1e-6.
- bf16: every kernel (`sdpa`, `flex`, `varlen`, `flash_attn` where installed) runs the same model in
  bf16 on the same card. Its error against the GPU fp32 run must stay under `--tolerance` or within
  `--floor-ratio` times the error of the same model's `sdpa` in bf16: a kernel may lose what bf16
  arithmetic loses, nothing more. (A gradient that sums many cancelling terms is ill-conditioned in
  bf16 whatever the kernel: 0.09 off for `sdpa` in the packed case.) The document selection must
  equal the fp32 one or, where bf16 flips a near-tie, the bf16 `sdpa` one.

`--plant-scale-error E --plant-backend B` multiplies backend B's softmax scale by (1 + E): a planted
bug that the check must report (exit code 1).

Cases: rows of one example with a memory (`--seeds` of them); `packed`, two rows of three examples
each, the last row padded, as the trainer packs them; `no memory`, a row without any document,
which takes the backends' no-memory path.
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


def memoryless_row(
    row_length: int, generator: torch.Generator, vocab_size: int, prefix_length: int = 32, answer_length: int = 32
) -> dict[str, torch.Tensor]:
    """A row of prefix and question only: no document, so no routing and no memory."""
    doc_ids = torch.tensor([-2] * prefix_length + [0] * (row_length - prefix_length))
    input_ids = torch.randint(0, vocab_size, (row_length,), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[-answer_length:] = input_ids[-answer_length:]
    return {
        "input_ids": input_ids[None],
        "doc_ids": doc_ids[None],
        "labels": labels[None],
        "aux_labels": torch.zeros_like(doc_ids)[None],
    }


def packed_rows(
    row_length: int, generator: torch.Generator, vocab_size: int, examples: int = 3, padding: int = 100
) -> dict[str, torch.Tensor]:
    """Two rows of `examples` examples each (`example_ids` set); the second row ends in padding."""
    rows = []
    for row in range(2):
        tail = padding if row == 1 else 0
        lengths = [(row_length - tail) // examples] * examples
        lengths[-1] += row_length - tail - sum(lengths)
        parts = [
            random_memory_row(
                n,
                generator,
                doc_length=(30, 400),
                vocab_size=vocab_size,
                prefix_length=8 * e,
                prompt_length=24,
                answer_length=16,
            )
            for e, n in enumerate(lengths)
        ]
        columns = {
            key: torch.cat([part[key][0] for part in parts]) for key in ("input_ids", "doc_ids", "labels", "aux_labels")
        }
        columns["example_ids"] = torch.cat([torch.full((n,), e) for e, n in enumerate(lengths)])
        pad = {"input_ids": 0, "doc_ids": -1, "labels": -100, "aux_labels": 0, "example_ids": -1}
        rows.append({key: torch.cat([value, value.new_full((tail,), pad[key])]) for key, value in columns.items()})
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


QUANTITIES = ("logits", "lm_loss", "aux_loss", "doc_scores", "grads")


def compare(seed: int, backend: str, got, grads: dict, expected, expected_grads: dict) -> dict:
    """Relative errors of one run against a reference run (absent quantities are 0)."""
    maybe = lambda a, b: 0.0 if b is None else relative_error(a, b)  # noqa: E731
    worst_name = max(grads, key=lambda n: relative_error(grads[n], expected_grads[n]))
    same = expected.selected_docs is None or bool(torch.equal(got.selected_docs.cpu(), expected.selected_docs.cpu()))
    return {
        "seed": seed,
        "backend": backend,
        "logits": relative_error(got.logits, expected.logits.float().cpu()),
        "lm_loss": relative_error(got.lm_loss, expected.lm_loss.float().cpu()),
        "aux_loss": maybe(got.aux_loss, None if expected.aux_loss is None else expected.aux_loss.float().cpu()),
        "doc_scores": maybe(got.doc_scores, None if expected.doc_scores is None else expected.doc_scores.float().cpu()),
        "grads": relative_error(
            torch.cat([g.flatten() for g in grads.values()]), torch.cat([expected_grads[n].flatten() for n in grads])
        ),
        "worst_grad": relative_error(grads[worst_name], expected_grads[worst_name]),
        "worst_grad_param": worst_name,
        "same_selection": same,
    }


def model_on(reference_model: MSAForCausalLM, backend: str, dtype: torch.dtype, plant: tuple[str, float] | None):
    """A copy of the model on the GPU in `dtype` with `backend`, its softmax scale off by the planted error."""
    model = copy.deepcopy(reference_model).to("cuda", dtype)
    model.config.attn_backend = backend
    model.model._attention_backends = {}
    if plant is not None and plant[0] == backend:
        chosen = model.model.attention_backend(torch.device("cuda"))
        attend = chosen.attend
        chosen.attend = lambda q, k, v, layout, plan, scale, *rest, **kw: attend(
            q, k, v, layout, plan, scale * (1 + plant[1]), *rest, **kw
        )
    return model


def make_batch(case: str, seed: int, row_length: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if case == "memory":
        return random_memory_row(row_length, generator, doc_length=(30, 400), vocab_size=1024)
    if case == "packed":
        return packed_rows(row_length, generator, vocab_size=1024)
    return memoryless_row(row_length, generator, vocab_size=1024)


def error_row(seed: int, case: str, check: str, backend: str, error: Exception) -> dict:
    """A failing row for a backend that raised: reported, and the other backends still run."""
    return {
        "seed": seed,
        "case": case,
        "check": check,
        "backend": backend,
        "pass": False,
        "error": f"{type(error).__name__}: {error}"[:300],
    }


def check_case(
    seed: int, case: str, args: argparse.Namespace, backends: list[str], plant: tuple[str, float] | None
) -> list[dict]:
    torch.manual_seed(seed)
    backbone = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            tie_word_embeddings=True,
        )
    )
    # Round the weights to bf16 first, so that the comparisons measure arithmetic, not weight rounding.
    reference_model = MSAForCausalLM.from_backbone(backbone, top_k_docs=4, chunk_size=64, attn_backend="sdpa")
    reference_model = reference_model.to(torch.bfloat16).float().train()
    batch = make_batch(case, seed, args.row_length)
    rows = []

    def record(row: dict, check: str, passed: bool) -> None:
        row.update(case=case, check=check, **{"pass": passed})
        rows.append(row)

    expected, expected_grads = run(reference_model, batch, "cpu")
    for backend in ("sdpa", "flex"):
        try:
            got, grads = run(model_on(reference_model, backend, torch.float32, plant), batch, "cuda")
        except Exception as error:  # noqa: BLE001 - report the backend and go on
            rows.append(error_row(seed, case, "fp32", backend, error))
            continue
        row = compare(seed, backend, got, grads, expected, expected_grads)
        record(row, "fp32", row["same_selection"] and all(row[k] < args.fp32_tolerance for k in QUANTITIES))
    # The bf16 reference: fp32 sdpa on this card, never planted (the fp32 check above judges it).
    gpu_fp32, gpu_fp32_grads = run(model_on(reference_model, "sdpa", torch.float32, None), batch, "cuda")
    floor_run, floor_grads = run(model_on(reference_model, "sdpa", torch.bfloat16, None), batch, "cuda")
    floor = compare(seed, "sdpa_bf16_floor", floor_run, floor_grads, gpu_fp32, gpu_fp32_grads)
    record(floor, "bf16 floor", None)
    for backend in backends:
        try:
            got, grads = run(model_on(reference_model, backend, torch.bfloat16, plant), batch, "cuda")
        except Exception as error:  # noqa: BLE001
            rows.append(error_row(seed, case, "bf16", backend, error))
            continue
        row = compare(seed, backend, got, grads, gpu_fp32, gpu_fp32_grads)
        row["same_selection_as_sdpa_bf16"] = floor_run.selected_docs is None or bool(
            torch.equal(got.selected_docs.cpu(), floor_run.selected_docs.cpu())
        )
        # NaN fails every comparison, so it can never pass.
        record(
            row,
            "bf16",
            (row["same_selection"] or row["same_selection_as_sdpa_bf16"])
            and all(row[k] < args.tolerance or row[k] <= args.floor_ratio * floor[k] for k in QUANTITIES),
        )
    return rows


def print_rows(rows: list[dict]) -> None:
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; fp32 rows against the CPU fp32 path, "
        "bf16 rows against the GPU fp32 sdpa run"
    )
    print(
        f"{'seed':>4} {'case':<10}{'check':<11}{'backend':<16}{'logits':>9}{'lm':>9}{'aux':>9}{'scores':>9}"
        f"{'grads':>9}{'worst':>9}  sel  pass"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['seed']:>4} {r['case']:<10}{r['check']:<11}{r['backend']:<16}ERROR {r['error']}")
            continue
        selection = "ok" if r["same_selection"] else "bf16" if r.get("same_selection_as_sdpa_bf16") else "DIFF"
        verdict = "-" if r["pass"] is None else str(r["pass"])
        print(
            f"{r['seed']:>4} {r['case']:<10}{r['check']:<11}{r['backend']:<16}{r['logits']:>9.2e}{r['lm_loss']:>9.2e}"
            f"{r['aux_loss']:>9.2e}{r['doc_scores']:>9.2e}{r['grads']:>9.2e}{r['worst_grad']:>9.2e}  "
            f"{selection:<4} {verdict}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--row-length", type=int, default=3000)
    parser.add_argument("--fp32-tolerance", type=float, default=1e-4)
    parser.add_argument("--tolerance", type=float, default=2e-2)
    parser.add_argument(
        "--floor-ratio",
        type=float,
        default=1.5,
        help="a bf16 quantity also passes within this factor of the bf16 sdpa run's error",
    )
    parser.add_argument("--plant-backend", help="the backend that gets the planted scale error")
    parser.add_argument("--plant-scale-error", type=float, default=0.0)
    parser.add_argument("--out", default="check_backends.json")
    parser.add_argument("--backends", nargs="+", help="bf16 backends to check (default: every one available)")
    args = parser.parse_args()
    backends = ["sdpa", "flex"] + (["varlen"] if torch_varlen_available() else [])
    backends += ["flash_attn"] if importlib.util.find_spec("flash_attn") else []
    backends = args.backends or backends
    plant = (args.plant_backend, args.plant_scale_error) if args.plant_backend else None
    # The fp32 check compares with true fp32 on the CPU: TF32 matmuls would add ~1e-3 of their own.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    rows = []
    cases = [(seed, "memory") for seed in range(args.seeds)] + [(args.seeds, "packed"), (args.seeds + 1, "no memory")]
    for seed, case in cases:
        rows += check_case(seed, case, args, backends, plant)
    failures = sum(r["pass"] is False for r in rows)
    with open(args.out, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "args": vars(args),
                "failures": failures,
                "rows": rows,
            },
            f,
            indent=2,
        )
    print_rows(rows)
    print(f"{failures} failing rows" + (f" (planted: {plant[0]} scale x {1 + plant[1]})" if plant else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
