"""`run_build`: what a cache records, how bad input and existing outputs are handled, and that nothing is lost."""

from __future__ import annotations

import json
import os

import pytest

from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.schema import SCHEMA_VERSION
from fusion_cache.capture.build import run_build
from fusion_cache.capture.config import BuildConfig
from fusion_cache.errors import ConfigError
from fusion_cache.errors import DataError


def _cfg(tiny_model_dir, data, out, **kw):
    settings = {"teacher": str(tiny_model_dir), "data": str(data), "out": str(out), "engine": "hf", "top_k": 8}
    return BuildConfig.create(**{k: v for k, v in {**settings, **kw}.items() if v is not None})


def test_manifest_records_provenance(built_cache, tiny_model_dir):
    m = load_manifest(built_cache)
    assert m.teacher.engine == "hf" and m.teacher.dtype == "float32"
    assert m.teacher.revision.startswith("local-") and len(m.teacher.tokenizer_hash) == 64
    assert m.k == 8 and m.codec == {"name": "raw"} and m.schema_version == SCHEMA_VERSION
    assert m.dataset.rows_read == 5 and len(m.dataset.hash) == 64
    assert m.stats.skipped == {"empty_response": 1, "overlong": 0, "no_answer_after_truncation": 0}
    assert m.stats.payload_bytes == sum(s.bytes for s in m.shards)
    assert not (built_cache.parent / (built_cache.name + ".incomplete")).exists()


def test_overlong_rows_truncate_or_skip(tmp_path, tiny_model_dir, data_file, hf_engine):
    trunc = run_build(_cfg(tiny_model_dir, data_file, tmp_path / "t", max_length=40), engine=hf_engine, progress=False)
    skip = run_build(
        _cfg(tiny_model_dir, data_file, tmp_path / "s", max_length=40, overlong="skip"),
        engine=hf_engine,
        progress=False,
    )
    assert trunc.stats.truncated >= 1 and skip.stats.skipped["overlong"] == trunc.stats.truncated
    assert skip.stats.rows == trunc.stats.rows - trunc.stats.truncated
    assert all(len(r.input_ids) <= 40 for r in CacheReader(tmp_path / "t").iter_rows())


def test_prompt_longer_than_max_length_is_skipped_and_counted(tmp_path, tiny_model_dir, hf_engine, write_jsonl):
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "word " * 200, "response": "ok"}, {"prompt": "p", "response": "r"}]
    )
    m = run_build(_cfg(tiny_model_dir, data, tmp_path / "o", max_length=64), engine=hf_engine, progress=False)
    assert m.stats.rows == 1 and m.stats.skipped["no_answer_after_truncation"] == 1


def test_same_build_is_reused_and_different_cache_refused(tmp_path, tiny_model_dir, data_file, hf_engine):
    out = tmp_path / "c"
    first = run_build(_cfg(tiny_model_dir, data_file, out), engine=hf_engine, progress=False)
    again = run_build(_cfg(tiny_model_dir, data_file, out), engine=hf_engine, progress=False)
    assert again.created_at == first.created_at  # not rebuilt
    with pytest.raises(ConfigError, match="holds a different cache; pass --overwrite"):
        run_build(
            BuildConfig.create(**{**_cfg(tiny_model_dir, data_file, out).model_dump(), "top_k": 4}), engine=hf_engine
        )
    replaced = run_build(
        _cfg(tiny_model_dir, data_file, out, overwrite=True).model_copy(update={"top_k": 4}),
        engine=hf_engine,
        progress=False,
    )
    assert replaced.k == 4 and load_manifest(out).k == 4


def test_non_cache_directory_is_not_clobbered(tmp_path, tiny_model_dir, data_file, hf_engine):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty and holds no cache"):
        run_build(_cfg(tiny_model_dir, data_file, out), engine=hf_engine)
    assert (out / "notes.txt").read_text() == "keep me"


def test_malformed_row_fails_before_any_capture_and_keeps_the_old_cache(
    tmp_path, tiny_model_dir, data_file, hf_engine, write_jsonl
):
    out = tmp_path / "c"
    run_build(_cfg(tiny_model_dir, data_file, out), engine=hf_engine, progress=False)
    before = (out / "manifest.json").read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, '{"prompt": oops}'])

    class Exploding:
        name, dtype = "hf", "float32"

        def capture(self, *a, **k):
            raise AssertionError("the engine must not run on invalid input")

    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        run_build(_cfg(tiny_model_dir, bad, out, overwrite=True), engine=Exploding())
    assert (out / "manifest.json").read_text() == before


def test_crash_during_capture_keeps_the_old_cache(tmp_path, tiny_model_dir, data_file, hf_engine):
    out = tmp_path / "c"
    run_build(_cfg(tiny_model_dir, data_file, out), engine=hf_engine, progress=False)
    before = json.loads((out / "manifest.json").read_text())

    class Dying:
        name, dtype = "hf", "float32"

        def capture(self, requests, k):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_build(_cfg(tiny_model_dir, data_file, out, overwrite=True, top_k=4), engine=Dying(), progress=False)
    assert json.loads((out / "manifest.json").read_text()) == before
    assert CacheReader(out).verify() == []


def test_unknown_teacher_lists_presets(tmp_path, data_file):
    cfg = BuildConfig.create(teacher="no-such-teacher", data=str(data_file), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"unknown teacher 'no-such-teacher'; known presets: \[.*smollm2-135m"):
        run_build(cfg)


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"top_k: .*greater than or equal to 2.*got 0"):
        BuildConfig.create(teacher="t", data="d", out="o", top_k=0)
    with pytest.raises(ConfigError, match=r"colour: Extra inputs are not permitted"):
        BuildConfig.create(teacher="t", data="d", out="o", colour="red")


@pytest.mark.slow
@pytest.mark.vllm
def test_hf_and_vllm_builds_agree(tmp_path, tiny_model_dir, data_file, hf_engine, vllm_engine):
    """The two engines write the same cache up to fp32 noise: same tokens, same top-K ids, log-probs within 1e-4."""
    a = run_build(_cfg(tiny_model_dir, data_file, tmp_path / "hf"), engine=hf_engine, progress=False)
    b_cfg = BuildConfig.create(teacher=str(tiny_model_dir), data=str(data_file), out=str(tmp_path / "v"), top_k=8)
    b = run_build(b_cfg, engine=vllm_engine, progress=False)
    assert a.config_fingerprint != b.config_fingerprint  # the engine is part of the provenance
    overlap = total = 0
    for ra, rb in zip(CacheReader(tmp_path / "hf").iter_rows(), CacheReader(tmp_path / "v").iter_rows(), strict=True):
        assert (ra.input_ids == rb.input_ids).all()
        for ia, ib in zip(ra.topk_ids, rb.topk_ids, strict=True):
            overlap += len(set(ia.tolist()) & set(ib.tolist()))
            total += len(ia)
        assert abs(ra.topk_logprobs - rb.topk_logprobs).max() < 1e-4
        assert abs(ra.target_logprobs - rb.target_logprobs).max() < 1e-4
    assert overlap / total >= 0.99


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_rows_are_cut_at_the_longest_sequence_the_engine_takes(tmp_path, tiny_model_dir, hf_engine, write_jsonl):
    # the tiny teacher has 2048 positions, the most the hf engine scores (capture/test_teacher.py)
    rows = [{"prompt": "p", "response": "word " * 2500}, {"prompt": "p", "response": "r"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    m = run_build(_cfg(tiny_model_dir, data, tmp_path / "o", max_length=4096), engine=hf_engine, progress=False)
    assert m.stats.truncated == 1 and m.max_length == 4096
    assert [len(r.input_ids) for r in CacheReader(tmp_path / "o").iter_rows()][0] == 2048
    skip = run_build(
        _cfg(tiny_model_dir, data, tmp_path / "s", max_length=4096, overlong="skip"), engine=hf_engine, progress=False
    )
    assert skip.stats.rows == 1 and skip.stats.skipped["overlong"] == 1


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_build_cuts_a_row_as_long_as_the_teachers_positions(tmp_path, tiny_model_dir, write_jsonl) -> None:
    pytest.importorskip("vllm")
    # 2048 tokens would need max_model_len 2049 > the tiny teacher's 2048 positions, which vLLM refuses at start-up
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "word " * 2500}])
    m = run_build(
        _cfg(tiny_model_dir, data, tmp_path / "o", max_length=4096, engine="vllm", dtype="float32"), progress=False
    )
    assert m.stats.truncated == 1 and m.teacher.engine == "vllm"
    assert [len(r.input_ids) for r in CacheReader(tmp_path / "o").iter_rows()] == [2047]


def test_manifest_and_card_hold_no_local_paths(tmp_path, tiny_model_dir, data_file, hf_engine):
    m = run_build(_cfg(tiny_model_dir, data_file, tmp_path / "c", meta=["team=nlp"]), engine=hf_engine, progress=False)
    assert m.teacher.name == m.teacher.model == tiny_model_dir.name and m.teacher.revision.startswith("local-")
    assert m.dataset.source == data_file.name and len(m.dataset.hash) == 64
    for name in ("manifest.json", "README.md"):
        text = (tmp_path / "c" / name).read_text()
        for path in ("/tmp", str(tmp_path), str(tiny_model_dir.parent), os.path.expanduser("~")):
            assert path not in text, (name, path)
    assert m.meta == {"team": "nlp"} and "team" in (tmp_path / "c" / "README.md").read_text()
    # training finds the local teacher's tokenizer by the hash the manifest records (train/vocab.py)
    from fusion_cache.capture.render import tokenizer_hash
    from fusion_cache.models.load import load_stored_tokenizer

    assert tokenizer_hash(load_stored_tokenizer(m.teacher.tokenizer_hash)) == m.teacher.tokenizer_hash


def test_license_comes_from_the_preset_or_the_flag(tmp_path, tiny_model_dir, data_file, hf_engine):
    from fusion_cache.models.presets import PRESETS

    assert PRESETS["smollm2-135m"].license == "apache-2.0" and "gemma/terms" in PRESETS["gemma3-270m"].license
    assert all(p.license for p in PRESETS.values())
    m = run_build(_cfg(tiny_model_dir, data_file, tmp_path / "c", license="mit"), engine=hf_engine, progress=False)
    assert m.license == "mit" and 'license: "mit"' in (tmp_path / "c" / "README.md").read_text()


def test_meta_flags_and_file_are_checked(tmp_path, tiny_model_dir, data_file):
    f = tmp_path / "meta.json"
    f.write_text(json.dumps({"team": "a", "run": {"id": 3}}))
    cfg = _cfg(tiny_model_dir, data_file, tmp_path / "c", meta_file=str(f), meta=["team=b"])
    assert cfg.meta_block == {"team": "b", "run": {"id": 3}}  # a flag overrides the file's field
    with pytest.raises(ConfigError, match="meta: expected key=value, got 'oops'"):
        _cfg(tiny_model_dir, data_file, tmp_path / "c", meta=["oops"])
    f.write_text("[1]")
    with pytest.raises(ConfigError, match="meta_file: .* must hold a JSON object"):
        _cfg(tiny_model_dir, data_file, tmp_path / "c", meta_file=str(f))


def test_sampled_build_is_byte_identical_and_records_its_draws(tmp_path, tiny_model_dir, data_file, hf_engine):
    """--sampling rs: the same build twice writes the same bytes (the draws depend on the seed, the sample id and
    the position only); the codec entry records N and the seed, so another seed is another fingerprint."""
    from fusion_cache.capture.build import build_summary

    runs = {}
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        cfg = _cfg(tiny_model_dir, data_file, tmp_path / name, top_k=None, sampling="rs", samples=6, seed=seed,
                   shard_rows=2)  # fmt: skip
        runs[name] = run_build(cfg, engine=hf_engine, progress=False)
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.codec == {"name": "sampled", "samples": 6, "seed": 4, "id_bytes": 2, "zstd_level": 16} and a.k == 6
    assert a.fingerprint == b.fingerprint and a.fingerprint != c.fingerprint
    for s in a.shards:
        assert (tmp_path / "a" / s.path).read_bytes() == (tmp_path / "b" / s.path).read_bytes()
    assert "bytes/answer token (sampled codec, K=6)" in build_summary(a, str(tmp_path / "a"))
    reader = CacheReader(tmp_path / "a")
    assert reader.verify() == []
    rows = list(reader.iter_rows())
    assert all((r.sample_counts.astype(int).sum(1) == 6).all() for r in rows)
    other = list(CacheReader(tmp_path / "c").iter_rows())
    assert any(not (x.topk_ids == y.topk_ids).all() for x, y in zip(rows, other, strict=True))


def test_sampling_settings_are_checked_in_one_line():
    base = {"teacher": "t", "data": "d", "out": "o"}
    cfg = BuildConfig.create(**base, sampling="rs")
    assert (cfg.samples, cfg.codec, cfg.top_k, cfg.seed) == (12, "sampled", 12, 0)
    assert BuildConfig.create(**cfg.model_dump()) == cfg  # config.yaml replays
    assert BuildConfig.create(**base).codec == "raw"  # top-K builds are untouched
    for kw, match in (
        ({"sampling": "rs", "samples": 1}, r"samples: must be in \[2, 255\] \(a count is one byte\), got 1"),
        ({"sampling": "rs", "samples": 1000}, r"samples: must be in \[2, 255\]"),
        ({"samples": 12}, "samples=12 needs sampling='rs'"),
        ({"seed": 3}, "seed=3 needs sampling='rs'"),
        ({"codec": "sampled"}, "add --sampling rs"),
        ({"sampling": "rs", "codec": "full"}, "codec='full' with sampling='rs'"),
        ({"sampling": "rs", "top_k": 64}, "top_k=64 with sampling='rs'"),
    ):
        with pytest.raises(ConfigError, match=match) as info:
            BuildConfig.create(**base, **kw)
        assert str(info.value).count("\n") == 1  # "invalid settings:" and the one problem
