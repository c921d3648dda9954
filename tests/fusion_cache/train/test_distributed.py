"""Data parallelism: two real ranks under torchrun (gloo, CPU) read disjoint rows, keep DDP weights in sync, and
resume exactly under DDP and FSDP; the single-process helpers are no-ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.train import distributed

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def test_a_single_process_is_rank_0_of_1_and_nothing_is_wrapped(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module, ctx, fsdp=False) is module
    assert distributed.all_gather_json({"a": [1, 2]}, ctx) == [{"a": [1, 2]}]
    assert distributed.all_reduce_mean([1.5, 2.0], ctx) == [1.5, 2.0]
    with pytest.raises(ConfigError, match="fsdp: needs torchrun"):
        distributed.wrap(module, ctx, fsdp=True)
    distributed.teardown(ctx)  # it joined nothing, so it leaves nothing


def _curve(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [tuple(v for k, v in json.loads(line).items() if k != "elapsed_s") for line in lines]


@pytest.mark.slow
def test_two_ranks_ddp_fsdp_and_unified_disjoint_in_sync_and_exactly_resumable(
    tmp_path, tiny_model_dir, built_cache, multi_caches
):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # 2 ranks on a 2-core machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "distributed_worker.py"), str(tiny_model_dir), str(built_cache), str(tmp_path),
           str(multi_caches["a"]), str(multi_caches["b"])]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    every_row = {r.sample_id for r in CacheReader(built_cache).iter_rows()}
    every_joined = {r.sample_id for c in ("a", "b") for r in CacheReader(multi_caches[c]).iter_rows()}
    for mode in ("ddp", "fsdp", "unified"):
        ranks = [json.loads((tmp_path / mode / f"rank-{r}.json").read_text()) for r in range(2)]
        rows = [{sid for _, ids in rk["seen"]["ref"] for sid in ids} for rk in ranks]
        assert not rows[0] & rows[1], f"{mode}: the ranks shared rows"
        assert rows[0] | rows[1] == (every_joined if mode == "unified" else every_row)
        for rk in ranks:  # 4 steps x 2 micro-batches; the resume (from step 2) sees exactly steps 3-4 again
            assert [s for s, _ in rk["seen"]["ref"]] == [1, 1, 2, 2, 3, 3, 4, 4]
            assert rk["seen"]["resumed"] == [b for b in rk["seen"]["ref"] if b[0] > 2]
        ref, resumed = tmp_path / mode / "ref", tmp_path / mode / "resumed"
        assert json.loads((ref / "summary.json").read_text())["world_size"] == 2
        assert _curve(resumed) == _curve(ref), mode
        a = (ref / "model" / "model.safetensors").read_bytes()
        assert a == (resumed / "model" / "model.safetensors").read_bytes(), mode
    for mode in ("ddp", "unified"):  # different rows, same weights: gradients were averaged
        ranks = [json.loads((tmp_path / mode / f"rank-{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["weights_sha"] == ranks[1]["weights_sha"], mode
