"""Inference benchmark: encoding throughput, per-query routing / content-fetch / prefill
latency, and host and GPU memory against memory size, on 1 and 2 GPUs.

Routing is measured over random, normalised routing keys resident on the GPUs (sharded by
document over the GPUs of the run), so 100M-token memories need no encoding. Content K̄/V̄
is allocated in pinned host memory only where it fits (`--content auto`). Encoding and
prefill use a random-weight model of the chosen shape (or `--model`, a checkpoint dir).

    python -m msa_train.eval.bench_inference --gpus 1 2 --sizes 1e6 1e7 1e8 --out bench_inference.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import time
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
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
GIB = 1 << 30


def bench_devices(count: int) -> list[torch.device]:
    """`count` GPUs, or `count` CPU "devices" where there is no GPU (to exercise the sharding)."""
    if torch.cuda.is_available():
        if count > torch.cuda.device_count():
            raise SystemExit(f"asked for {count} GPUs, {torch.cuda.device_count()} visible")
        return [torch.device(f"cuda:{i}") for i in range(count)]
    return [torch.device("cpu")] * count


def synchronize(devices: Sequence[torch.device]) -> None:
    for device in set(devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def timed_ms(run: Callable[[], object], devices: Sequence[torch.device], repeats: int, warmup: int = 2) -> dict:
    """Median, p90 and min wall time of `run` in ms, devices synchronised around each call."""
    for _ in range(warmup):
        run()
    synchronize(devices)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(devices)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "min_ms": times[0]}


def host_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def available_host_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def gpu_bytes(devices: Sequence[torch.device]) -> dict[str, dict[str, int]]:
    return {
        str(d): {"allocated": torch.cuda.memory_allocated(d), "peak": torch.cuda.max_memory_allocated(d)}
        for d in dict.fromkeys(devices) if d.type == "cuda"
    }


def reset_gpu_peaks(devices: Sequence[torch.device]) -> None:
    for device in dict.fromkeys(devices):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def random_routing_index(
    num_chunks: int, chunks_per_doc: int, num_layers: int, width: int, devices: Sequence[torch.device],
    dtype: torch.dtype, tile_size: int, seed: int = 0,
) -> RoutingIndex:
    """A routing index of random normalised keys, built on the devices tile by tile (no host copy)."""
    num_docs = -(-num_chunks // chunks_per_doc)
    counts = torch.full((num_docs,), chunks_per_doc, dtype=torch.long)
    counts[-1] = num_chunks - chunks_per_doc * (num_docs - 1)
    offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    bounds = shard_boundaries(offsets, len(devices))
    shards = []
    for number, (device, first, end) in enumerate(zip(devices, bounds[:-1], bounds[1:])):
        generator = torch.Generator(device=device).manual_seed(seed + number)
        shard_chunks = int(offsets[end] - offsets[first])
        keys = []
        for _ in range(num_layers):
            layer = torch.empty((shard_chunks, width), dtype=dtype, device=device)
            for start in range(0, shard_chunks, tile_size):
                tile = torch.randn((min(tile_size, shard_chunks - start), width), generator=generator, device=device)
                layer[start : start + tile.shape[0]] = l2_normalize(tile).to(dtype)
            keys.append(layer)
        chunk_doc = torch.repeat_interleave(torch.arange(end - first, device=device), counts[first:end].to(device))
        shards.append(IndexShard(device, first, end - first, chunk_doc, keys))
    return RoutingIndex(shards, tile_size)


def bench_routing(args: argparse.Namespace, shape: dict, size: int, devices: list[torch.device]) -> dict:
    """Per-query routing latency over every router layer, and the memory it takes."""
    width = shape["num_key_value_heads"] * shape["head_dim"]
    num_chunks = size // args.chunk_size
    chunks_per_doc = max(1, args.doc_length // args.chunk_size)
    reset_gpu_peaks(devices)
    rss_before = host_rss_bytes()
    index = random_routing_index(num_chunks, chunks_per_doc, args.router_layers, width, devices, args.dtype, args.tile_size)
    queries = torch.randn(args.routing_tokens, width, device=devices[0])

    def route_all_layers() -> None:
        for slot in range(args.router_layers):
            index.top_documents(slot, queries, args.top_k)

    latency = timed_ms(route_all_layers, devices, args.queries)
    result = {
        "memory_tokens": size, "gpus": len(set(devices)) if devices[0].type == "cuda" else 0,
        "chunks": num_chunks, "docs": index.num_docs, "router_layers": args.router_layers,
        "routing": latency, "routing_per_layer_ms": latency["median_ms"] / args.router_layers,
        "routing_key_bytes": sum(index.device_bytes().values()), "gpu_memory": gpu_bytes(devices),
        "host_rss_delta_bytes": host_rss_bytes() - rss_before,
    }
    result["content"] = bench_content(args, shape, num_chunks, chunks_per_doc, devices[0])
    del index
    return result


def bench_content(args: argparse.Namespace, shape: dict, num_chunks: int, chunks_per_doc: int, device: torch.device) -> dict:
    """Pinned host K̄/V̄ of the whole memory, and the fetch of top-k documents for one layer."""
    per_chunk = 2 * shape["num_key_value_heads"] * shape["head_dim"] * torch.finfo(args.dtype).bits // 8
    needed = per_chunk * num_chunks * args.router_layers
    fits = needed < 0.6 * available_host_bytes()
    if args.content == "off" or (args.content == "auto" and not fits):
        return {"allocated": False, "host_bytes_needed": needed}
    # One layer is allocated and timed; the others are the same size and are fetched the same way.
    pinned = device.type == "cuda"
    shape_kv = (num_chunks, shape["num_key_value_heads"], shape["head_dim"])
    keys = torch.zeros(shape_kv, dtype=args.dtype, pin_memory=pinned)
    values = torch.zeros(shape_kv, dtype=args.dtype, pin_memory=pinned)
    num_docs = -(-num_chunks // chunks_per_doc)
    offsets = torch.clamp(torch.arange(num_docs + 1) * chunks_per_doc, max=num_chunks)
    store = MemoryStore(signature={}, prefix_ids=torch.zeros(0, dtype=torch.long), prefix_keys=[], prefix_values=[],
                        doc_chunk_offsets=offsets, keys=[keys], values=[values])
    docs = torch.randperm(num_docs)[: args.top_k]

    def fetch() -> None:
        k, v = store.gather_chunks(0, docs)
        k.to(device, non_blocking=True), v.to(device, non_blocking=True)

    return {"allocated": True, "host_bytes_needed": needed, "pinned": pinned,
            "fetch_one_layer": timed_ms(fetch, [device], args.queries)}


def build_model(args: argparse.Namespace, shape: dict, device: torch.device) -> MSAForCausalLM:
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(device).eval()
    config = MSAConfig(backbone_model_type="qwen3", top_k_docs=args.top_k, chunk_size=args.chunk_size,
                       router_layers=list(range(shape["num_hidden_layers"] - args.router_layers, shape["num_hidden_layers"])),
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **shape)
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


def bench_encoding_and_prefill(args: argparse.Namespace, shape: dict, devices: list[torch.device]) -> dict:
    """Encoding tokens/s with one model replica per device, then prefill latency on the first."""
    models = [build_model(args, shape, device) for device in dict.fromkeys(devices)]
    vocab_size = models[0].config.vocab_size
    documents = random_documents(args.encode_tokens, args.doc_length, vocab_size, seed=1)
    encoders = [MemoryEncoder(m, max_batch_tokens=args.max_batch_tokens, show_progress=False) for m in models]
    parts = [documents[i :: len(encoders)] for i in range(len(encoders))]
    stores = [encoder.new_store([]) for encoder in encoders]
    encoders[0].add_documents(encoder_warmup := encoders[0].new_store([]), documents[:2])  # kernels, allocator
    del encoder_warmup
    synchronize(devices)
    start = time.perf_counter()
    # Replicas encode disjoint documents at once (kernels release the GIL).
    with ThreadPoolExecutor(len(encoders)) as pool:
        list(pool.map(lambda job: job[0].add_documents(job[1], job[2]), zip(encoders, stores, parts)))
    synchronize(devices)
    seconds = time.perf_counter() - start
    encoded_tokens = sum(len(d) for d in documents)
    store = stores[0]
    if devices[0].type == "cuda":
        store.pin_memory()
    generator = MSAGenerator(models[0], store, RoutingIndex.from_store(store, [devices[0]]))
    question = random_documents(args.routing_tokens, args.routing_tokens, vocab_size, seed=2)[0]
    prefill = timed_ms(lambda: generator.prefill(question), [devices[0]], args.queries)
    _, cache = generator.prefill(question)
    decode = timed_ms(lambda: generator.decode(cache, question[0]), [devices[0]], args.queries)
    return {
        "replicas": len(encoders), "encoded_tokens": encoded_tokens, "encode_seconds": seconds,
        "encode_tokens_per_s": encoded_tokens / seconds, "prefill_memory_tokens": store.num_tokens,
        "prefill": prefill, "decode_step": decode, "store_host_bytes": store.host_bytes(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to run on")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8], help="memory tokens")
    parser.add_argument("--shape", choices=list(MODEL_SHAPES), default="qwen3-4b")
    parser.add_argument("--model", help="checkpoint dir for encoding/prefill instead of random weights")
    parser.add_argument("--router-layers", type=int, default=18)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--doc-length", type=int, default=512, help="tokens per document")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--routing-tokens", type=int, default=32, help="question tokens that route")
    parser.add_argument("--queries", type=int, default=20, help="timed repeats")
    parser.add_argument("--tile-size", type=int, default=1 << 18)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--content", choices=["auto", "on", "off"], default="auto",
                        help="allocate pinned host K̄/V̄ (auto: only where it fits in 60%% of free RAM)")
    parser.add_argument("--encode-tokens", type=int, default=1 << 20, help="tokens to encode (0: skip)")
    parser.add_argument("--max-batch-tokens", type=int, default=65536)
    parser.add_argument("--out", default="bench_inference.json")
    return parser


def print_table(results: dict) -> None:
    print(f"{'memory':>10} {'gpus':>4} {'route ms':>9} {'p90 ms':>8} {'keys GiB':>9} {'gpu peak GiB':>13} "
          f"{'host K/V GiB':>13} {'fetch ms':>9}")
    for row in results["routing"]:
        if "error" in row:
            print(f"{row['memory_tokens']:>10.3g} {row['gpus']:>4} {row['error']}")
            continue
        peak = sum(d["peak"] for d in row["gpu_memory"].values()) / GIB
        content = row["content"]
        fetch = f"{content['fetch_one_layer']['median_ms']:.2f}" if content["allocated"] else "n/a"
        print(f"{row['memory_tokens']:>10.3g} {row['gpus']:>4} {row['routing']['median_ms']:>9.2f} "
              f"{row['routing']['p90_ms']:>8.2f} {row['routing_key_bytes'] / GIB:>9.2f} {peak:>13.2f} "
              f"{content['host_bytes_needed'] / GIB:>13.2f} {fetch:>9}")
    for row in results["encoding"]:
        if "error" in row:
            print(f"encoding on {row['gpus']} device(s): {row['error']}")
            continue
        print(f"encoding on {row['replicas']} device(s): {row['encode_tokens_per_s']:.0f} tokens/s; prefill over "
              f"{row['prefill_memory_tokens']} tokens {row['prefill']['median_ms']:.1f} ms, "
              f"decode step {row['decode_step']['median_ms']:.1f} ms")


def run(args: argparse.Namespace) -> dict:
    args.dtype = getattr(torch, args.dtype) if isinstance(args.dtype, str) else args.dtype
    shape = MODEL_SHAPES[args.shape]
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "routing": [], "encoding": [],
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    for gpus in args.gpus:
        devices = bench_devices(gpus)
        for size in (int(s) for s in args.sizes):
            # One size running out of memory must not lose the others' numbers.
            try:
                results["routing"].append(bench_routing(args, shape, size, devices))
            except torch.OutOfMemoryError as error:
                logger.error("routing at %d tokens on %d GPU(s): out of memory", size, gpus)
                results["routing"].append({"memory_tokens": size, "gpus": gpus, "error": f"out of memory: {error}"[:300]})
            reset_gpu_peaks(devices)
        if args.encode_tokens:
            try:
                results["encoding"].append(bench_encoding_and_prefill(args, shape, devices))
            except torch.OutOfMemoryError as error:
                results["encoding"].append({"gpus": gpus, "error": f"out of memory: {error}"[:300]})
            reset_gpu_peaks(devices)
    return results


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    results = run(args)
    print_table(results)
    with contextlib.suppress(FileNotFoundError):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as out:
        json.dump(results, out, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
