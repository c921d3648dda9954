"""Hostile caches against the commands that consume them: `train`, `eval`, `inspect` and `check`.

A cache is input from someone else, and the manifest's checksums and fingerprints are public formulas, so every
mutation here is resealed (`fusion_cache.testing`). The invariant (issue "Caches from strangers", item 8): each
command either accepts the cache (exit 0; for `train`, every logged loss finite) or refuses it with exit code 2 and
one line (no traceback), within a time bound. The reads themselves are fuzzed in
tests/fusion_cache/cache/test_validate.py; this file checks that every consumer keeps that promise end to end, on
real caches of each codec from the tiny model (a few dozen mutations, derandomized, so CI is reproducible).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fusion_cache.cli.main import app
from fusion_cache.testing import mutate_column
from fusion_cache.testing import mutate_manifest
from fusion_cache.testing import reseal_files
from fusion_cache.testing import rewrite
from fusion_cache.testing import set_value

CODECS = ("raw", "full", "values", "shape", "sampled")
SECONDS = 120  # a command that takes longer on these 6-row caches hangs
runner = CliRunner()


@contextmanager
def _deadline(seconds: int, what: str):
    """Fail (not hang) when the block runs longer than ``seconds`` (SIGALRM: the main thread, Linux)."""

    def fire(*_):
        raise TimeoutError(f"{what}: still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _run(*args) -> tuple[int, str]:
    with _deadline(SECONDS, " ".join(map(str, args[:1]))):
        r = runner.invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"{args[0]}: uncaught {type(r.exception).__name__}: {r.exception}") from r.exception
    return r.exit_code, r.output


def _accepted_or_refused_in_one_line(code: int, output: str, what: str) -> bool:
    """True when the command accepted the cache; asserts a refusal is one line (exit 2, no traceback)."""
    assert "Traceback" not in output, f"{what}: {output[-2000:]}"
    if code == 0:
        return True
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1, f"{what}: exit {code}: {output[-2000:]}"
    return False


def _consume(cache: Path, student: Path, work: Path, commands=("inspect", "check", "eval", "train")) -> dict:
    """Run each command on ``cache``; returns {command: accepted}. Asserts the invariant."""
    out = {}
    for cmd in commands:
        if cmd == "inspect":
            args = ("inspect", "--cache", cache)
        elif cmd == "check":
            args = ("check", "--student", student, cache)
        elif cmd == "eval":
            args = ("eval", "--model", student, "--cache", cache, "--out", work / "eval.json")
        else:
            shutil.rmtree(work / "run", ignore_errors=True)
            args = ("train", "--student", student, "--cache", cache, "--out", work / "run", "--kd-loss", "auto",
                    "--max-steps", 2, "--batch-size", 2, "--no-save")  # fmt: skip
        code, output = _run(*args)
        out[cmd] = _accepted_or_refused_in_one_line(code, output, f"{cmd} on {cache.name}")
        if cmd == "train" and out[cmd]:
            lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
            assert lines and all(math.isfinite(json.loads(x)["loss"]) for x in lines), lines
    return out


@pytest.fixture(scope="module")
def real_caches(tmp_path_factory, tiny_model_dir, data_file) -> dict[str, Path]:
    """One real cache per codec from the tiny Qwen2 teacher (HF engine, fp32, K=4 or N=4 draws, 3 rows a shard)."""
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig
    from fusion_cache.capture.engines.hf import HFEngine

    root = tmp_path_factory.mktemp("hostile-cli")
    engine = HFEngine(str(tiny_model_dir), dtype="float32")
    out = {}
    for codec in CODECS:
        extra = {"sampling": "rs", "samples": 4} if codec == "sampled" else {"codec": codec, "top_k": 4}
        cfg = BuildConfig.create(teacher=str(tiny_model_dir), data=str(data_file), out=str(root / codec), engine="hf",
                                 shard_rows=3, **extra)  # fmt: skip
        run_build(cfg, engine=engine, progress=False)
        out[codec] = root / codec
    return out


@pytest.mark.slow
@pytest.mark.parametrize("codec", CODECS)
def test_random_resealed_mutations_are_accepted_or_refused_in_one_line_by_every_command(
    codec, real_caches, tiny_model_dir, tmp_path
):
    """Four mutations per codec, one of each kind (shard bytes, truncation, a column value, a manifest field), each
    resealed, through inspect, check, eval and train. The intact cache is accepted by all four."""
    base = real_caches[codec]
    assert all(_consume(base, tiny_model_dir, tmp_path).values())
    shards = sorted(p.name for p in base.glob("shard-*.arrow"))
    rng = np.random.default_rng(1000 + CODECS.index(codec))
    verdicts = []
    for kind in ("bytes", "truncate", "column", "manifest"):
        work = tmp_path / kind
        shutil.copytree(base, work)
        shard = work / shards[rng.integers(0, len(shards))]
        if kind == "bytes":
            data = bytearray(shard.read_bytes())
            for _ in range(3):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
            shard.write_bytes(bytes(data))
            reseal_files(work)
        elif kind == "truncate":
            data = shard.read_bytes()
            shard.write_bytes(data[: rng.integers(0, len(data))])
            reseal_files(work)
        elif kind == "column":
            rewrite(work, batch=lambda b, s, i: mutate_column(b, rng) if (s, i) == (0, 0) else b)
        else:
            rewrite(work, manifest=lambda m: mutate_manifest(m, rng))
        verdicts.append(_consume(work, tiny_model_dir, tmp_path / f"{kind}-out"))
    # the mutations reach the refusals (a truncated shard is refused by every command that reads it)
    assert not all(verdicts[1].values()), verdicts


def _edit_rows(name, index, value):
    return lambda b, s, i: set_value(b, name, index, value) if (s, i) == (0, 0) else b


# the cases of the issue that reach train and eval, each refused by both, naming the field
NAMED = {
    "input id 10,000,000": (dict(batch=_edit_rows("input_ids", 1, 10_000_000)), "input_ids"),
    "input id -7": (dict(batch=_edit_rows("input_ids", 1, -7)), "input_ids"),
    "top-K id past the vocabulary": (dict(batch=_edit_rows("topk_ids", 0, 10**6)), "topk_ids"),
    "NaN teacher log-prob": (dict(batch=_edit_rows("topk_logprobs", 0, float("nan"))), "topk_logprobs"),
    "-inf teacher log-prob": (dict(batch=_edit_rows("topk_logprobs", 0, float("-inf"))), "topk_logprobs"),
    "log-prob above 0": (dict(batch=_edit_rows("topk_logprobs", 0, 0.5)), "topk_logprobs"),
    "NaN target log-prob": (dict(batch=_edit_rows("target_logprobs", 0, float("nan"))), "target_logprobs"),
    "stats.rows 10^15": (dict(manifest=lambda m: m["stats"].update(rows=10**15), counts=False), "stats.rows"),
    "stats.rows 0": (dict(manifest=lambda m: m["stats"].update(rows=0), counts=False), "stats.rows"),
    "a shard listed twice": (dict(manifest=lambda m: m["shards"].append(dict(m["shards"][0]))), "listed twice"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(NAMED))
def test_named_hostile_caches_are_refused_by_train_and_eval_in_one_line(case, real_caches, tiny_model_dir, tmp_path):
    edit, field = NAMED[case]
    cache = tmp_path / "cache"
    shutil.copytree(real_caches["raw"], cache)
    rewrite(cache, **edit)
    for args in (
        ("train", "--student", tiny_model_dir, "--cache", cache, "--out", tmp_path / "run", "--kd-loss", "kl",
         "--max-steps", 2, "--batch-size", 2, "--no-save"),
        ("eval", "--model", tiny_model_dir, "--cache", cache),
    ):  # fmt: skip
        code, output = _run(*args)
        assert not _accepted_or_refused_in_one_line(code, output, f"{args[0]}: {case}"), output[-1000:]
        assert field in output, output[-1000:]
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_a_symlinked_shard_is_refused_by_train_and_eval(real_caches, tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(real_caches["raw"], cache)
    name = json.loads((cache / "manifest.json").read_text())["shards"][0]["path"]
    outside = tmp_path / "elsewhere.arrow"
    shutil.move(cache / name, outside)
    (cache / name).symlink_to(outside)
    for args in (("train", "--student", tiny_model_dir, "--cache", cache, "--out", tmp_path / "run", "--max-steps", 1),
                 ("eval", "--model", tiny_model_dir, "--cache", cache)):  # fmt: skip
        code, output = _run(*args)
        assert not _accepted_or_refused_in_one_line(code, output, args[0]) and "symbolic link" in output
