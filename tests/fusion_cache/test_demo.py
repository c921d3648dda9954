"""The demo end to end on the real embedded teacher under vLLM, at smoke-test size."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fusion_cache.cache.reader import CacheReader
from fusion_cache.demo import DemoSettings
from fusion_cache.demo import run_demo
from fusion_cache.demo_data import bundled_responses
from fusion_cache.demo_data import generation_settings
from fusion_cache.demo_data import load_demo_prompts


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    summary = run_demo(tmp_path, quick=True)
    out = capsys.readouterr().out
    assert "| SFT (lambda=0) |" in out and "| KD ULD (InfiFusion) (lambda=0.5) |" in out
    assert "| KD top-K KL (lambda=0.5) |" in out and "KD top-K KL (lambda=0.5) vs SFT" in out
    q = DemoSettings.quick()
    for split, n in (("train", q.n_train), ("heldout", q.n_heldout)):
        reader = CacheReader(tmp_path / "cache" / split)
        assert reader.manifest.stats.rows == n and reader.manifest.teacher.engine == "vllm"
        assert reader.manifest.teacher.name == "smollm2-135m" and reader.verify() == []
    for name, r in summary["results"].items():
        assert r["samples"] == q.n_heldout and r["top1_agreement"] is not None, name
    assert json.loads((tmp_path / "results.json").read_text())["results"].keys() == summary["results"].keys()


def test_bundled_answers_cover_every_prompt():
    from fusion_cache.demo_data import RESPONSES_META
    from fusion_cache.demo_data import _data_file

    meta = json.loads(_data_file(RESPONSES_META).read_text())
    answers = bundled_responses(generation_settings(meta["teacher_revision"], meta["max_tokens"], "bfloat16"))
    assert answers is not None and set(answers) == {r["id"] for r in load_demo_prompts()}
    assert all(a.strip() for a in answers.values())
    assert bundled_responses(generation_settings(meta["teacher_revision"], 7, "float32")) is None
