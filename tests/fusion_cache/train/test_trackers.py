"""--report-to tensorboard writes the run's metrics as TensorBoard scalars (offline); an unknown tracker is refused;
summary.json records how the run came about."""

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


def test_summary_records_versions_the_command_line_and_the_caches(tmp_path, tiny_model_dir, built_cache):
    from fusion_cache.cache.manifest import load_manifest

    cfg = TrainConfig.create(student=str(tiny_model_dir), cache=[str(built_cache)], out=str(tmp_path / "run"),
                             batch_size=2, max_steps=1, top_k=4, save=False)  # fmt: skip
    summary = run_train(cfg, progress=False).summary
    m = load_manifest(built_cache)
    assert summary["caches"] == [{"cache": str(built_cache), "fingerprint": m.fingerprint, "teacher": m.teacher.name,
                                  "k": 8}]  # fmt: skip
    assert {"fusion_cache", "python", "torch", "transformers"} <= set(summary["versions"])
    assert isinstance(summary["command_line"], list)


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="report_to"):
        make_tracker("mlflow", tmp_path, {})
