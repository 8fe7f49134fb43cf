"""Inference benchmark: per-query routing latency, content fetch, encoding throughput, prefill
and decode latency, and host and GPU memory against memory size, on 1 and 2 GPUs.

    python -m benchmarks.bench_inference --gpus 1 2 --sizes 1e6 1e7 1e8 --out runs/bench/bench_inference.json

Sections (each is measured, printed and written to the JSON as soon as it finishes, so a
run that is cut short keeps what it measured; an error in one measurement is recorded and
the others go on):
- `estimates`: the bytes each size needs, computed (routing keys per GPU, content K̄/V̄ of
  every router layer on the host), against the GPUs' and the host's memory.
- `routing`: random normalised routing keys for every router layer, resident on the GPUs
  (sharded by document), scored for a question of `--routing-tokens` tokens in all router
  layers; median / p90 / min ms per query, key bytes and peak memory per GPU.
- `content`: the pinned host K̄/V̄ and the fetch of the top-k documents' chunks of every
  router layer to GPU 0. `--content auto` allocates ONE router layer (the fetch of all
  layers is timed by fetching it once per router layer: same bytes moved) when it fits in
  half of the free host RAM; `on` allocates every layer when they fit; `off` skips.
- `encoding`: a random-weight model of `--shape` (or `--model`) per GPU encodes
  `--encode-tokens` tokens (replicas run concurrently, one thread per GPU); then prefill and
  decode-step latency of a `--routing-tokens` question over that memory on GPU 0.

Timing: every timed call is followed by `torch.cuda.synchronize` on every GPU of the run
before the clock is read; nothing inside the timed routing and fetch calls waits for a GPU.
Routing reads each router layer's selection on the host, as generation does, so the figure is
the sum over layers of (score every chunk, merge the shards' top-k, copy to the host).
With no GPU, "devices" are the CPU (to exercise the sharding and merging code).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from msa_modeling import MSAConfig, MSAForCausalLM
from msa_modeling.inference import MemoryEncoder, MemoryStore, MSAGenerator, RoutingIndex
from msa_modeling.inference.routing_index import IndexShard, shard_boundaries
from msa_modeling.routing import l2_normalize

logger = logging.getLogger(__name__)

MODEL_SHAPES = {
    # Qwen3-4B-Instruct-2507's shape (spec sections 3 and 8): 36 layers, router layers 18..35.
    "qwen3-4b": dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
    ),
    # recipes/qwen3_350m_synthetic.yaml's model (Qwen3-0.6B's layer shapes, 4096-id tokenizer).
    "qwen3-320m": dict(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}
GIB = 1 << 30


# ------------------------------------------------------------------------------ devices, clocks, memory


def bench_devices(count: int) -> list[torch.device]:
    """`count` GPUs, or `count` CPU "devices" where there is no GPU (to exercise the sharding)."""
    if torch.cuda.is_available():
        if count > torch.cuda.device_count():
            raise ValueError(f"asked for {count} GPUs, {torch.cuda.device_count()} visible")
        return [torch.device(f"cuda:{i}") for i in range(count)]
    return [torch.device("cpu")] * count


def synchronize(devices: Sequence[torch.device]) -> None:
    for device in dict.fromkeys(devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def timed_ms(run: Callable[[], object], devices: Sequence[torch.device], repeats: int, warmup: int = 2) -> dict:
    """Median, p90 and min wall time of `run` in ms; every device is synchronised before each clock read."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(devices)
        start = time.perf_counter()
        run()
        synchronize(devices)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "min_ms": times[0],
        "repeats": repeats,
    }


def _proc_value(path: str, key: str) -> int:
    """A `kB` field of /proc/self/status or /proc/meminfo, in bytes (0 where unavailable)."""
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_memory() -> dict[str, int]:
    """This process's resident and peak resident bytes (pinned pages count once touched)."""
    memory = {"rss": _proc_value("/proc/self/status", "VmRSS"), "peak_rss": _proc_value("/proc/self/status", "VmHWM")}
    if torch.cuda.is_available():
        try:
            stats = torch.cuda.host_memory_stats()
            memory["pinned_current"] = int(stats.get("allocated_bytes.current", 0))
            memory["pinned_peak"] = int(stats.get("allocated_bytes.peak", 0))
        except (AttributeError, RuntimeError):
            pass
    return memory


def reset_host_peak() -> None:
    """Reset VmHWM (Linux: writing 5 to clear_refs); harmless where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        with contextlib.suppress(AttributeError, RuntimeError):  # older torch has no host statistics
            torch.cuda.reset_peak_host_memory_stats()


def available_host_bytes() -> int:
    return _proc_value("/proc/meminfo", "MemAvailable")


def gpu_memory(devices: Sequence[torch.device]) -> dict[str, dict[str, int]]:
    used = {}
    for device in dict.fromkeys(devices):
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            used[str(device)] = {
                "allocated": torch.cuda.memory_allocated(device),
                "peak": torch.cuda.max_memory_allocated(device),
                "reserved_peak": torch.cuda.max_memory_reserved(device),
                "free": free,
                "total": total,
            }
    return used


def release_memory(devices: Sequence[torch.device]) -> None:
    """Return cached GPU and pinned host blocks, and reset the peak counters."""
    import gc

    gc.collect()
    for device in dict.fromkeys(devices):
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if torch.cuda.is_available() and empty_host_cache is not None:
        empty_host_cache()
    reset_host_peak()


# ------------------------------------------------------------------------------ estimates


def memory_estimates(args: argparse.Namespace, shape: dict, size: int) -> dict:
    """What a memory of `size` tokens needs, computed: routing keys on the GPUs, K̄/V̄ on the host."""
    element = torch.finfo(args.dtype).bits // 8
    chunks = -(-size // args.chunk_size)
    width = shape["num_key_value_heads"] * shape["head_dim"]
    routing = chunks * args.router_layers * width * element + chunks * 8  # + the int64 chunk->document map
    content = chunks * args.router_layers * 2 * width * element
    estimate = {
        "memory_tokens": size,
        "chunks": chunks,
        "routing_key_bytes": routing,
        "content_host_bytes": content,
        "host_total_bytes": _proc_value("/proc/meminfo", "MemTotal"),
    }
    estimate["content_fits_host"] = content < 0.8 * estimate["host_total_bytes"]
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        estimate["gpu_total_bytes"] = total
        estimate["routing_key_bytes_per_gpu"] = {str(g): -(-routing // g) for g in args.gpus}
        # Keys plus the scoring tiles and the shard's document scores must fit.
        estimate["routing_fits_gpus"] = {str(g): routing / g < 0.9 * total for g in args.gpus}
    return estimate


# ------------------------------------------------------------------------------ routing


def random_routing_index(
    num_chunks: int,
    chunks_per_doc: int,
    num_layers: int,
    width: int,
    devices: Sequence[torch.device],
    dtype: torch.dtype,
    tile_size: int,
    seed: int = 0,
) -> RoutingIndex:
    """A routing index of random normalised keys, built on the devices tile by tile (no host copy)."""
    num_docs = -(-num_chunks // chunks_per_doc)
    counts = torch.full((num_docs,), chunks_per_doc, dtype=torch.long)
    counts[-1] = num_chunks - chunks_per_doc * (num_docs - 1)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    bounds = shard_boundaries(offsets, len(devices))
    shards = []
    build_tile = min(tile_size, 1 << 18)  # bounds the fp32 temporaries of the build
    for number, (device, first, end) in enumerate(zip(devices, bounds[:-1], bounds[1:])):
        generator = torch.Generator(device=device).manual_seed(seed + number)
        shard_chunks = int(offsets[end] - offsets[first])
        keys = []
        for _ in range(num_layers):
            layer = torch.empty((shard_chunks, width), dtype=dtype, device=device)
            for start in range(0, shard_chunks, build_tile):
                tile = torch.randn((min(build_tile, shard_chunks - start), width), generator=generator, device=device)
                layer[start : start + tile.shape[0]] = l2_normalize(tile).to(dtype)
                del tile
            keys.append(layer)
        chunk_doc = torch.repeat_interleave(torch.arange(end - first, device=device), counts[first:end].to(device))
        shards.append(IndexShard(device, first, end - first, chunk_doc, keys))
    return RoutingIndex(shards, tile_size)


def bench_routing(args: argparse.Namespace, shape: dict, size: int, devices: list[torch.device]) -> dict:
    """Per-query routing latency over every router layer, and the memory it takes."""
    width = shape["num_key_value_heads"] * shape["head_dim"]
    num_chunks = -(-size // args.chunk_size)
    chunks_per_doc = max(1, args.doc_length // args.chunk_size)
    release_memory(devices)
    host_before = host_memory()
    started = time.perf_counter()
    index = random_routing_index(
        num_chunks, chunks_per_doc, args.router_layers, width, devices, args.dtype, args.tile_size
    )
    synchronize(devices)
    build_seconds = time.perf_counter() - started
    # The question's grouped routing queries (fp32, on the model's GPU), broadcast to every shard per layer.
    queries = torch.randn(args.routing_tokens, width, device=devices[0])

    def route_all_layers() -> None:
        for slot in range(args.router_layers):
            _, docs = index.top_documents(slot, queries, args.top_k)
            docs.cpu()  # as in generation: each layer's selection is read on the host to fetch its K̄/V̄

    latency = timed_ms(route_all_layers, devices, args.queries)
    scores, docs = index.top_documents(0, queries, args.top_k)
    host_after = host_memory()
    result = {
        "memory_tokens": size,
        "gpus": len(devices),
        "devices": [str(d) for d in devices],
        "chunks": num_chunks,
        "docs": index.num_docs,
        "router_layers": args.router_layers,
        "routing_tokens": args.routing_tokens,
        "top_k": args.top_k,
        "tile_size": args.tile_size,
        "routing": latency,
        "routing_per_layer_ms": latency["median_ms"] / args.router_layers,
        "routing_key_bytes": sum(index.device_bytes().values()),
        "routing_key_bytes_by_device": index.device_bytes(),
        "gpu_memory": gpu_memory(devices),
        "host_memory": host_after,
        "host_rss_delta_bytes": host_after["rss"] - host_before["rss"],
        "build_seconds": build_seconds,
        "top_docs_sample": docs.tolist()[:4],
        "top_scores_sample": [round(float(s), 4) for s in scores[:4]],
        "meets_100ms_target": latency["median_ms"] < 100.0,
    }
    return result


# ------------------------------------------------------------------------------ content


def bench_content(args: argparse.Namespace, shape: dict, size: int, device: torch.device) -> dict:
    """Pinned host K̄/V̄ and the per-query fetch of the top-k documents' chunks of every router layer."""
    element = torch.finfo(args.dtype).bits // 8
    num_chunks = -(-size // args.chunk_size)
    chunks_per_doc = max(1, args.doc_length // args.chunk_size)
    per_layer = 2 * num_chunks * shape["num_key_value_heads"] * shape["head_dim"] * element
    needed = per_layer * args.router_layers
    available = available_host_bytes()
    result = {
        "memory_tokens": size,
        "host_bytes_all_layers": needed,
        "host_bytes_per_layer": per_layer,
        "host_available_bytes": available,
        "router_layers": args.router_layers,
    }
    if args.content == "off":
        return {**result, "allocated_layers": 0, "skipped": "--content off"}
    if args.content == "on" and needed < 0.8 * available:
        layers = args.router_layers
    elif per_layer < 0.5 * available:
        layers = 1
        if args.content == "on":
            logger.warning(
                "content of %d tokens needs %.1f GiB, %.1f GiB free: one layer only",
                size,
                needed / GIB,
                available / GIB,
            )
    else:
        return {
            **result,
            "allocated_layers": 0,
            "skipped": f"one layer needs {per_layer / GIB:.1f} GiB, {available / GIB:.1f} GiB free",
        }
    release_memory([device])
    pinned = device.type == "cuda"
    shape_kv = (num_chunks, shape["num_key_value_heads"], shape["head_dim"])
    started = time.perf_counter()
    # Uninitialised: the fetch moves the same bytes whatever they hold.
    keys = [torch.empty(shape_kv, dtype=args.dtype, pin_memory=pinned) for _ in range(layers)]
    values = [torch.empty(shape_kv, dtype=args.dtype, pin_memory=pinned) for _ in range(layers)]
    allocate_seconds = time.perf_counter() - started
    num_docs = -(-num_chunks // chunks_per_doc)
    offsets = torch.clamp(torch.arange(num_docs + 1) * chunks_per_doc, max=num_chunks)
    store = MemoryStore(
        signature={},
        prefix_ids=torch.zeros(0, dtype=torch.long),
        prefix_keys=[],
        prefix_values=[],
        doc_chunk_offsets=offsets,
        keys=keys,
        values=values,
    )
    docs = torch.sort(torch.randperm(num_docs, generator=torch.Generator().manual_seed(size))[: args.top_k]).values

    def fetch_all_layers() -> None:
        for slot in range(args.router_layers):
            k, v = store.gather_chunks(slot % layers, docs)
            k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    # More warm-up: the first fetches allocate the pinned staging blocks they reuse later.
    fetch = timed_ms(fetch_all_layers, [device], args.queries, warmup=5)
    fetched = sum(int(store.doc_chunk_offsets[d + 1] - store.doc_chunk_offsets[d]) for d in docs.tolist())
    result.update(
        {
            "allocated_layers": layers,
            "pinned": pinned,
            "allocate_seconds": allocate_seconds,
            "fetch_all_layers": fetch,
            "fetched_chunks_per_layer": fetched,
            "fetched_bytes_per_query": fetched
            * 2
            * shape["num_key_value_heads"]
            * shape["head_dim"]
            * element
            * args.router_layers,
            "host_memory": host_memory(),
        }
    )
    # The pinned host memory goes before the next size allocates its own (the store shares the lists).
    keys.clear()
    values.clear()
    release_memory([device])
    return result


# ------------------------------------------------------------------------------ encoding, prefill, decode


def router_layer_indices(args: argparse.Namespace, shape: dict) -> list[int]:
    """`--router-layers` layers at the top (the paper's placement) or, with `--router-placement bottom`,
    at the bottom (the synthetic GPU recipe's layers 0-3; encoding then stops there)."""
    layers = shape["num_hidden_layers"]
    if args.router_layers > layers:
        raise SystemExit(f"--router-layers {args.router_layers}: the {args.shape} shape has {layers} layers")
    if args.router_placement == "bottom":
        return list(range(args.router_layers))
    return list(range(layers - args.router_layers, layers))


def build_model(args: argparse.Namespace, shape: dict, device: torch.device) -> MSAForCausalLM:
    if args.model:
        from transformers import AutoModelForCausalLM

        import msa_modeling  # noqa: F401  (registers model_type "msa")

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(device).eval()
    config = MSAConfig(
        backbone_model_type="qwen3",
        top_k_docs=args.top_k,
        chunk_size=args.chunk_size,
        router_layers=router_layer_indices(args, shape),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        **shape,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with device:
            model = MSAForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def random_documents(num_tokens: int, doc_length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    count = max(1, num_tokens // doc_length)
    return torch.randint(10, vocab_size, (count, doc_length), generator=generator).tolist()


def bench_encoding_and_prefill(
    args: argparse.Namespace,
    shape: dict,
    devices: list[torch.device],
    models: dict[str, MSAForCausalLM],
) -> dict:
    """Encoding tokens/s with one model replica per device (concurrent), then prefill and decode latency on the first."""
    replicas = list(dict.fromkeys(devices))
    for device in replicas:
        if str(device) not in models:
            models[str(device)] = build_model(args, shape, device)
    replica_models = [models[str(device)] for device in replicas]
    vocab_size = replica_models[0].config.vocab_size
    documents = random_documents(args.encode_tokens, args.doc_length, vocab_size, seed=1)
    encoders = [
        MemoryEncoder(
            m,
            max_batch_tokens=args.max_batch_tokens,
            show_progress=False,
            storage_device=device if args.store_on_gpu else None,
        )
        for m, device in zip(replica_models, replicas)
    ]
    parts = [documents[i :: len(encoders)] for i in range(len(encoders))]
    stores = [encoder.new_store([]) for encoder in encoders]
    release_memory(devices)
    with ThreadPoolExecutor(len(encoders)) as pool:
        # Warm-up on every replica (kernels, allocator), then the timed run; replicas encode
        # disjoint documents at once (kernels release the GIL; each thread feeds its own GPU).
        warmup = min(len(documents), max(1, args.max_batch_tokens // args.doc_length))
        list(pool.map(lambda e: e.encode_documents(documents[:warmup]), encoders))
        synchronize(devices)
        start = time.perf_counter()
        list(pool.map(lambda job: job[0].add_documents(job[1], job[2]), zip(encoders, stores, parts)))
        synchronize(devices)
        seconds = time.perf_counter() - start
    encoded_tokens = sum(len(d) for d in documents)
    encode_gpu = gpu_memory(devices)
    store = stores[0]
    # The routing keys go to the GPU from the store as encoded (pageable), as NIAH's memories do;
    # a store already on that GPU lends them without a copy.
    start = time.perf_counter()
    index = RoutingIndex.from_store(store, [devices[0]])
    synchronize(devices)
    index_seconds = time.perf_counter() - start
    pin_seconds = None
    if store.device.type == "cpu" and devices[0].type == "cuda":
        start = time.perf_counter()
        store.pin_memory()
        pin_seconds = time.perf_counter() - start
    generator = MSAGenerator(replica_models[0], store, index)
    question = random_documents(args.routing_tokens, args.routing_tokens, vocab_size, seed=2)[0]
    prefill = timed_ms(lambda: generator.prefill(question), [devices[0]], args.queries)
    # Room for every timed and profiled step (and warm-up), so no step grows the cache.
    _, cache = generator.prefill(question, reserve=args.queries + 4 + args.profile_decode)
    token = torch.tensor([question[0]], device=devices[0])
    decode = timed_ms(lambda: generator.decode(cache, token), [devices[0]], args.queries)
    profile = (
        profile_table(lambda: generator.decode(cache, token), args.profile_decode) if args.profile_decode else None
    )
    return {
        "gpus": len(devices),
        "replicas": len(encoders),
        "encoded_tokens": encoded_tokens,
        "encode_seconds": seconds,
        "encode_tokens_per_s": encoded_tokens / seconds,
        "encode_gpu_memory": encode_gpu,
        "index_seconds": index_seconds,
        "index_bytes": sum(index.device_bytes().values()),
        "pin_seconds": pin_seconds,
        "prefill_memory_tokens": store.num_tokens,
        "prefill_question_tokens": len(question),
        "prefill": prefill,
        "decode_step": decode,
        "decode_profile": profile,
        "store_bytes": store.nbytes(),
        "store_device": str(store.device),
        "host_memory": host_memory(),
    }


def profile_table(run: Callable[[], object], steps: int) -> str:
    """torch.profiler's per-operator table of `steps` calls of `run`: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    averages = profiler.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    if torch.cuda.is_available():
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=15))
    return "\n".join(tables)


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to run on")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="memory tokens")
    parser.add_argument("--shape", choices=list(MODEL_SHAPES), default="qwen3-4b")
    parser.add_argument("--model", help="checkpoint dir for encoding/prefill instead of random weights")
    parser.add_argument("--router-layers", type=int, default=18)
    parser.add_argument(
        "--router-placement",
        choices=["top", "bottom"],
        default="top",
        help="router layers at the top (the paper's) or the bottom (the synthetic GPU recipe's)",
    )
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--doc-length", type=int, default=512, help="tokens per document")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--routing-tokens", type=int, default=32, help="question tokens that route")
    parser.add_argument("--queries", type=int, default=20, help="timed repeats of each measurement")
    parser.add_argument("--tile-size", type=int, default=1 << 18, help="chunks scored at once per shard")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--content",
        choices=["auto", "on", "off"],
        default="auto",
        help="pinned host K̄/V̄: auto = one router layer (where it fits in half the free RAM), "
        "on = every router layer (where they fit in 80%%), off = skip",
    )
    parser.add_argument(
        "--encode-tokens",
        type=int,
        default=1 << 18,
        help="tokens to encode per GPU count (0: skip encoding, prefill and decode)",
    )
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument(
        "--store-on-gpu",
        action="store_true",
        help="keep the encoded memory on each replica's GPU instead of the host (it must fit)",
    )
    parser.add_argument(
        "--profile-decode",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile this many decode steps (torch.profiler tables in the JSON and printed)",
    )
    parser.add_argument("--out", default="bench_inference.json")
    return parser


def print_table(results: dict) -> None:
    print(
        f"\nrouting: {results['args']['router_layers']} router layers, {results['args']['routing_tokens']} routing tokens, "
        f"top-{results['args']['top_k']} (device: {results['device']})"
    )
    print(
        f"{'memory':>10} {'gpus':>4} {'route ms':>9} {'p90 ms':>8} {'ms/layer':>9} {'keys GiB':>9} "
        f"{'GiB/GPU peak':>13} {'build s':>8} {'<100ms':>6}"
    )
    for row in results["routing"]:
        if "error" in row:
            print(f"{row['memory_tokens']:>10.3g} {row['gpus']:>4} {row['error'][:100]}")
            continue
        peak = max((d["peak"] for d in row["gpu_memory"].values()), default=0) / GIB
        print(
            f"{row['memory_tokens']:>10.3g} {row['gpus']:>4} {row['routing']['median_ms']:>9.2f} "
            f"{row['routing']['p90_ms']:>8.2f} {row['routing_per_layer_ms']:>9.3f} {row['routing_key_bytes'] / GIB:>9.2f} "
            f"{peak:>13.2f} {row['build_seconds']:>8.1f} {'yes' if row['meets_100ms_target'] else 'NO':>6}"
        )
    print("\ncontent K̄/V̄ (pinned host; fetch of top-k documents, every router layer, to GPU 0)")
    print(f"{'memory':>10} {'all layers GiB':>15} {'layers held':>11} {'fetch ms':>9} {'p90 ms':>8} {'MiB/query':>10}")
    for row in results["content"]:
        if "error" in row or row.get("allocated_layers", 0) == 0:
            print(
                f"{row['memory_tokens']:>10.3g} {row.get('host_bytes_all_layers', 0) / GIB:>15.2f} "
                f"{row.get('error') or row.get('skipped')}"
            )
            continue
        print(
            f"{row['memory_tokens']:>10.3g} {row['host_bytes_all_layers'] / GIB:>15.2f} "
            f"{row['allocated_layers']:>5}/{row['router_layers']:<5} {row['fetch_all_layers']['median_ms']:>9.2f} "
            f"{row['fetch_all_layers']['p90_ms']:>8.2f} {row['fetched_bytes_per_query'] / (1 << 20):>10.2f}"
        )
    for row in results["encoding"]:
        if "error" in row:
            print(f"encoding on {row['gpus']} device(s): {row['error'][:200]}")
            continue
        print(
            f"encoding on {row['replicas']} device(s): {row['encode_tokens_per_s']:.0f} tokens/s "
            f"({row['encoded_tokens']} tokens in {row['encode_seconds']:.1f} s; routing keys to the GPU "
            f"{row['index_seconds']:.1f} s for {row['index_bytes'] / GIB:.2f} GiB"
            + (f", then {row['pin_seconds']:.1f} s to pin the store" if row.get("pin_seconds") is not None else "")
            + f"); prefill of {row['prefill_question_tokens']} "
            f"tokens over {row['prefill_memory_tokens']} memory tokens {row['prefill']['median_ms']:.1f} ms, "
            f"decode step {row['decode_step']['median_ms']:.2f} ms"
        )
        if row.get("decode_profile"):
            print(row["decode_profile"])
    print("\nmemory needed (computed): routing keys on the GPUs, content K̄/V̄ of every router layer on the host")
    for row in results["estimates"]:
        per_gpu = row.get("routing_key_bytes_per_gpu", {})
        fits = row.get("routing_fits_gpus", {})
        gpus = " ".join(
            f"{g} GPU: {b / GIB:.1f} GiB/GPU ({'fits' if fits.get(g) else 'does NOT fit'})" for g, b in per_gpu.items()
        )
        print(
            f"{row['memory_tokens']:>10.3g}: keys {row['routing_key_bytes'] / GIB:.2f} GiB {gpus}; "
            f"content {row['content_host_bytes'] / GIB:.1f} GiB of {row['host_total_bytes'] / GIB:.0f} GiB host RAM "
            f"({'fits' if row['content_fits_host'] else 'does NOT fit'})"
        )


def _write(results: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as out:
        json.dump(results, out, indent=1)
    os.replace(temporary, path)


def _measure(results: dict, section: str, label: dict, measure: Callable[[], dict], devices, out: str | None) -> None:
    """Run one measurement; an error (out of memory included) is recorded and the others go on."""
    started = time.perf_counter()
    try:
        row = measure()
    except Exception as error:  # noqa: BLE001 - one failing size must not lose the other numbers
        logger.error("%s %s failed: %s", section, label, error)
        row = {**label, "error": f"{type(error).__name__}: {error}"[:500], "traceback": traceback.format_exc()[-2000:]}
    row["seconds"] = time.perf_counter() - started
    results[section].append(row)
    logger.info("%s %s done in %.1f s", section, label, row["seconds"])
    release_memory(devices)
    if out:
        _write(results, out)


def run(args: argparse.Namespace, out: str | None = None) -> dict:
    args.dtype = getattr(torch, args.dtype) if isinstance(args.dtype, str) else args.dtype
    shape = MODEL_SHAPES[args.shape]
    sizes = [int(s) for s in args.sizes]
    cuda = torch.cuda.is_available()
    results = {
        "args": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus_visible": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "estimates": [memory_estimates(args, shape, size) for size in sizes],
        "routing": [],
        "content": [],
        "encoding": [],
    }
    started = time.perf_counter()
    gpu_counts = [g for g in args.gpus if not cuda or g <= torch.cuda.device_count()]
    for skipped in sorted(set(args.gpus) - set(gpu_counts)):
        results["routing"].append(
            {"memory_tokens": 0, "gpus": skipped, "error": f"only {torch.cuda.device_count()} GPUs"}
        )
    for gpus in gpu_counts:
        devices = bench_devices(gpus)
        for size in sizes:
            _measure(
                results,
                "routing",
                {"memory_tokens": size, "gpus": gpus},
                lambda: bench_routing(args, shape, size, devices),
                devices,
                out,
            )
    first = bench_devices(1)
    for size in sizes:  # host-side: the same for any GPU count
        _measure(
            results, "content", {"memory_tokens": size}, lambda: bench_content(args, shape, size, first[0]), first, out
        )
    if args.encode_tokens:
        models: dict[str, MSAForCausalLM] = {}
        for gpus in gpu_counts:
            devices = bench_devices(gpus)
            _measure(
                results,
                "encoding",
                {"gpus": gpus},
                lambda: bench_encoding_and_prefill(args, shape, devices, models),
                devices,
                out,
            )
        del models
    results["total_seconds"] = time.perf_counter() - started
    results["host_memory_end"] = host_memory()
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    results = run(args, out=args.out)
    _write(results, args.out)
    print_table(results)
    print(f"\nwrote {args.out} in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
