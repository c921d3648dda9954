"""Exact resume: a run resumed from a checkpoint computes the same per-step losses and weights as an uninterrupted
one, also after a real training process was killed with SIGKILL; checkpoints are atomic and pruned."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusion_cache.errors import ConfigError
from fusion_cache.train.checkpoint import list_checkpoints
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import run_train

REPO = Path(__file__).resolve().parents[3]


def _cfg(student, cache, out, **kw):
    shards = [str(c) for c in cache] if isinstance(cache, list) else [str(cache)]
    base = dict(
        student=str(student), shards=shards, out=str(out), batch_size=2, lr=3e-3, max_steps=6,
        shuffle_buffer=3, device="cpu", checkpoint_every=2, keep_checkpoints=None,
    )  # fmt: skip
    return TrainConfig.create(**{**base, **kw})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curve(run: Path) -> list[tuple]:
    """Per-step values that must match exactly (elapsed time is the only field allowed to differ)."""
    return [tuple(v for k, v in r.items() if k != "elapsed_s") for r in _metrics(run)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def _cut_back_to(run: Path, step: int) -> None:
    """Make ``run`` look like a run that died right after its checkpoint at ``step``."""
    for s, path in list_checkpoints(run):
        if s > step:
            shutil.rmtree(path)
    shutil.rmtree(run / "model")


def _caches(which, built_cache, multi_caches):
    """One cache, or two teachers (one with another tokenizer) with a loss each and the uncertainty combine."""
    if which == "one":
        return built_cache, {}
    return [multi_caches["a"], multi_caches["b"]], dict(kd_loss=["kl", "uld"], combine="uncertainty", top_k=6)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["one", "two"])
def test_resume_from_each_checkpoint_equals_the_uninterrupted_run(tmp_path, built_cache, multi_caches, tiny_model_dir,
                                                                  which):  # fmt: skip
    cache, kw = _caches(which, built_cache, multi_caches)
    ref = tmp_path / "ref"
    run_train(_cfg(tiny_model_dir, cache, ref, **kw), progress=False)
    assert [s for s, _ in list_checkpoints(ref)] == [2, 4, 6]
    for step in (2,):  # (every checkpoint gives the same result; one keeps the test short)
        run = tmp_path / f"from-{step}"
        shutil.copytree(ref, run)
        _cut_back_to(run, step)
        res = run_train(_cfg(tiny_model_dir, cache, run, resume=True, **kw), progress=False)
        assert _curve(run) == _curve(ref)  # bitwise: the same floats, step by step, before and after the resume
        _assert_same_weights(run, ref)
        summary = json.loads((ref / "summary.json").read_text())
        assert res.summary["answer_tokens"] == summary["answer_tokens"]
        assert res.summary["fusion"] == summary["fusion"]  # the join and alignment counts too


def test_checkpoints_are_pruned_and_a_fresh_run_does_not_overwrite_them(tmp_path, built_cache, tiny_model_dir):
    run = tmp_path / "run"
    run_train(
        _cfg(tiny_model_dir, built_cache, run, max_steps=4, checkpoint_every=1, keep_checkpoints=2), progress=False
    )
    assert [s for s, _ in list_checkpoints(run)] == [3, 4]
    files = sorted(p.name for p in list_checkpoints(run)[-1][1].iterdir())
    assert files == ["model.safetensors", "optimizer.pt", "rank-00000.json", "scheduler.pt", "trainer_state.json"]
    with pytest.raises(ConfigError, match="pass --resume"):
        run_train(_cfg(tiny_model_dir, built_cache, run, max_steps=4), progress=False)
    with pytest.raises(ConfigError, match=r"max_steps: 4 -> 5"):
        run_train(_cfg(tiny_model_dir, built_cache, run, max_steps=5, resume=True), progress=False)


def _cli_train(student, cache, out, *extra) -> list[str]:
    """``python -m fusion_cache train`` (the torchrun entry point) with the settings of `_cfg`."""
    caches = [c for one in (cache if isinstance(cache, list) else [cache]) for c in ("--shards", one)]
    args = ["--student", student, *caches, "--out", out, "--batch-size", 2, "--lr", 3e-3]
    return [sys.executable, "-m", "fusion_cache", "train", *map(str, args), *map(str, extra)]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["one", "two"])
def test_a_sigkilled_run_resumes_to_the_same_losses_and_weights(tmp_path, built_cache, multi_caches, tiny_model_dir,
                                                                which):  # fmt: skip
    """A real training process is killed with SIGKILL right after its first checkpoint; resuming finishes the run
    with the losses and weights of an uninterrupted one (one teacher, and two teachers with a loss each)."""
    cache, two = _caches(which, built_cache, multi_caches)
    steps, every = 12, 2
    # the same intra-op thread count as this process, so the float reductions (and results) are the same here
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    killed = tmp_path / "killed"
    extra = ["--max-steps", steps, "--checkpoint-every", every, "--device", "cpu", "--top-k", two.get("top_k", 8)]
    if two:
        extra += ["--kd-loss", "kl", "--kd-loss", "uld", "--combine", "uncertainty"]
    proc = subprocess.Popen(_cli_train(tiny_model_dir, cache, killed, *extra), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, output
    done = max(s for s, _ in list_checkpoints(killed))
    assert done < steps and not (killed / "model").exists()

    kw = dict(max_steps=steps, checkpoint_every=every, keep_checkpoints=3, shuffle_buffer=256, top_k=8) | two
    run_train(_cfg(tiny_model_dir, cache, killed, resume=True, **kw), progress=False)
    ref = tmp_path / "ref"
    run_train(_cfg(tiny_model_dir, cache, ref, **kw), progress=False)
    assert [r["step"] for r in _metrics(killed)] == list(range(1, steps + 1))  # nothing lost, nothing twice
    assert _curve(killed) == _curve(ref)
    _assert_same_weights(killed, ref)


def test_a_resume_with_another_thread_count_warns(tmp_path, built_cache, tiny_model_dir, caplog):
    run = tmp_path / "run"
    run_train(_cfg(tiny_model_dir, built_cache, run, max_steps=2, checkpoint_every=1), progress=False)
    _cut_back_to(run, 1)
    state_file = list_checkpoints(run)[-1][1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["torch_threads"] == torch.get_num_threads()
    state["torch_threads"] = torch.get_num_threads() + 1
    state_file.write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="fusion_cache.train.trainer"):
        run_train(_cfg(tiny_model_dir, built_cache, run, max_steps=2, checkpoint_every=1, resume=True), progress=False)
    assert f"written with {torch.get_num_threads() + 1} torch threads" in caplog.text
