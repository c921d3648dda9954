"""`resolve_teacher`: the teacher's tokenizer, engine and dtype, and the longest sequence its engine scores."""

from __future__ import annotations

from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.teacher import engine_length_limit
from fusion_cache.capture.teacher import resolve_teacher


def test_the_longest_sequence_is_set_by_the_teachers_positions_and_the_engine(tiny_model_dir, hf_engine):
    # the tiny teacher has 2048 positions: HF scores 2048 tokens; vLLM must generate one token after the prompt and
    # refuses max_model_len > 2048, so it takes 2047; a started vLLM engine also caps at its own max_model_len - 1
    assert engine_length_limit(str(tiny_model_dir), "hf", hf_engine) == 2048
    assert engine_length_limit(str(tiny_model_dir), "vllm", None) == 2047

    class Started:
        max_model_len = 1024

    assert engine_length_limit(str(tiny_model_dir), "vllm", Started()) == 1023


def test_a_given_engine_decides_the_engine_name_and_dtype(tiny_model_dir, hf_engine):
    cfg = BuildConfig.create(teacher=str(tiny_model_dir), data="d", out="o", engine="vllm", dtype="bfloat16")
    given = resolve_teacher(cfg, hf_engine)
    assert (given.engine, given.dtype, given.length_limit) == ("hf", hf_engine.dtype, 2048)
    alone = resolve_teacher(cfg, None)
    assert (alone.engine, alone.dtype, alone.length_limit) == ("vllm", "bfloat16", 2047)
    assert alone.tokenizer is given.tokenizer  # loaded once per process
    assert alone.model.revision.startswith("local-")
