"""Checkpoint files: tied weights stored once, RNG states round-trip through JSON, half-written checkpoints are
invisible, pruning keeps the newest, and a pickle that would run code is refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fusion_cache.errors import ConfigError
from fusion_cache.train.checkpoint import check_same_settings
from fusion_cache.train.checkpoint import latest_checkpoint
from fusion_cache.train.checkpoint import list_checkpoints
from fusion_cache.train.checkpoint import load_checkpoint
from fusion_cache.train.checkpoint import load_weights
from fusion_cache.train.checkpoint import rng_state
from fusion_cache.train.checkpoint import save_checkpoint
from fusion_cache.train.checkpoint import save_weights
from fusion_cache.train.checkpoint import set_rng_state


def _save(run, step, keep=None, optimizer=None):
    w = torch.arange(6.0).reshape(2, 3)
    return save_checkpoint(
        run,
        model={"embed.weight": w, "head.weight": w, "bias": torch.ones(3)},
        optimizer=optimizer if optimizer is not None else {"state": {0: {"step": torch.tensor(3.0)}}, "groups": []},
        scheduler={"last_epoch": step},
        trainer={"step": step, "world_size": 2},
        ranks=[{"r": 0}, {"r": 1}],
        keep=keep,
    )


def test_round_trip_and_tied_weights_stored_once(tmp_path):
    path = _save(tmp_path, 7)
    assert path.name == "step-00000007"
    ck = load_checkpoint(path)
    assert ck.step == 7 and ck.ranks == [{"r": 0}, {"r": 1}] and ck.scheduler == {"last_epoch": 7}
    assert torch.equal(ck.model["head.weight"], torch.arange(6.0).reshape(2, 3))
    assert ck.model["head.weight"] is ck.model["embed.weight"]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["bias", "embed.weight"]  # the alias is metadata, not a second copy


def test_rng_states_round_trip_through_json():
    saved = json.loads(json.dumps(rng_state()))
    expect = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expect


def test_partial_checkpoints_are_ignored_swept_and_old_ones_pruned(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    stale = tmp_path / "checkpoints" / ".step-00000004.tmp-123"  # what a process killed mid-write leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    _save(tmp_path, 5, keep=2)
    assert not stale.exists() and [s for s, _ in list_checkpoints(tmp_path)] == [3, 5]


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = _save(tmp_path, 1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state": Evil()}, path / "optimizer.pt")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_settings_that_change_the_computation_are_refused(tmp_path):
    check_same_settings(
        {"lr": 1.0, "resume": False, "log_every": 1}, {"lr": 1.0, "resume": True, "log_every": 5}, tmp_path
    )
    with pytest.raises(ConfigError, match=r"lr: 1.0 -> 2.0"):
        check_same_settings({"lr": 1.0}, {"lr": 2.0}, tmp_path)


def test_weights_file_round_trip_without_aliases(tmp_path):
    sd = {"a": torch.randn(2, 2).t(), "b": torch.zeros(1, dtype=torch.bfloat16)}  # a non-contiguous tensor too
    save_weights(sd, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(back["a"], sd["a"]) and back["b"].dtype == torch.bfloat16
