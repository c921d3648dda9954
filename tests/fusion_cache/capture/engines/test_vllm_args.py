"""The vLLM engine's arguments for big teachers (no vLLM started): tensor parallelism switches to the multiprocess
executor, memory share and context length reach LLM(...), extra engine arguments pass through except the reserved
ones, the options are refused for other engines, and on a CPU each tensor-parallel rank gets its own cores."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines.vllm import RESERVED_ENGINE_ARGS
from fusion_cache.capture.engines.vllm import cpu_binding
from fusion_cache.capture.engines.vllm import llm_kwargs
from fusion_cache.capture.teacher import engine_options
from fusion_cache.errors import ConfigError


def _kwargs(**kw):
    return llm_kwargs("m", dtype="bfloat16", on_cpu=False, max_model_len=4096, max_k=64, **kw)


def test_one_gpu_runs_in_process_and_several_use_the_multiprocess_executor():
    one = _kwargs()
    assert one["distributed_executor_backend"] == "uni" and one["tensor_parallel_size"] == 1
    assert "gpu_memory_utilization" not in one  # vLLM's own default
    two = _kwargs(tensor_parallel_size=2, gpu_memory_utilization=0.8)
    assert two["distributed_executor_backend"] == "mp" and two["tensor_parallel_size"] == 2
    assert two["gpu_memory_utilization"] == 0.8 and two["max_model_len"] == 4096 and two["max_logprobs"] == 64


def test_engine_args_pass_through_but_not_the_reserved_ones():
    kw = _kwargs(engine_args={"enforce_eager": True, "swap_space": 8})
    assert kw["enforce_eager"] is True and kw["swap_space"] == 8
    for name in ("max_logprobs", "logprobs_mode", "trust_remote_code"):
        assert name in RESERVED_ENGINE_ARGS
        with pytest.raises(ConfigError, match=rf"engine_args: \['{name}'\] may not be set here"):
            _kwargs(engine_args={name: 1})


def test_the_teachers_revision_reaches_the_weights_and_the_tokenizer():
    # not run against the live Hub: vLLM resolves the revision itself (capture/test_teacher.py checks the HF path)
    sha = "1" * 40
    kw = _kwargs(revision=sha)
    assert kw["revision"] == kw["tokenizer_revision"] == sha
    assert "revision" not in _kwargs()  # a local directory: nothing to pin
    with pytest.raises(ConfigError, match=r"engine_args: \['revision'\] may not be set here"):
        _kwargs(engine_args={"revision": "main"})


def test_on_a_cpu_each_tensor_parallel_rank_gets_its_own_cores():
    kw = llm_kwargs("m", dtype="float32", on_cpu=True, max_model_len=64, max_k=8, tensor_parallel_size=2)
    assert kw["distributed_executor_backend"] == "mp" and kw["enforce_eager"] is True
    assert cpu_binding([0, 1], 1) == "0-1" and cpu_binding([0, 1], 2) == "0|1"
    assert cpu_binding(list(range(7)), 2) == "0-3|4-6" and cpu_binding([0, 2, 3, 5], 2) == "0,2|3,5"
    with pytest.raises(ConfigError, match=r"tensor_parallel_size: 3 needs a CPU per rank .* may use 2 \(0,1\)"):
        cpu_binding([0, 1], 3)


def test_the_build_passes_its_vllm_options_to_the_engine():
    cfg = BuildConfig.create(teacher="t", data="d", out="o", tensor_parallel_size=2, gpu_memory_utilization=0.7,
                             max_model_len=8192, engine_args={"enforce_eager": True})  # fmt: skip
    opts = engine_options(cfg, max_len=100)
    assert opts == {"max_model_len": 8192, "max_k": 64, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.7,
                    "engine_args": {"enforce_eager": True}}  # fmt: skip
    assert engine_options(BuildConfig.create(teacher="t", data="d", out="o"), max_len=100)["max_model_len"] == 101
    assert engine_options(BuildConfig.create(teacher="t", data="d", out="o", engine="hf"), max_len=100) == {}


def test_other_engines_refuse_the_vllm_options():
    with pytest.raises(ConfigError, match=r"engine='hf' takes no vLLM options, got \['tensor_parallel_size'\]"):
        BuildConfig.create(teacher="t", data="d", out="o", engine="hf", tensor_parallel_size=2)


def test_the_flags_reach_the_build():
    from fusion_cache.cli.main import app

    r = CliRunner().invoke(app, ["build", "--teacher", "t", "--data", "d", "--out", "o", "--engine", "hf",
                                 "--gpu-memory-utilization", "0.5", "--engine-args", '{"enforce_eager": true}'],
                           env={"COLUMNS": "200"})  # fmt: skip
    assert r.exit_code == 2 and "takes no vLLM options, got ['gpu_memory_utilization', 'engine_args']" in r.output
