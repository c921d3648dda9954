"""The pairwise-fusion commands through typer's CliRunner: train --mode pairwise, merge, fuse."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from fusion_cache.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _two_caches(built_cache, tmp_path):
    a, b = tmp_path / "caches" / "teacher-a", tmp_path / "caches" / "teacher-b"
    shutil.copytree(built_cache, a)
    shutil.copytree(built_cache, b)
    return a, b


TRAIN = ("--max-steps", 1, "--batch-size", 2, "--top-k", 8, "--max-length", 128)


def test_train_single_mode_refuses_several_caches(tiny_model_dir, built_cache, tmp_path):
    a, b = _two_caches(built_cache, tmp_path)
    r = _run("train", "--mode", "single", "--student", tiny_model_dir, "--shards", a, "--shards", b, "--out",
             tmp_path / "run", *TRAIN)  # fmt: skip
    assert r.exit_code == 2 and "--mode single takes one cache, got 2" in r.output


@pytest.mark.slow
def test_train_pairwise_then_merge(tiny_model_dir, built_cache, tmp_path):
    a, b = _two_caches(built_cache, tmp_path)
    runs = tmp_path / "runs"
    r = _run(
        "train", "--mode", "pairwise", "--student", tiny_model_dir, "--shards", a, "--shards", b, "--out", runs, *TRAIN
    )
    assert r.exit_code == 0, r.output
    for name in ("teacher-a", "teacher-b"):
        assert (runs / name / "model" / "model.safetensors").is_file()
        assert json.loads((runs / name / "train_config.json").read_text())["cache"] == [str(tmp_path / "caches" / name)]
    out = tmp_path / "merged"
    r = _run(
        "merge", "--base", tiny_model_dir, "--models", runs / "teacher-a", "--models", runs / "teacher-b",
        "--method", "ties", "--density", 0.5, "--out", out, "--threads", 1,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "merged 2 models with ties" in r.output and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "merge_config.json").read_text())["options"]["density"] == 0.5
    r = _run("merge", "--base", tiny_model_dir, "--models", runs / "teacher-a", "--out", out, "--method", "ta")
    assert r.exit_code == 2 and "not empty" in r.output
    r = _run("merge", "--base", tiny_model_dir, "--models", tmp_path / "nope", "--out", tmp_path / "m2")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = _run(
        "merge", "--base", tiny_model_dir, "--models", runs / "teacher-a", "--out", tmp_path / "m3", "--drop-rate", 0.5
    )
    assert r.exit_code == 2 and "drop_rate=0.5 does not apply to method 'ta'" in r.output


@pytest.mark.slow
def test_fuse_pairwise_trains_and_merges(tiny_model_dir, built_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = _two_caches(built_cache, tmp_path)
    out = tmp_path / "fused"
    r = _run(
        "fuse", "--student", tiny_model_dir, "--shards", a, "--shards", b, "--out", out, *TRAIN, "--method", "dare"
    )
    assert r.exit_code == 0, r.output
    assert (out / "runs" / "teacher-a" / "model").is_dir() and (out / "runs" / "teacher-b" / "model").is_dir()
    model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert model.config.model_type == "qwen2"
    r = _run("fuse", "--student", tiny_model_dir, "--shards", a, "--shards", a, "--out", tmp_path / "f2", *TRAIN)
    assert r.exit_code == 2 and "would both train into run directory 'teacher-a'" in r.output
