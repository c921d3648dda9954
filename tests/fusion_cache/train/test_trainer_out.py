"""A run directory is safe: `train` refuses a non-empty --out unless --overwrite (which removes the earlier run's
files) or --resume, and never leaves an earlier model's eval.json behind for `report` to show as the new one's."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fusion_cache.cli.main import app
from fusion_cache.errors import ConfigError
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import prepare_out


def _cfg(out, **kw) -> TrainConfig:
    return TrainConfig.create(student="s", cache=["c"], out=str(out), **kw)


def _finished_run(out):
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    for name in ("summary.json", "metrics.jsonl", "eval.json", "config.yaml"):
        (out / name).write_text("{}\n")
    (out / "notes.txt").write_text("mine")  # not a file a run writes: kept


def test_a_finished_run_is_refused_without_overwrite(tmp_path):
    _finished_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"out: .*run is not empty .*--overwrite to replace it"):
        prepare_out(_cfg(tmp_path / "run"), tmp_path / "run")
    assert (tmp_path / "run" / "model" / "config.json").exists()
    prepare_out(_cfg(tmp_path / "empty"), tmp_path / "empty")  # missing or empty: fine


def test_overwrite_removes_the_earlier_runs_files_and_its_stale_eval(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    prepare_out(_cfg(run, overwrite=True), run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resume_keeps_the_run_but_drops_the_stale_eval(tmp_path):
    run = tmp_path / "run"
    _finished_run(run)
    prepare_out(_cfg(run, resume=True), run)
    assert not (run / "eval.json").exists() and (run / "summary.json").exists() and (run / "model").exists()


def test_the_command_line_refuses_then_overwrites(tmp_path, tiny_model_dir, built_cache):
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["train", "--student", str(tiny_model_dir), "--cache", str(built_cache), "--out", str(run), "--max-steps",
            "1", "--batch-size", "2", "--loss-k", "4"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    (run / "eval.json").write_text(json.dumps({"model": "the earlier one"}))
    r = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "is not empty" in r.output and "--overwrite" in r.output
    assert (run / "eval.json").exists()
    r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert not (run / "eval.json").exists() and (run / "summary.json").exists()
