"""Process-group set-up shared by `deepspeed` launches and plain single-process runs."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def skip_shared_memory_comm_build() -> None:
    """Keep DeepSpeed from JIT-building its `deepspeed_shm_comm` op on CPU runs.

    DeepSpeed 0.19.8 builds that op in `init_distributed` for `inference_all_reduce` only, which
    training never calls (gradients go through the gloo process group). The build takes 35-70 s
    on a fresh machine, and a launch killed during it leaves `<TORCH_EXTENSIONS_DIR>/
    deepspeed_shm_comm/lock` behind, on which every later launch would wait forever in silence.
    """
    name = get_accelerator().create_op_builder("ShareMemCommBuilder").NAME
    deepspeed.ops.__compatible_ops__[name] = False


ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # torch reads either


def allocator_settings() -> str | None:
    """The CUDA caching allocator's options from the environment, if any are set."""
    return next((os.environ[name] for name in ALLOCATOR_VARIABLES if name in os.environ), None)


def use_expandable_segments() -> None:
    """Let the CUDA caching allocator grow segments in place unless the user configured it.

    Rows of tens of thousands of tokens, each with its own number and size of documents, allocate
    blocks of ever-changing sizes; with fixed segments the cache fragments. On one H100 a
    Qwen3-4B-shaped stage at 64K ran out of memory with 7.8 GB reserved but unused. Read when the
    allocator starts, so this runs before any CUDA tensor exists.
    """
    if allocator_settings() is None:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def init_distributed() -> DistributedContext:
    """Join (or, for a plain `python` run, create) the process group and pick this rank's device.

    Under the `deepspeed` launcher RANK/WORLD_SIZE/LOCAL_RANK are set; a plain run becomes a
    world of one, so both go through the same DeepSpeed code path. CPU runs use gloo. GPU runs
    get expandable allocator segments unless the environment sets the allocator's options.
    """
    use_expandable_segments()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cpu = accelerator.device_name() == "cpu"
    if on_cpu:
        skip_shared_memory_comm_build()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else accelerator.communication_backend_name())
    if on_cpu:
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    return DistributedContext(dist.get_rank(), local_rank, dist.get_world_size(), device)


def barrier() -> None:
    dist.barrier()


def broadcast_failure(failed: bool, context: DistributedContext) -> bool:
    """Rank 0's `failed` on every rank (a collective call)."""
    flag = torch.tensor([int(failed)], dtype=torch.int64, device=context.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def shutdown_distributed() -> None:
    """Leave the process group together: a barrier, then `destroy_process_group`, so that no rank
    exits while another still talks to it (a rank killed mid-collective aborts the launch)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
