"""Trainer options: gradient checkpointing changes memory, not results; bf16 autocast trains close to fp32; the
torchrun entry point takes the CLI's flags."""

from __future__ import annotations

import json

import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import plan_steps
from fusion_cache.train.trainer import run_train


def _losses(run, key="loss"):
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _run(student, cache, out, **kw):
    base = dict(student=str(student), shards=[str(cache)], out=str(out), batch_size=2, lr=3e-3, max_steps=3,
                top_k=8, device="cpu", save=False)  # fmt: skip
    return run_train(TrainConfig.create(**{**base, **kw}), progress=False)


@pytest.mark.slow
def test_grad_checkpointing_gives_the_same_losses(tmp_path, built_cache, tiny_model_dir):
    _run(tiny_model_dir, built_cache, tmp_path / "plain")
    _run(tiny_model_dir, built_cache, tmp_path / "ckpt", grad_checkpointing=True)
    # the recomputed forward is the same computation: identical losses, step after step
    assert _losses(tmp_path / "ckpt") == _losses(tmp_path / "plain")


@pytest.mark.slow
def test_bf16_autocast_trains_close_to_fp32(tmp_path, built_cache, tiny_model_dir):
    _run(tiny_model_dir, built_cache, tmp_path / "fp32", lr=5e-4)
    _run(tiny_model_dir, built_cache, tmp_path / "bf16", lr=5e-4, autocast="bf16")
    # the student starts as the teacher: ULD is 0 in fp32 at step 1, and only bf16 rounding moves it
    assert _losses(tmp_path / "fp32", "kd")[0] < 1e-5 < 1e-4 < _losses(tmp_path / "bf16", "kd")[0]
    assert _losses(tmp_path / "bf16", "ce") == pytest.approx(_losses(tmp_path / "fp32", "ce"), rel=0.02)


def test_new_settings_are_validated_and_steps_count_every_rank():
    with pytest.raises(ConfigError, match="autocast"):
        TrainConfig.create(student="s", shards=["c"], out="o", autocast="fp16")
    with pytest.raises(ConfigError, match="checkpoint_every"):
        TrainConfig.create(student="s", shards=["c"], out="o", checkpoint_every=0)
    cfg = TrainConfig.create(student="s", shards=["c"], out="o", batch_size=2, grad_accum=3)
    assert plan_steps(cfg, rows=120, world_size=1) == (20, 2)
    assert plan_steps(cfg, rows=120, world_size=2) == (10, 2)  # a step takes batch x accum x world samples
