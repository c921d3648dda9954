"""--report-to tensorboard writes the run's metrics as TensorBoard scalars and --report-to wandb as an offline W&B
run (both read back); a missing tracker package or an unknown tracker is refused with the fix; summary.json records
how the run came about."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

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


def _wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file (``run-<id>.wandb``).

    wandb 0.31 ships no Python reader of its own files; the format is a 7-byte header (``:W&B``, magic, version)
    followed by LevelDB log records in 32 KiB blocks (7-byte header: crc32, length, type; type 1 = a whole record,
    2/3/4 = its first/middle/last fragment).
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero padding
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_metrics_and_the_config(tmp_path, tiny_model_dir, built_cache, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "fc-test")
    cfg = TrainConfig.create(student=str(tiny_model_dir), cache=[str(built_cache)], out=str(tmp_path / "run"),
                             batch_size=2, max_steps=3, top_k=4, report_to="wandb", save=False)  # fmt: skip
    run_train(cfg, progress=False)
    run_id = (tmp_path / "run/wandb/run_id").read_text().strip()
    (run_file,) = (tmp_path / "run/wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    records = _wandb_records(run_file)
    history = [{i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]  # fmt: skip
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["train/ce"] for h in history] == pytest.approx([m["ce"] for m in metrics])
    assert {"train/kd", "train/lr", "train/grad_norm"} <= set(history[0])
    config = {}
    for r in records:
        items = r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update
        config.update({i.key: json.loads(i.value_json) for i in items if i.key})
    assert config["max_steps"] == 3 and config["report_to"] == "wandb"
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("fc-test", "run")


def test_wandb_missing_says_how_to_install(tmp_path, monkeypatch):
    from fusion_cache.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does where it is not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'fusion-cache\[wandb\]'"):
        make_tracker("wandb", tmp_path, {})


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
