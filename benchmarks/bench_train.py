"""Training-step benchmark: MSA against the dense backbone, same shape, same GPU, same run.

    python -m benchmarks.bench_train --lengths 8192 16384 32768 65536 --out bench_train.json

Three configurations per row length, each a full step (forward, backward and, unless
`--no-optimizer`, a fused AdamW step) with bf16 weights and per-layer activation
checkpointing, on random weights:
  msa:          the MSA model on a memory of documents (lengths 200-2000) + one question;
  dense_causal: the Hugging Face backbone with full causal attention over the row;
  dense_docmask: the Hugging Face backbone with per-document masked packing (FlexAttention).
Reports tokens/s, model-FLOPs utilisation and peak memory, prints a table and writes JSON.

MFU = training FLOPs by the project's one accounting (`msa_modeling.flops`: the LM head only where
it runs, padding nothing, attention only the pairs computed) / step time / peak. The trainer's own
benchmark, `launch/bench_trainer.py`, measures what users run; this script isolates the step.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch.utils.hooks import RemovableHandle
from transformers import Qwen3Config, Qwen3ForCausalLM

import msa_modeling  # noqa: F401
from msa_modeling import MSAConfig, MSAForCausalLM, PackedLayout, build_packed_layout
from msa_modeling.execution import (
    activation_offload_of,
    apply_activation_checkpointing,
    apply_activation_offload,
    apply_compile,
)
from msa_modeling.flops import FlopModel, dense_work, msa_work
from train.benchmark import QWEN3_4B

logger = logging.getLogger("bench_train")

# The shape of recipes/qwen3_1b_synthetic.yaml (the trainer's multi-GPU acceptance run).
QWEN3_1B = dict(
    QWEN3_4B,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
)
# The shape of recipes/qwen3_350m_synthetic.yaml (the GPU experiment's model; run it with --router-layers 0).
QWEN3_350M = dict(
    QWEN3_4B,
    vocab_size=4096,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=40960,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
SHAPES = {"qwen3-4b": QWEN3_4B, "qwen3-1b": QWEN3_1B, "qwen3-350m": QWEN3_350M}


def random_memory_row(
    row_length: int,
    generator: torch.Generator,
    doc_length: tuple[int, int] = (200, 2000),
    prefix_length: int = 32,
    prompt_length: int = 64,
    answer_length: int = 32,
    vocab_size: int = 151936,
    positives: int = 2,
) -> dict[str, torch.Tensor]:
    """One example filling a row: prefix, documents of random lengths, a question and an answer."""
    memory_budget = row_length - prefix_length - prompt_length - answer_length
    lengths = []
    while sum(lengths) < memory_budget:
        lengths.append(int(torch.randint(doc_length[0], doc_length[1] + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - memory_budget
    if lengths[-1] < 1:
        lengths.pop()
        lengths[-1] += memory_budget - sum(lengths)
    doc_ids = [-2] * prefix_length
    for i, n in enumerate(lengths):
        doc_ids += [i + 1] * n
    doc_ids += [0] * (prompt_length + answer_length)
    doc_ids = torch.tensor(doc_ids)
    input_ids = torch.randint(0, vocab_size, (row_length,), generator=generator)
    labels = torch.full_like(input_ids, -100)
    labels[-answer_length:] = input_ids[-answer_length:]
    positive_docs = torch.randperm(len(lengths), generator=generator)[:positives] + 1
    aux_labels = torch.isin(doc_ids, positive_docs).long()
    return {
        "input_ids": input_ids[None],
        "doc_ids": doc_ids[None],
        "labels": labels[None],
        "aux_labels": aux_labels[None],
        "doc_lengths": torch.tensor(lengths),
    }


@dataclass
class Result:
    config: str
    row_length: int
    step_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    peak_memory_gib: float | None
    model_tflop_per_step: float
    note: str = ""
    offloaded_layers: int = 0


def row_layout(row: dict, config: MSAConfig) -> PackedLayout:
    """The packed layout of a benchmark row under `config`'s chunking and query positions."""
    return build_packed_layout(
        row["doc_ids"],
        chunk_size=config.chunk_size,
        query_position_offset=config.query_position_offset,
        labels=row["labels"],
        aux_labels=row["aux_labels"],
    )


def msa_step_flops(row: dict, cfg: dict, args) -> float:
    """Training FLOPs by the shared accounting (`msa_modeling.flops`); the question sees the pooled chunks
    of the k documents with the most chunks in every router layer (a bound: the step is timed unsynced)."""
    config = msa_config(cfg, args)
    with torch.device("meta"):
        flop_model = FlopModel.from_model(MSAForCausalLM(config))
    work = msa_work(row_layout(row, config))
    memory_pairs = len(config.router_layers) * float(
        work.doc_memory_pairs.sort(descending=True).values[: args.top_k].sum()
    )
    return flop_model.training_flops(work, memory_pairs)


def dense_step_flops(row: dict, cfg: dict, document_mask: bool) -> float:
    with torch.device("meta"):
        flop_model = FlopModel.from_model(Qwen3ForCausalLM(Qwen3Config(**cfg)))
    return flop_model.training_flops(dense_work(row["doc_ids"], document_mask))


def time_steps(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


KERNEL_CLASSES = (
    # (class, substrings of CUDA kernel names); the first match wins.
    # Attention first: the flash kernels' names carry cutlass template arguments.
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("fused (compiled)", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cat")),
    ("index / gather / scatter", ("index", "gather", "scatter", "embedding")),
    ("reduction / sort", ("reduce", "sort", "topk", "scan", "softmax")),
    ("pointwise (eager)", ("elementwise", "vectorized", "unrolled")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((label for label, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other")


def profile_step(step, label: str) -> dict:
    """GPU time of one step by kernel class and the top kernels, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] = kernels.get(event.name, 0.0) + event.time_range.elapsed_us() / 1e3
    total = sum(kernels.values())
    classes: dict[str, float] = {}
    for name, ms in kernels.items():
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda item: -item[1])[:25]
    lines = [f"{label}: {total:.1f} ms of GPU kernels"]
    lines += [
        f"  {name:<28}{ms:>10.1f} ms {100 * ms / total:>6.1f}%"
        for name, ms in sorted(classes.items(), key=lambda i: -i[1])
    ]
    lines += [f"    {ms:>9.2f} ms  {name[:110]}" for name, ms in top]
    print("\n".join(lines), flush=True)
    return {"label": label, "kernel_ms": total, "classes_ms": classes, "top_kernels_ms": dict(top)}


def optimizer_in_backward(
    params: Iterable[torch.nn.Parameter], make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
) -> list[RemovableHandle]:
    """One optimizer per parameter, stepped by a hook as soon as backward has accumulated that
    parameter's gradient, which it then frees: the whole set of gradients (2 bytes a parameter
    in bf16) never exists at once, which leaves room for kept activations. The update is the
    plain optimizer's; a global-norm gradient clip is impossible this way (the benchmark clips
    nothing). Returns the hooks' handles: each hook holds its optimizer, which holds the
    parameter, a cycle the garbage collector cannot see through, so the model and its optimizer
    state outlive the caller until the handles are removed."""
    handles = []
    for param in params:
        if not param.requires_grad:
            continue
        optimizer = make_optimizer([param])

        def step_and_free(_: torch.Tensor, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        handles.append(param.register_post_accumulate_grad_hook(step_and_free))
    return handles


def make_step(model, inputs: dict, optimizer, use_optimizer: bool, memory: dict):
    """One training step. `memory` gets the phase it is in and the allocator's peak after forward
    (host-side allocator counters: no device sync), so a run out of memory says where."""

    def step():
        # Per-step peaks, so the forward peak is not the previous step's backward.
        memory["peak"] = max(memory.get("peak", 0), torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        memory["phase"] = "forward"
        out = model(**inputs)
        memory["forward_peak"] = torch.cuda.max_memory_allocated()
        memory["after_forward"] = torch.cuda.memory_allocated()
        memory["phase"] = "backward"
        out.loss.backward()
        memory["phase"] = "optimizer"
        if optimizer is not None:  # None: the optimizer ran inside backward
            if use_optimizer:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        memory["phase"] = "done"

    return step


def memory_note(memory: dict) -> str:
    if "forward_peak" not in memory:
        return f"in {memory.get('phase', 'build')}"
    return (
        f"in {memory['phase']}; forward peak {memory['forward_peak'] / 2**30:.1f} GiB, "
        f"{memory['after_forward'] / 2**30:.1f} GiB held into backward"
    )


def failed_result(name: str, row: dict, flops: float, peak_memory_gib: float | None, note: str) -> Result:
    """The row of a configuration that did not complete its steps."""
    return Result(name, row["input_ids"].numel(), None, None, None, peak_memory_gib, flops / 1e12, note)


def run_config(name: str, build, row: dict, cfg: dict, args, flops: float, profiles: list) -> Result:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = optimizer = None
    hooks: list[RemovableHandle] = []
    memory: dict = {}
    try:
        model, inputs = build()
        make_optimizer = lambda params: torch.optim.AdamW(params, lr=1e-5, fused=True)  # noqa: E731
        if args.optimizer_in_backward:
            hooks = optimizer_in_backward(model.parameters(), make_optimizer)
        else:
            optimizer = make_optimizer(model.parameters())
        step = make_step(model, inputs, optimizer, not args.no_optimizer, memory)
        seconds = time_steps(step, args.warmup, args.repeats)
        tokens = row["input_ids"].numel()
        if name in args.profile:
            profiles.append(profile_step(step, f"{name} at {tokens} tokens"))
        result = Result(
            config=name,
            row_length=tokens,
            step_s=seconds,
            tokens_per_s=tokens / seconds,
            mfu=flops / seconds / args.peak_flops,
            peak_memory_gib=max(memory["peak"], torch.cuda.max_memory_allocated()) / 2**30,
            model_tflop_per_step=flops / 1e12,
        )
        result.note = memory_note(memory).removeprefix("in done; ")
        offload = activation_offload_of(model) if isinstance(model, MSAForCausalLM) else None
        if offload is not None:
            result.note += (
                f"; offloaded {offload.offloaded_bytes / 2**30:.1f} GiB a step, "
                f"{offload.late_fetches} tensors fetched without prefetch"
            )
    except torch.OutOfMemoryError:
        peak = max(memory.get("peak", 0), torch.cuda.max_memory_allocated())
        result = failed_result(name, row, flops, peak / 2**30, f"out of memory {memory_note(memory)}")
    except Exception as error:  # noqa: BLE001 - a failing configuration is reported, the others still run
        logger.exception("%s failed", name)
        result = failed_result(name, row, flops, None, f"{type(error).__name__}: {error}"[:200])
    for hook in hooks:
        hook.remove()
    del model, optimizer, hooks
    gc.collect()
    torch.cuda.empty_cache()
    logger.info("%s", result)
    return result


def msa_config(cfg: dict, args) -> MSAConfig:
    return MSAConfig(
        **cfg,
        top_k_docs=args.top_k,
        chunk_size=args.chunk_size,
        attn_backend=args.backend,
        lm_loss_chunk_size=4096,
        **({"router_layers": args.router_layers} if args.router_layers is not None else {}),
    )


def build_msa(cfg: dict, row: dict, args, offloaded_layers: int):
    config = msa_config(cfg, args)
    with torch.device("cuda"):
        model = MSAForCausalLM(config).to(torch.bfloat16)
    # Checkpointing counts from the layer after the offloaded ones; one --checkpointed-layers or
    # --saved-attention-layers serves a sweep of --offloaded-layers, so each is capped at what is left.
    remaining = config.num_hidden_layers - offloaded_layers
    recomputed = remaining if args.checkpointed_layers is None else min(args.checkpointed_layers, remaining)
    apply_activation_checkpointing(
        model,
        layers=recomputed,
        start=offloaded_layers,
        keep_attention_layers=min(args.saved_attention_layers, recomputed),
    )
    apply_activation_offload(model, layers=offloaded_layers, prefetch_layers=args.offload_prefetch_layers)
    if args.compile:
        apply_compile(model)
    model.train()
    layout = row_layout(row, config).to("cuda")
    return model, {"input_ids": row["input_ids"].cuda(), "layout": layout}


def build_dense(cfg: dict, row: dict, document_mask: bool):
    implementation = "flex_attention" if document_mask else "sdpa"
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation=implementation)).to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    model.train()
    inputs = {"input_ids": row["input_ids"].cuda(), "labels": row["input_ids"].cuda()}
    if document_mask:
        # Positions restarting at 0 mark packed sequences; Hugging Face turns them into a document mask.
        segments = (
            [int((row["doc_ids"] == -2).sum())] + row["doc_lengths"].tolist() + [int((row["doc_ids"] == 0).sum())]
        )
        inputs["position_ids"] = torch.cat([torch.arange(n) for n in segments])[None].cuda()
    return model, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b", help="random-weight model shape")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--configs", nargs="+", default=["msa", "dense_causal", "dense_docmask"])
    parser.add_argument("--backend", default="auto", help="MSA attention backend")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument(
        "--router-layers", type=int, nargs="+", help="MSA layers (default: the config's, the upper half)"
    )
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-optimizer", action="store_true", help="time forward+backward only")
    parser.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="step AdamW per parameter inside backward, freeing each gradient at once",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the MSA layers' token-wise blocks")
    parser.add_argument(
        "--peak-flops", type=float, default=989e12, help="dense bf16 peak of the card (H100 SXM: 989e12)"
    )
    parser.add_argument(
        "--checkpointed-layers",
        type=int,
        default=None,
        help="MSA: recompute only the first N layers in backward (default: all)",
    )
    parser.add_argument(
        "--saved-attention-layers",
        type=int,
        default=0,
        help="MSA: of the recomputed layers, the first N keep their attention kernel's output",
    )
    parser.add_argument(
        "--offloaded-layers",
        type=int,
        nargs="+",
        default=[0],
        help="MSA: the first N layers keep their activations in pinned host memory (neither "
        "recomputed nor on the GPU); --checkpointed-layers counts from the layer after them. "
        "Several values run one MSA step each, in one process",
    )
    parser.add_argument(
        "--offload-prefetch-layers",
        type=int,
        default=2,
        help="MSA: offloaded layers that backward copies back ahead of need",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        default=[],
        metavar="CONFIG",
        help="also profile one step of these configs: GPU time by kernel class and the top kernels",
    )
    parser.add_argument("--out", default="bench_train.json")
    args = parser.parse_args()
    if args.optimizer_in_backward and args.no_optimizer:
        parser.error("--optimizer-in-backward and --no-optimizer exclude each other")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dict(SHAPES[args.shape])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers

    results, profiles = [], []
    for length in args.lengths:
        row = random_memory_row(length, torch.Generator().manual_seed(length), vocab_size=cfg["vocab_size"])
        for name in args.configs:
            if name == "msa":
                flops = msa_step_flops(row, cfg, args)
                for offloaded in args.offloaded_layers:
                    result = run_config(
                        name, lambda: build_msa(cfg, row, args, offloaded), row, cfg, args, flops, profiles
                    )
                    result.offloaded_layers = offloaded
                    results.append(result)
            else:
                masked = name == "dense_docmask"
                flops = dense_step_flops(row, cfg, masked)
                results.append(run_config(name, lambda: build_dense(cfg, row, masked), row, cfg, args, flops, profiles))

    device = torch.cuda.get_device_name()
    report = {
        "device": device,
        "torch": torch.__version__,
        "optimizer_step_included": not args.no_optimizer,
        "optimizer_in_backward": args.optimizer_in_backward,
        "args": vars(args),
        "results": [asdict(r) for r in results],
        "profiles": profiles,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    placement = " (inside backward)" if args.optimizer_in_backward else ""
    print(
        f"\n{device}, torch {torch.__version__}, optimizer step "
        f"{'included' + placement if not args.no_optimizer else 'excluded'}"
    )
    print(f"{'config':<14}{'tokens':>8}{'offload':>8}{'step s':>9}{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}  note")
    for r in results:
        fmt = lambda v, f: (f % v) if v is not None else "-"  # noqa: E731
        print(
            f"{r.config:<14}{r.row_length:>8}{r.offloaded_layers:>8}{fmt(r.step_s, '%.3f'):>9}{fmt(r.tokens_per_s, '%.0f'):>10}"
            f"{fmt(r.mfu and 100 * r.mfu, '%.1f%%'):>7}{fmt(r.peak_memory_gib, '%.1f'):>10}  {r.note}"
        )


if __name__ == "__main__":
    main()
