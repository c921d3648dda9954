"""The CLI through typer's CliRunner: each command, and errors that exit 2 with a one-line message."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from fusion_cache.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_teachers_lists_presets():
    r = _run("teachers")
    assert r.exit_code == 0
    for name in ("smollm2-135m", "qwen-coder", "qwen-instruct", "mistral-small", "phi-4"):
        assert name in r.output
    assert "Qwen/Qwen2.5-Coder-14B-Instruct" in r.output


def test_build_license_meta_and_inspect(tmp_path, tiny_model_dir, data_file):
    cache, meta = tmp_path / "cache", tmp_path / "meta.json"
    meta.write_text(json.dumps({"project": "fusion"}))
    r = _run("build", "--teacher", tiny_model_dir, "--data", data_file, "--out", cache, "--engine", "hf", "--top-k", 4,
             "--license", "apache-2.0", "--meta", "team=nlp", "--meta", "run=7", "--meta-file", meta)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (cache / "README.md").read_text().startswith('---\nlicense: "apache-2.0"')
    r = _run("inspect", "--cache", cache)
    assert r.exit_code == 0 and "apache-2.0" in r.output
    assert '{"project": "fusion", "run": "7", "team": "nlp"}' in r.output
    r = _run("build", "--teacher", tiny_model_dir, "--data", data_file, "--out", cache, "--meta", "oops")
    assert r.exit_code == 2 and "meta: expected key=value, got 'oops'" in r.output


def test_build_inspect_verify_train(tmp_path, tiny_model_dir, data_file):
    cache = tmp_path / "cache"
    r = _run("build", "--teacher", tiny_model_dir, "--data", data_file, "--out", cache, "--engine", "hf", "--top-k", 8)
    assert r.exit_code == 0, r.output
    assert "4 kept of 5 read" in r.output and "skipped: empty_response 1" in r.output
    assert "bytes/answer token" in r.output and "answer tokens/s" in r.output
    again = _run("build", "--teacher", tiny_model_dir, "--data", data_file, "--out", cache, "--engine", "hf",
                 "--top-k", 8)  # fmt: skip
    assert again.exit_code == 0 and "nothing to do" in again.output and "answer tokens/s" not in again.output
    r = _run("inspect", cache)  # the positional cache of earlier releases: still read, with a warning
    assert "deprecated; use `fusion-cache inspect --cache CACHE`" in r.output
    assert r.exit_code == 0
    for key in (
        "teacher",
        "K / codec",
        "8 / raw",
        "answer tokens",
        "per answer token",
        "shard-00000-of-00001",
        "fingerprint",
    ):
        assert key in r.output
    assert json.loads(_run("inspect", "--cache", cache, "--json").output)["k"] == 8
    r = _run("verify", "--cache", cache)
    assert r.exit_code == 0 and "OK " in r.output
    r = _run(
        "train",
        "--student",
        tiny_model_dir,
        "--shards",
        cache,
        "--out",
        tmp_path / "run",
        "--max-steps",
        2,
        "--batch-size",
        2,
        "--top-k",
        8,
    )
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output and (tmp_path / "run" / "model" / "config.json").exists()
    # damage a shard: verify names it and exits 1
    shard = next(cache.glob("shard-*.arrow"))
    shard.write_bytes(shard.read_bytes()[:-10])
    r = _run("verify", "--cache", cache)
    assert r.exit_code == 1 and shard.name in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["build", "--teacher", "nope", "--data", "{data}", "--out", "{tmp}/o"],
            "unknown teacher 'nope'; known presets",
        ),
        (
            ["build", "--teacher", "{model}", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/o", "--engine", "hf"],
            "missing.jsonl: no such file",
        ),
        (["build", "--teacher", "{model}", "--data", "{data}", "--out", "{tmp}/o", "--top-k", "0"], "top_k"),
        (["build", "--teacher", "{model}", "--data", "{data}", "--out", "{tmp}/o", "--engine", "tgi"], "engine"),
        (["inspect", "{tmp}"], "not a fusion-cache directory"),
        (["train", "--student", "{model}", "--shards", "{tmp}", "--out", "{tmp}/r"], "not a fusion-cache directory"),
    ],
)
def test_errors_exit_2_with_a_clear_message(tmp_path, tiny_model_dir, data_file, args, message):
    args = [a.format(data=data_file, tmp=tmp_path, model=tiny_model_dir) for a in args]
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_build_and_train_from_an_fsspec_url(tmp_path, tiny_model_dir, data_file):
    # `--shards` must stay a string: a Path would turn memory://x into memory:/x
    url = "memory://cli-tests/cache"
    r = _run("build", "--teacher", tiny_model_dir, "--data", data_file, "--out", url, "--engine", "hf", "--top-k", 8)
    assert r.exit_code == 0, r.output
    assert "OK " in _run("verify", "--cache", url).output
    args = ["--student", tiny_model_dir, "--shards", url, "--out", tmp_path / "run", "--max-steps", 1, "--top-k", 8]
    r = _run("train", *args)
    assert r.exit_code == 0, r.output
    assert "trained 1 steps" in r.output


@pytest.mark.slow
@pytest.mark.slow
def test_build_sampled_inspect_and_train_rs_kl(tmp_path, tiny_model_dir, data_file):
    """The RS-KD route end to end: a sampled build, its bytes per answer token in inspect, train --kd-loss rs_kl."""
    cache = tmp_path / "rs"
    r = _run("build", "--teacher", tiny_model_dir, "--data", data_file, "--out", cache, "--engine", "hf",
             "--sampling", "rs", "--samples", 8, "--seed", 3)  # fmt: skip
    assert r.exit_code == 0, r.output
    r = _run("inspect", "--cache", cache)
    assert r.exit_code == 0 and "sampled" in r.output, r.output
    r = _run("train", "--student", tiny_model_dir, "--cache", cache, "--out", tmp_path / "run", "--kd-loss", "rs_kl",
             "--kd-temperature", 2, "--max-steps", 2, "--batch-size", 2, "--no-save")  # fmt: skip
    assert r.exit_code == 0, r.output
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rec and all("rs_kl" in key for key in rec[0] if key.startswith("rs_kl"))
    r = _run("train", "--student", tiny_model_dir, "--cache", cache, "--out", tmp_path / "bad", "--kd-loss", "kl")
    assert r.exit_code == 2 and "its cache holds tokens sampled from the teacher" in r.output, r.output


def test_train_with_two_teachers_reports_join_and_alignment(tmp_path, tiny_model_dir, multi_caches):
    r = _run(
        "train", "--student", tiny_model_dir, "--shards", multi_caches["a"], "--shards", multi_caches["b"],
        "--out", tmp_path / "u", "--combine", "sum", "--max-steps", 2, "--batch-size", 2, "--top-k", 6,
        "--kd-loss", "kl", "--kd-loss", "uld",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "joined" in r.output and "tiny-llama: 3" in r.output and "aligned" in r.output
    assert "tiny-qwen2: last kl" in r.output and "tiny-llama: last uld" in r.output
    cfg = json.loads((tmp_path / "u" / "train_config.json").read_text())
    assert (cfg["combine"], cfg["align"], cfg["kd_loss"]) == ("sum", "bytes", ["kl", "uld"])
    r = _run("train", "--mode", "single", "--student", tiny_model_dir, "--shards", multi_caches["a"], "--shards",
             multi_caches["b"], "--out", tmp_path / "s")  # fmt: skip
    assert r.exit_code == 2 and "--mode single takes one cache, got 2" in r.output
    r = _run("train", "--student", tiny_model_dir, "--shards", multi_caches["a"], "--shards", multi_caches["b"],
             "--out", tmp_path / "k", "--kd-loss", "kl", "--kd-loss", "uld", "--kd-loss", "kl")  # fmt: skip
    assert r.exit_code == 2 and "one per cache (2), got 3" in r.output


def test_demo_refuses_an_unknown_kd_loss(tmp_path):
    r = _run("demo", "--out", tmp_path / "d", "--kd-loss", "mse")
    assert r.exit_code == 2 and "--kd-loss: unknown value(s) ['mse']" in r.output


def test_demo_second_teacher_options():
    from fusion_cache.cli.main import demo_settings

    s = demo_settings(False, None, "gemma3-270m", None)
    assert s.second_teacher == "gemma3-270m" and s.combines == ("mean",) and s.kd_losses == ("kl",)
    s = demo_settings(True, ["uld"], "gemma3-270m", ["sum", "uncertainty", "sum"])
    assert s.combines == ("sum", "uncertainty") and s.kd_losses == ("uld",) and s.steps == 3  # --quick kept
    assert demo_settings(False, None, None, None).second_teacher is None  # the default demo: one teacher
    assert demo_settings(False, None, None, None).kd_gate == "none"
    assert demo_settings(True, None, "gemma3-270m", None, "student").kd_gate == "student"


def test_demo_refuses_an_unknown_kd_gate(tmp_path):
    r = _run("demo", "--out", tmp_path / "d", "--kd-gate", "teacher")
    assert r.exit_code == 2 and "--kd-gate" in r.output and not (tmp_path / "d").exists()


def test_demo_refuses_bad_second_teacher_options(tmp_path):
    r = _run("demo", "--out", tmp_path / "d", "--combine", "sum")
    assert r.exit_code == 2 and "unified runs need a --second-teacher" in r.output
    r = _run("demo", "--out", tmp_path / "d", "--second-teacher", "gemma3-270m", "--combine", "max")
    assert r.exit_code == 2 and "combines: unknown or no value(s) ['max']" in r.output
    r = _run("demo", "--out", tmp_path / "d", "--second-teacher", "smollm2-135m")
    assert r.exit_code == 2 and "is the demo's teacher already" in r.output
    assert not (tmp_path / "d").exists()  # refused before anything ran


def test_coverage_reports_where_the_teachers_mass_goes(multi_caches, tiny_model_dir):
    r = _run("coverage", "--cache", multi_caches["b"], "--student", tiny_model_dir)
    assert r.exit_code == 0, r.output
    assert "teacher top-K mass: exact" in r.output and "inside a teacher token" in r.output
    as_json = _run("coverage", "--cache", multi_caches["b"], "--student", tiny_model_dir, "--json").output
    assert json.loads(as_json)["samples"] == 5
    r = _run("coverage", "--cache", multi_caches["a"], "--student", tiny_model_dir)
    assert r.exit_code == 2 and "every token maps to itself" in r.output


def test_keygen_sign_and_verify_with_a_trusted_key(tmp_path, synthetic_caches, reseal):
    pytest.importorskip("cryptography")
    cache = tmp_path / "cache"
    shutil.copytree(synthetic_caches["full"], cache)
    assert _run("keygen", "--out", tmp_path / "team").exit_code == 0
    pub = tmp_path / "team.pub"
    r = _run("verify", "--cache", cache, "--trusted-key", pub)
    assert r.exit_code == 1 and "no valid signature of a trusted key" in r.output
    r = _run("sign", "--cache", cache, "--key", tmp_path / "team")
    assert r.exit_code == 0 and r.output.startswith("signed ")
    r = _run("verify", "--cache", cache, "--trusted-key", pub)
    assert r.exit_code == 0 and "signed by key" in r.output

    def drop_last_shard(m):  # a smaller cache whose every count, checksum and fingerprint agrees again
        import pyarrow as pa

        last = m["shards"].pop()
        ids = pa.ipc.open_stream(pa.memory_map(str(cache / last["path"]))).read_all().column("input_ids")
        st = m["stats"]
        st["rows"] -= last["rows"]
        st["answer_tokens"] -= last["answer_tokens"]
        st["tokens"] -= sum(len(x) for x in ids.to_pylist())
        st["skipped"]["empty_response"] += last["rows"]

    reseal(cache, edit=drop_last_shard)
    assert _run("verify", "--cache", cache).exit_code == 0  # consistent: only the signature tells
    r = _run("verify", "--cache", cache, "--trusted-key", pub)
    assert r.exit_code == 1 and "changed after it was signed" in r.output
