"""Progress bars of the command line: `generate`, `eval`, `verify` and `train` draw theirs on stderr (tqdm), the
library functions draw none unless asked (``progress=False`` is their default), transformers' "Loading weights" bar
stays hidden without ``-v``, and the train bar's tokens/s is a real rate, not 0.

The GGUF conversion's bar is tested with the conversion (tests/fusion_cache/models/test_convert.py).
"""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fusion_cache.cli.main import app

runner = CliRunner()

# tqdm's last redraw of a finished bar, e.g. "verify: 100%|██████████| 1/1 [00:00<00:00, 52.1shard/s]"
_DONE = r"{desc}: 100%\|[^|]*\| {n}/{n} \[[^\]]*(?:{unit}/s|s/{unit})"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _finished(stderr: str, desc: str, n: int, unit: str) -> bool:
    return re.search(_DONE.format(desc=re.escape(desc), n=n, unit=unit), stderr) is not None


def test_generate_draws_a_bar_over_the_prompts(tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "answers.jsonl"
    r = _run("generate", "--model", tiny_model_dir, "--data", data_file, "--out", out, "--engine", "hf",
             "--max-new-tokens", 2, "--limit", 3)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _finished(r.stderr, "generate", 3, "prompt"), r.stderr
    assert "Loading weights" not in r.stderr  # transformers' own bar: only with -v
    assert "generate:" not in r.stdout  # stdout keeps the result line alone


def test_eval_draws_a_bar_over_the_samples(tmp_path, tiny_model_dir, data_file, built_cache):
    r = _run("eval", "--model", tiny_model_dir, "--data", data_file, "--cache", built_cache, "--loss-k", 8,
             "--limit", 2, "--out", tmp_path / "eval.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _finished(r.stderr, "eval rows", 2, "sample") and _finished(r.stderr, "eval cache", 2, "sample"), r.stderr
    assert "Loading weights" not in r.stderr


def test_verify_draws_a_bar_over_the_shards(built_cache):
    from fusion_cache.cache.manifest import load_manifest

    r = _run("verify", "--cache", built_cache)
    assert r.exit_code == 0, r.output
    n = len(load_manifest(built_cache).shards)
    assert _finished(r.stderr, "verify", n, "shard"), r.stderr


def test_train_bar_shows_a_positive_token_rate(tmp_path, tiny_model_dir, built_cache):
    r = _run("train", "--student", tiny_model_dir, "--cache", built_cache, "--out", tmp_path / "run",
             "--max-steps", 3, "--batch-size", 2, "--loss-k", 4)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert _finished(r.stderr, "train λ=0.5", 3, "step"), r.stderr
    rates = re.findall(r"tok_s=([0-9.]+)(k?)", r.stderr)
    assert rates, r.stderr
    value, kilo = rates[-1]
    assert float(value) * (1000 if kilo else 1) > 0


@pytest.mark.parametrize("what", ["generate", "eval", "verify"])
def test_the_library_draws_no_bar_unless_asked(what, tmp_path, tiny_model_dir, data_file, built_cache, capfd):
    if what == "generate":
        from fusion_cache.capture.generate import run_generate

        run_generate(model=str(tiny_model_dir), data=str(data_file), out=str(tmp_path / "a.jsonl"), engine="hf",
                     max_tokens=2, limit=2)  # fmt: skip
    elif what == "eval":
        from fusion_cache.eval.evaluate import run_eval

        run_eval(str(tiny_model_dir), data=str(data_file), limit=2)
    else:
        from fusion_cache.cache.reader import CacheReader

        assert CacheReader(str(built_cache)).verify() == []
    err = capfd.readouterr().err
    assert not re.search(r"(generate|eval rows|verify): +\d+%", err), err
