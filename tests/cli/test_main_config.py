"""`--config FILE.yaml`: a run's saved settings (config.yaml, and train's own train_config.json) replay it through
the command line, flags win over the file, and a bad file is refused with one line naming the key."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from fusion_cache.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _first_losses(run_dir, n=2) -> list[tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["ce"], r["kd"]) for r in rows[:n]]


def test_a_runs_saved_config_replays_it(tmp_path, tiny_model_dir, built_cache):
    first = tmp_path / "first"
    flags = ["--weight-decay", 0.01, "--warmup-ratio", 0.5, "--shuffle-buffer", 4, "--grad-clip", 0.5]
    flags += ["--dtype", "float32", "--loss-k", 4, "--lambda", 0.7, "--batch-size", 2, "--max-steps", 2]
    r = _run("train", "--student", tiny_model_dir, "--cache", built_cache, "--out", first, *flags)
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["weight_decay"] == 0.01 and saved["warmup_ratio"] == 0.5 and saved["shuffle_buffer"] == 4
    assert saved["grad_clip"] == 0.5 and saved["dtype"] == "float32" and saved["loss_k"] == 4
    assert saved["cache"] == [str(built_cache)] and saved["lambda"] == 0.7
    assert (first / "config.yaml").read_text().startswith("# resolved settings")
    for name in ("config.yaml", "train_config.json"):
        again = tmp_path / f"again-{name}"
        r = _run("train", "--config", first / name, "--out", again)  # the flag wins over the file's out
        assert r.exit_code == 0, r.output
        assert _first_losses(again) == _first_losses(first), name
        replayed = yaml.safe_load((again / "config.yaml").read_text())
        assert {**replayed, "out": saved["out"]} == saved


def test_flags_override_the_file_and_the_file_fills_required_options(tmp_path, tiny_model_dir, built_cache):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"student": str(tiny_model_dir), "cache": [str(built_cache)], "max_steps": 1,
                                   "batch_size": 2, "out": str(tmp_path / "from-file")}))  # fmt: skip
    r = _run("train", "--config", cfg, "--max-steps", 2)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((tmp_path / "from-file" / "config.yaml").read_text())["max_steps"] == 2
    assert "trained 2 steps" in r.output


def test_a_bad_file_is_one_line_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("student: s\nlearning_rate: 0.1\n")
    r = _run("train", "--config", cfg)
    assert r.exit_code == 2 and "unknown key 'learning_rate'" in r.output and "Traceback" not in r.output
    cfg.write_text("student: [unclosed\n")
    r = _run("train", "--config", cfg)
    assert r.exit_code == 2 and "not valid YAML at line" in r.output
    r = _run("train", "--config", tmp_path / "missing.yaml")
    assert r.exit_code == 2 and "cannot read it" in r.output


def test_fuse_reads_its_sections(tmp_path):
    cfg = tmp_path / "fuse.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"student": "s", "out": "x"}}))
    r = _run("fuse", "--config", cfg, "--cache", "a", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "train.out is not set here" in r.output
