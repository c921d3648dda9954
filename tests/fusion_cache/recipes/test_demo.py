"""The demo end to end on the real embedded teacher under vLLM, at smoke-test size."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import pytest

from fusion_cache.cache.reader import CacheReader
from fusion_cache.errors import ConfigError
from fusion_cache.recipes.demo import DemoSettings
from fusion_cache.recipes.demo import cache_dirs
from fusion_cache.recipes.demo import demo_runs
from fusion_cache.recipes.demo import run_demo
from fusion_cache.recipes.demo import train_config
from fusion_cache.recipes.demo_data import bundled_responses
from fusion_cache.recipes.demo_data import generation_settings
from fusion_cache.recipes.demo_data import load_demo_prompts


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
    from fusion_cache.recipes.demo_data import RESPONSES_META
    from fusion_cache.recipes.demo_data import _data_file

    meta = json.loads(_data_file(RESPONSES_META).read_text())
    answers = bundled_responses(generation_settings(meta["teacher_revision"], meta["max_tokens"], "bfloat16"))
    assert answers is not None and set(answers) == {r["id"] for r in load_demo_prompts()}
    assert all(a.strip() for a in answers.values())
    assert bundled_responses(generation_settings(meta["teacher_revision"], 7, "float32")) is None


def test_second_teacher_adds_its_kd_row_and_one_unified_row_per_combine(tmp_path):
    s = DemoSettings(second_teacher="gemma3-270m", combines=("mean", "uncertainty"))
    runs = demo_runs(s)
    dirs = ["sft", "kd-kl", "kd-mapped_kl-gemma3-270m", "unified-mean", "unified-uncertainty"]
    assert [r.run_dir for r in runs] == dirs
    gemma = runs[2]
    assert gemma.teachers == ("gemma3-270m",) and gemma.align == "bytes" and gemma.kd_loss == "mapped_kl"
    assert all(r.teachers == ("smollm2-135m", "gemma3-270m") for r in runs[3:])
    caches = cache_dirs(tmp_path, s)
    assert caches["smollm2-135m"]["train"] == tmp_path / "cache" / "train"  # unchanged single-teacher layout
    assert caches["gemma3-270m"]["heldout"] == tmp_path / "cache" / "gemma3-270m" / "heldout"
    cfg = train_config(runs[4], tmp_path / "student", caches, tmp_path / "run", s)
    assert cfg.combine == "uncertainty" and cfg.align == "bytes" and cfg.kd_loss == ["auto"]
    assert cfg.shards == [str(caches["smollm2-135m"]["train"]), str(caches["gemma3-270m"]["train"])]
    assert (cfg.max_steps, cfg.seed, cfg.lr, cfg.lambda_) == (s.steps, s.seed, s.lr, s.lambda_)
    sft = train_config(runs[0], tmp_path / "student", caches, tmp_path / "sft", s)
    assert sft.lambda_ == 0.0 and sft.shards == [str(caches["smollm2-135m"]["train"])]
    assert [r.run_dir for r in demo_runs(DemoSettings())] == ["sft", "kd-kl"]  # the default demo is unchanged
    assert {r.kd_gate for r in runs} == {"none"} and cfg.kd_gate == "none"


def test_the_gate_applies_to_every_run_but_sft_and_is_named(tmp_path):
    s = DemoSettings(second_teacher="gemma3-270m", kd_gate="student")
    runs = demo_runs(s)
    assert [r.kd_gate for r in runs] == ["none", "student", "student", "student"]
    assert runs[0].name == "SFT (lambda=0)" and all(r.name.endswith(", gate)") for r in runs[1:])
    caches = cache_dirs(tmp_path, s)
    assert train_config(runs[3], tmp_path / "student", caches, tmp_path / "run", s).kd_gate == "student"
    assert train_config(runs[0], tmp_path / "student", caches, tmp_path / "sft", s).kd_gate == "none"


def test_demo_settings_refuse_bad_second_teacher_options():
    with pytest.raises(ConfigError, match="combines.*'max'"):
        DemoSettings(second_teacher="gemma3-270m", combines=("mean", "max"))
    with pytest.raises(ConfigError, match="second_teacher.*smollm2-135m"):
        DemoSettings(second_teacher="smollm2-135m")
    with pytest.raises(ConfigError, match="engine"):
        DemoSettings(engine="tgi")
    with pytest.raises(ConfigError, match="kd_gate.*'teacher'"):
        DemoSettings(kd_gate="teacher")


@pytest.mark.slow
def test_two_teacher_demo_end_to_end_on_tiny_models(tmp_path, tiny_model_dir, other_teacher_dir, capsys):
    s = DemoSettings.quick()
    s = replace(
        s, teacher=str(tiny_model_dir), second_teacher=str(other_teacher_dir), engine="hf", kd_losses=("uld",),
        combines=("mean", "uncertainty"), n_train=8, n_heldout=4, response_tokens=12, steps=2, kd_gate="student",
    )  # fmt: skip
    summary = run_demo(tmp_path, settings=s)
    other = other_teacher_dir.name
    names = ["student (start)", "SFT (lambda=0)", "KD ULD (InfiFusion) (lambda=0.5, gate)",
             f"KD mapped KL {other} (lambda=0.5, gate)", "unified mean (kl + mapped_kl, lambda=0.5, gate)",
             "unified uncertainty (kl + mapped_kl, lambda=0.5, gate)"]  # fmt: skip
    assert list(summary["results"]) == names
    for name, r in summary["results"].items():
        assert r["samples"] == 4 and r["top1_agreement"] is not None, name
        assert set(r["uld"]) == {str(tiny_model_dir), str(other_teacher_dir)}, name
        assert all(v is not None and v >= 0 for v in r["uld"].values()), name
    second = CacheReader(tmp_path / "cache" / other / "train")
    first = CacheReader(tmp_path / "cache" / "train")
    assert second.manifest.stats.rows == first.manifest.stats.rows and second.manifest.teacher.engine == "hf"
    out = capsys.readouterr().out
    assert f"| ULD to {tiny_model_dir.name} | ULD to {other} |" in out
    assert "unified uncertainty (kl + mapped_kl, lambda=0.5, gate) vs SFT" in out
    assert f"unified mean (kl + mapped_kl, lambda=0.5, gate) vs KD mapped KL {other} (lambda=0.5, gate)" in out
    # the unified runs read both caches, the single-teacher one only its own
    unified = json.loads((tmp_path / "runs" / "unified-mean" / "summary.json").read_text())
    assert len(unified["cache"]) == 2 and unified["fusion"]["join"]
    steps = [json.loads(x) for x in (tmp_path / "runs" / "unified-mean" / "metrics.jsonl").read_text().splitlines()]
    assert all(f"gate_{t}" in r for r in steps for t in (tiny_model_dir.name, other))  # the gate ran
