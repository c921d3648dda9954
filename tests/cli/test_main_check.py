"""`fusion-cache check` through typer's CliRunner, and the check line `train` and `eval` print first."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from fusion_cache.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_check_prints_a_table_and_json(multi_caches, tiny_model_dir):
    a, b = multi_caches["a"], multi_caches["b"]
    r = _run("check", "--student", tiny_model_dir, a, b)
    assert r.exit_code == 0, r.output
    words = ("tiny-qwen2", "tiny-llama", "alignment", "index", "bytes", "losses refused", "rows aligned",
             "map coverage", "identity (the same tokenizer)", "8 checked (the whole join)")  # fmt: skip
    for w in words:
        assert w in r.output, w
    r = _run("check", "--student", tiny_model_dir, a, "--cache", b, "--kd-loss", "auto", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert [t["loss"] for t in report["teachers"]] == ["kl", "mapped_kl"]
    assert [t["alignment"] for t in report["teachers"]] == ["index", "bytes"]
    assert report["samples"]["checked"] == 8 and report["problems"] == []
    assert 0 < report["teachers"][1]["coverage"]["mapped_mass"] <= 1


def test_check_exits_2_on_an_impossible_combination(multi_caches, other_teacher_dir):
    r = _run("check", "--student", other_teacher_dir, multi_caches["a"], "--kd-loss", "kl")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("refused: kd_loss 'kl' for teacher tiny-qwen2")
    r = _run("check", "--student", other_teacher_dir, multi_caches["a"], "--kd-loss", "kl", "--json")
    assert r.exit_code == 2 and json.loads(r.output)["problems"][0].startswith("kd_loss 'kl'")
    r = _run("check", "--student", other_teacher_dir)
    assert r.exit_code == 2 and "give the caches" in r.output


def test_train_and_eval_print_the_check_first(tmp_path, built_cache, other_teacher_dir):
    # --mode single: a student of another tokenizer is paired by byte span there too (never silently by index)
    r = _run("train", "--mode", "single", "--student", other_teacher_dir, "--cache", built_cache, "--out",
             tmp_path / "run", "--max-steps", 1, "--batch-size", 2)  # fmt: skip
    assert r.exit_code == 0, r.output
    first = next(line for line in r.output.splitlines() if line.startswith("check: "))
    assert "tiny-qwen2: another tokenizer, bytes alignment, loss uld" in first
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["check"] == first and summary["fusion"]["align"]["tiny-qwen2"]["dropped_student"] > 0
    assert r.output.index("check: ") < r.output.index("trained 1 steps")
    r = _run("eval", "--model", tmp_path / "run", "--cache", built_cache, "--limit", 2)
    assert r.exit_code == 0, r.output
    assert "top-1 agreement not computed for tiny-qwen2" in r.output.splitlines()[0]
    r = _run("train", "--student", other_teacher_dir, "--cache", built_cache, "--out", tmp_path / "kl",
             "--kd-loss", "kl")  # fmt: skip
    assert r.exit_code == 2 and "error: kd_loss 'kl' for teacher tiny-qwen2" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "kl").exists()
