"""`run_generate`: answers written by a model become `build` input; sampling is seeded; bad rows fail first."""

from __future__ import annotations

import json

import pytest

from fusion_cache.capture.build import run_build
from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.generate import read_prompts
from fusion_cache.capture.generate import run_generate
from fusion_cache.errors import ConfigError
from fusion_cache.errors import DataError

PROMPTS = [
    {"prompt": "What is 2+2?"},
    {"system": "Be brief.", "prompt": "Say hi", "response": "an old answer, replaced"},
    {"messages": [{"role": "user", "content": "def f(x):"}]},
]


def _gen(tiny_model_dir, data, out, hf_engine, **kw):
    settings = dict(model=str(tiny_model_dir), data=str(data), out=str(out), engine="hf", max_tokens=4)
    return run_generate(**{**settings, **kw}, engine_obj=hf_engine)


def test_generated_answers_are_build_input(tmp_path, tiny_model_dir, hf_engine, write_jsonl):
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "r.jsonl"
    meta = _gen(tiny_model_dir, data, out, hf_engine, n=2, temperature=1.0, seed=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert meta["rows_written"] == 6 and meta["sampling"] == {"max_tokens": 4, "temperature": 1.0, "n": 2, "seed": 3}
    assert [(r["source_row"], r["sample"]) for r in rows] == [(i, j) for i in range(3) for j in range(2)]
    assert rows[2]["messages"][:2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi"},
    ]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert rows[2]["messages"][-1]["content"] != "an old answer, replaced"
    assert json.loads((tmp_path / "r.jsonl.meta.json").read_text())["model"]["engine"] == "hf"
    # seeded: the same seed gives the same answers, another seed other ones
    again = tmp_path / "again.jsonl"
    _gen(tiny_model_dir, data, again, hf_engine, n=2, temperature=1.0, seed=3)
    assert again.read_text() == out.read_text()
    other = tmp_path / "other.jsonl"
    _gen(tiny_model_dir, data, other, hf_engine, n=2, temperature=1.0, seed=4)
    assert other.read_text() != out.read_text()
    m = run_build(
        BuildConfig.create(teacher=str(tiny_model_dir), data=str(out), out=str(tmp_path / "c"), engine="hf", top_k=4),
        engine=hf_engine,
        progress=False,
    )
    assert m.stats.rows + m.stats.skipped["empty_response"] == 6
    # the sampling settings reach the manifest (and the card) of a cache built from generate's output
    assert m.answers.source == "generate" and m.answers.model == tiny_model_dir.name
    assert (m.answers.temperature, m.answers.n, m.answers.seed, m.answers.max_new_tokens) == (1.0, 2, 3, 4)
    assert "sampled by `fusion-cache generate`" in (tmp_path / "c" / "README.md").read_text()
    # rows edited after generate: its settings no longer describe them
    out.write_text(out.read_text().replace('"sample": 0', '"sample": 9', 1))
    cfg = BuildConfig.create(teacher=str(tiny_model_dir), data=str(out), out=str(tmp_path / "d"), engine="hf", top_k=4)
    assert run_build(cfg, engine=hf_engine, progress=False).answers.source == "dataset"


def test_greedy_samples_agree(tmp_path, tiny_model_dir, hf_engine, write_jsonl):
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    _gen(tiny_model_dir, data, tmp_path / "r.jsonl", hf_engine, n=2, temperature=0.0)
    a, b = [json.loads(line)["messages"][-1] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert a == b


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_samples_n_answers(tmp_path, tiny_model_dir, vllm_engine, write_jsonl):
    data = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "r.jsonl"
    meta = run_generate(
        model=str(tiny_model_dir), data=str(data), out=str(out), max_tokens=4, n=2, engine_obj=vllm_engine
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert meta["model"]["engine"] == "vllm" and len(rows) == 6
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_bad_rows_and_settings_fail_before_the_model(tmp_path, tiny_model_dir, write_jsonl):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: messages\[0\]\.role must be one of"):
        read_prompts(str(bad))

    class Unused:
        def generate(self, *a, **k):
            raise AssertionError("the model must not run")

    ok = write_jsonl(tmp_path / "ok.jsonl", PROMPTS)
    (tmp_path / "exists.jsonl").write_text("keep")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        run_generate(model=str(tiny_model_dir), data=str(ok), out=str(tmp_path / "exists.jsonl"), engine_obj=Unused())
    with pytest.raises(ConfigError, match="--n: must be >= 1, got 0"):
        run_generate(model=str(tiny_model_dir), data=str(ok), out=str(tmp_path / "o.jsonl"), n=0, engine_obj=Unused())
    assert (tmp_path / "exists.jsonl").read_text() == "keep"


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
