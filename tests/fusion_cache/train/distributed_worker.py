"""Run by tests/fusion_cache/train/test_distributed.py under ``torchrun --nproc-per-node 2`` (not a test module itself).

    torchrun --nproc-per-node 2 tests/fusion_cache/train/distributed_worker.py STUDENT CACHE WORKDIR [CACHE_A CACHE_B]

For DDP, FSDP and (given two more caches) unified fusion of CACHE_A and CACHE_B under DDP: trains a reference
run with checkpoints, copies it, cuts the copy back to its first checkpoint, resumes it, and writes what this rank
saw to ``WORKDIR/<mode>/rank-<r>.json``: the sample ids of every micro-batch of both runs and a hash of this rank's
weights. One launch for all of it: starting two processes that import torch and transformers is most of the cost
on a small CPU machine.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fusion_cache.train.checkpoint import list_checkpoints
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.distributed import leave_group
from fusion_cache.train.trainer import run_train


def weights_sha(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        local = t.to_local() if hasattr(t, "to_local") else t  # FSDP: this rank's shard
        h.update(name.encode())
        h.update(local.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def recorder(into: list):
    """An ``on_batch`` callback appending [step, sample ids] of every micro-batch to ``into``."""
    return lambda step, examples: into.append([step, [e.sample_id for e in examples]])


def main(student: str, cache: str, work: str, *unified_caches: str) -> None:
    dist.init_process_group("gloo")  # run_train joins an existing group and leaves it to us
    rank = dist.get_rank()
    for mode in ("ddp", "fsdp") + (("unified",) if unified_caches else ()):
        root = Path(work) / mode
        settings = dict(
            student=student, shards=[cache], batch_size=1, grad_accum=2, lr=3e-3, max_steps=4, top_k=8,
            shuffle_buffer=2, device="cpu", checkpoint_every=2, fsdp=mode == "fsdp",
        )  # fmt: skip
        if mode == "unified":
            settings.update(shards=list(unified_caches), combine="uncertainty", kd_loss=["kl", "uld"])
        seen: dict[str, list] = {"ref": [], "resumed": []}
        ref = root / "ref"
        res = run_train(
            TrainConfig.create(out=str(ref), **settings),
            progress=False,
            on_batch=recorder(seen["ref"]),
        )
        sha = weights_sha(res.model)
        dist.barrier()
        resumed = root / "resumed"
        if rank == 0:
            shutil.copytree(ref, resumed)
            for step, path in list_checkpoints(resumed):
                if step > 2:
                    shutil.rmtree(path)
            shutil.rmtree(resumed / "model")
        dist.barrier()
        run_train(
            TrainConfig.create(out=str(resumed), resume=True, **settings),
            progress=False,
            on_batch=recorder(seen["resumed"]),
        )
        (root / f"rank-{rank}.json").write_text(json.dumps({"seen": seen, "weights_sha": sha}))
        dist.barrier()
    leave_group(barrier=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
