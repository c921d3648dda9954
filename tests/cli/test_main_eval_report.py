"""`fusion-cache eval` and `fusion-cache report` through typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fusion_cache.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_then_eval_then_report(tmp_path, tiny_model_dir, built_cache, data_file):
    run = tmp_path / "run"
    r = _run("train", "--student", tiny_model_dir, "--shards", built_cache, "--out", run, "--max-steps", 2,
             "--batch-size", 2, "--top-k", 8)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = _run("eval", "--model", run, "--data", data_file, "--cache", built_cache, "--top-k", 8, "--limit", 3)
    assert r.exit_code == 0, r.output
    saved = json.loads((run / "eval.json").read_text())
    assert saved["data"]["samples"] == 3 and saved["cache"]["samples"] == 3
    assert f"{saved['data']['answer_ce']:.4f}" in r.output and f"wrote {run / 'eval.json'}" in r.output
    r = _run("report", run)
    assert r.exit_code == 0, r.output
    assert (run / "report.png").stat().st_size > 10_000 and (run / "report.md").exists()
    assert "Held-out (eval.json)" in r.output and f"{saved['cache']['answer_ce']:.4f}" in r.output


def test_errors_are_reported_not_raised(tmp_path, tiny_model_dir):
    r = _run("eval", "--model", tiny_model_dir)
    assert r.exit_code == 2 and "nothing to evaluate" in r.output
    r = _run("report", tmp_path)
    assert r.exit_code == 2 and "no metrics.jsonl" in r.output
