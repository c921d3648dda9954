"""Data parallelism through torchrun: process group setup, model wrapping (DDP or FSDP2), small collectives.

    torchrun --nproc-per-node 2 -m fusion_cache train --student ./student --shards ./cache/a --out ./runs/ddp

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins the process group (gloo on CPU, nccl on CUDA) when
WORLD_SIZE > 1 and does nothing otherwise, so a plain single-process run never touches torch.distributed. Nothing
here pickles: objects cross ranks as JSON bytes in a uint8 tensor (`all_gather_json`).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fusion_cache.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, its device, and whether it joined the process group itself."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, metrics, checkpoints and the final model."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU; ``cpu``; ``cuda`` (error without CUDA)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for, but torch.cuda.is_available() is False")
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> DistContext:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1); a single process gets rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistContext(device=dev)
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank, world, local_rank, dev, owns)


def teardown(ctx: DistContext, *, ok: bool = True) -> None:
    """Leave the process group if `setup` joined it (a caller's own group is left alone).

    After a failure (``ok`` False) there is no closing barrier: the other ranks may be waiting in another
    collective, and torchrun stops them once this process exits with an error.
    """
    if ctx.owns_group:
        leave_group(barrier=ok)


# How long `leave_group` lets the backend's threads take the GIL: they need it for microseconds, once scheduled.
_DRAIN_SECONDS = 0.2


def leave_group(*, barrier: bool = True) -> None:
    """Destroy the default process group so that the interpreter can exit cleanly: barrier, drain, destroy.

    A gloo worker thread frees a finished collective's tensors (and a barrier the collectives before it) only once it
    holds the GIL. If the main thread keeps the GIL until the interpreter finalizes, that thread is killed inside a
    C++ destructor and the process aborts ("terminate called without an active exception": about 1 run in 20 of the
    2-process HF Trainer example with a barrier alone, 0 in 100 with the pause). Sleeping releases the GIL so the
    threads finish first.
    """
    import time

    import torch.distributed as dist

    if barrier:
        dist.barrier()
    time.sleep(_DRAIN_SECONDS)
    dist.destroy_process_group()


def wrap(module: torch.nn.Module, ctx: DistContext, *, fsdp: bool, layers: list[torch.nn.Module] | None = None):
    """Wrap ``module`` for data parallelism: DDP, or FSDP2 (``fully_shard`` on each of ``layers``, then the root).

    A single process with ``fsdp=False`` gets the module back as is. FSDP keeps tied weights (embeddings and
    lm_head) together because both stay in the root unit.
    """
    if fsdp:
        if not ctx.distributed:
            raise ConfigError("fsdp: needs torchrun with more than one process (WORLD_SIZE > 1)")
        from torch.distributed.fsdp import fully_shard

        for layer in layers or []:
            fully_shard(layer)
        return fully_shard(module)
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def no_sync(wrapped: torch.nn.Module, sync: bool):
    """Skip DDP's gradient all-reduce on micro-batches that do not end an accumulation (``sync`` False)."""
    if sync or not hasattr(wrapped, "no_sync"):
        return nullcontext()
    return wrapped.no_sync()


def all_reduce_mean(values: list[float], ctx: DistContext) -> list[float]:
    """The mean over ranks of each value (float64 on the CPU; the values are a handful of loss terms)."""
    if not ctx.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def all_reduce_sum_int(value: int, ctx: DistContext) -> int:
    if not ctx.distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(t)
    return int(t.item())


def all_gather_json(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` (JSON-serializable), in rank order. JSON bytes in a tensor: nothing is pickled."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(ctx.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=ctx.device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=ctx.device)
    padded[: data.numel()] = data
    out = [torch.empty(longest, dtype=torch.uint8, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(out, padded)
    return [json.loads(bytes(o[: int(s.item())].cpu().tolist()).decode()) for o, s in zip(out, sizes, strict=True)]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        dist.barrier()
