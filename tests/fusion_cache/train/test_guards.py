"""What a training run refuses from caches it did not make (train/guards.py, and the K checks of train/losses.py):
a non-finite loss, token ids outside the student's vocabulary, a ULD K the cache cannot serve, an unsigned cache
under ``require_signature``. Each runs the real trainer on the tiny model; the bad values are planted through
``run_train``'s ``on_batch`` hook, after the cache layer's own checks (cache/validate.py) have passed them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.errors import NonFiniteLossError
from fusion_cache.errors import ShardFormatError
from fusion_cache.errors import SignatureError
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import run_train

ROW = r"sample [0-9a-f]{32} \(tiny-qwen2: shard-\d+-of-\d+\.arrow, record batch \d+, row \d+"


def _train(student, cache, out, on_batch=None, **kw):
    base = dict(student=str(student), shards=[str(cache)], out=str(out), batch_size=2, lr=3e-3, max_steps=3)
    return run_train(TrainConfig.create(**{**base, **kw}), progress=False, on_batch=on_batch)


def test_a_non_finite_loss_stops_the_run_at_its_step_naming_the_rows(tmp_path, built_cache, tiny_model_dir):
    def poison(step, batch):
        if step == 2:
            for target in batch[0].teachers:
                target.values[:] = np.nan

    with pytest.raises(NonFiniteLossError, match=rf"step 2: the loss is nan; the run stopped before .*{ROW}"):
        _train(tiny_model_dir, built_cache, tmp_path / "run", poison, top_k=8)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and "NaN" not in metrics[0]  # step 1 logged, step 2 never applied nor logged


@pytest.mark.parametrize("field", ["input", "teacher"])
def test_token_ids_outside_the_students_vocabulary_are_refused(tmp_path, built_cache, tiny_model_dir, field):
    def plant(step, batch):
        if field == "input":
            batch[0].input_ids[0] = 10_000_000
        else:
            batch[0].teachers[0].ids[0, 0] = 10_000_000

    what = "token id 10000000 of its input" if field == "input" else "top-K id 10000000 of teacher tiny-qwen2"
    with pytest.raises(ShardFormatError, match=rf"step 1: {ROW}.*: {what} is outside the student's vocabulary"):
        _train(tiny_model_dir, built_cache, tmp_path / field, plant, top_k=8, kd_loss="kl")


def test_a_uld_k_the_cache_cannot_serve_is_refused(tmp_path, built_cache, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"top_k=9 for teacher tiny-qwen2: its cache holds K=8 .*--top-k 8 or less"):
        _train(tiny_model_dir, built_cache, tmp_path / "a", top_k=9)
    with pytest.raises(ConfigError, match=r"top_k=2 .*z-scored ULD over 2 values is identically zero"):
        _train(tiny_model_dir, built_cache, tmp_path / "b", top_k=2)
    _train(tiny_model_dir, built_cache, tmp_path / "c", top_k=2, zscore=False, max_steps=1, save=False)  # allowed


def test_require_signature_refuses_an_unsigned_cache(tmp_path, built_cache, tiny_model_dir):
    pytest.importorskip("cryptography")
    from fusion_cache.cache.signature import generate_key
    from fusion_cache.cache.signature import sign_cache

    _, pub = generate_key(tmp_path / "keys" / "team")
    with pytest.raises(SignatureError, match="no valid signature of a trusted key"):
        _train(tiny_model_dir, built_cache, tmp_path / "a", require_signature=True, trusted_key=[str(pub)])
    with pytest.raises(ConfigError, match="require_signature=True needs at least one trusted_key"):
        _train(tiny_model_dir, built_cache, tmp_path / "b", require_signature=True)
    signed = tmp_path / "signed"
    shutil.copytree(built_cache, signed)
    sign_cache(str(signed), tmp_path / "keys" / "team")
    _train(tiny_model_dir, signed, tmp_path / "c", require_signature=True, trusted_key=[str(pub)], max_steps=1,
           save=False, top_k=8)  # fmt: skip
