"""--report-to tensorboard writes the run's metrics as TensorBoard scalars (offline); an unknown tracker is refused."""

from __future__ import annotations

import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trackers import make_tracker
from fusion_cache.train.trainer import run_train


def test_tensorboard_gets_every_step(tmp_path, tiny_model_dir, built_cache):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig.create(student=str(tiny_model_dir), cache=[str(built_cache)], out=str(tmp_path / "run"),
                             batch_size=2, max_steps=3, top_k=4, report_to="tensorboard")  # fmt: skip
    run_train(cfg, progress=False)
    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/ce")] == [1, 2, 3]
    assert "train/lr" in events.Tags()["scalars"]


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="report_to"):
        make_tracker("mlflow", tmp_path, {})
