"""Distributed builds: parts split the input deterministically and combine into one verifiable cache that holds the
rows of a single build, in the same order."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest

from fusion_cache.cache.card import CARD_NAME
from fusion_cache.cache.card import render_card
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.parts import combine_parts
from fusion_cache.cache.parts import part_rows
from fusion_cache.cache.reader import CacheReader
from fusion_cache.capture.build import run_build
from fusion_cache.capture.config import BuildConfig
from fusion_cache.cli.main import app
from fusion_cache.errors import ConfigError
from fusion_cache.errors import FingerprintError
from fusion_cache.errors import ShardFormatError


def _cfg(model, data, out, **kw) -> BuildConfig:
    base = dict(teacher=str(model), data=str(data), out=str(out), engine="hf", top_k=8, shard_rows=2)
    return BuildConfig.create(**{**base, **kw})


@pytest.mark.parametrize("n_rows", [0, 1, 5, 7, 100])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_part_ranges_tile_the_input(n_rows, count):
    ranges = [part_rows(n_rows, i, count) for i in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_part_index_out_of_range_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="shard_index: .*must be < num_shards=3, got 3"):
        BuildConfig.create(teacher="t", data="d", out="o", num_shards=3, shard_index=3)
    with pytest.raises(ConfigError, match=r"--shard-index: must be in \[0, 2\), got 5"):
        part_rows(10, 5, 2)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, data_file, hf_engine) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    run_build(_cfg(tiny_model_dir, data_file, out), engine=hf_engine, progress=False)
    return out


@pytest.fixture(scope="module")
def combined(tmp_path_factory, tiny_model_dir, data_file, hf_engine) -> Path:
    """3 parts of the 5 conftest rows (rows 0, 1-2, 3-4), built one after the other into one --out."""
    out = tmp_path_factory.mktemp("parts") / "cache"
    for i in (2, 0):
        m = run_build(_cfg(tiny_model_dir, data_file, out, num_shards=3, shard_index=i), engine=hf_engine)
        assert m.part.index == i and m.part.count == 3
        assert not (out / "manifest.json").exists()  # not all parts are finished: no combined manifest yet
    run_build(_cfg(tiny_model_dir, data_file, out, num_shards=3, shard_index=1), engine=hf_engine, progress=False)
    return out


def _rows(path):
    return list(CacheReader(path).iter_rows())


def test_parts_combine_into_the_rows_of_a_single_build(single, combined):
    m, s = load_manifest(combined), load_manifest(single)
    assert [p.path for p in m.parts] == [f"part-0000{i}-of-00003" for i in range(3)]
    assert [(p.row_start, p.row_end) for p in m.parts] == [(0, 1), (1, 3), (3, 5)]
    assert m.config_fingerprint == s.config_fingerprint  # the same settings as the single build
    assert m.stats.model_dump(exclude={"wall_seconds", "payload_bytes"}) == s.stats.model_dump(
        exclude={"wall_seconds", "payload_bytes"}
    )
    assert m.stats.skipped["empty_response"] == 1  # row 2 (in part 1), counted once
    assert all(sh.path.startswith("part-0000") for sh in m.shards)
    a, b = _rows(combined), _rows(single)
    assert [r.sample_id for r in a] == [r.sample_id for r in b]  # same rows, same order, none twice
    assert [r.row_index for r in a] == [0, 1, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.input_ids, y.input_ids) and x.answer_start == y.answer_start
        assert np.array_equal(x.topk_ids, y.topk_ids)  # the engine batches differ: values agree to fp32 noise
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-4)
    assert CacheReader(combined).verify() == []


def test_each_part_is_a_cache_of_its_own(combined):
    part = combined / "part-00001-of-00003"
    m = load_manifest(part)
    assert m.part.model_dump() == {"index": 1, "count": 3, "row_start": 1, "row_end": 3}
    assert m.stats.rows == 1 and m.stats.skipped["empty_response"] == 1
    assert CacheReader(part).verify() == []


def test_part_builds_are_idempotent_and_combine_is_repeatable(combined, tiny_model_dir, data_file, hf_engine):
    before = (combined / "manifest.json").read_bytes()
    again = run_build(_cfg(tiny_model_dir, data_file, combined, num_shards=3, shard_index=0), engine=hf_engine)
    assert again.part.index == 0
    assert combine_parts(str(combined)).fingerprint == load_manifest(combined).fingerprint
    assert (combined / "manifest.json").read_bytes() == before  # every finisher writes the same bytes


def test_combine_writes_the_card_of_the_combined_cache(combined, single):
    m = load_manifest(combined)
    card = (combined / CARD_NAME).read_text()
    assert card == render_card(m) and "part-00000-of-00003/shard-00000-of-00001.arrow" in card
    assert m.license == load_manifest(single).license and m.answers.source == "dataset"
    assert m.content is not None and not m.content.exact and "(mean of the parts')" in card
    (combined / CARD_NAME).unlink()
    combine_parts(str(combined))  # `fusion-cache combine` writes it again
    assert (combined / CARD_NAME).read_text() == card


def test_verify_finds_a_damaged_part(combined, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(combined, copy)
    shard = copy / load_manifest(copy).shards[-1].path
    shard.write_bytes(shard.read_bytes()[:-8])
    problems = CacheReader(copy).verify()
    assert any("part-00002-of-00003/shard-" in p for p in problems)
    # a part's manifest replaced by another build's: the combined manifest no longer matches it
    m = json.loads((copy / "part-00000-of-00003" / "manifest.json").read_text())
    other = json.loads((copy / "part-00001-of-00003" / "manifest.json").read_text())
    m["shards"], m["fingerprint"] = other["shards"], other["fingerprint"]
    (copy / "part-00000-of-00003" / "manifest.json").write_text(json.dumps(m))
    problems = CacheReader(copy).verify()
    assert any(p.startswith("part-00000-of-00003: ") for p in problems)


def test_combine_names_the_missing_parts(tmp_path, tiny_model_dir, data_file, hf_engine):
    out = tmp_path / "c"
    empty = run_build(_cfg(tiny_model_dir, data_file, out, num_shards=4, shard_index=2), engine=hf_engine)
    assert empty.stats.rows == 0 and empty.shards == [] and empty.stats.skipped["empty_response"] == 1
    with pytest.raises(ConfigError, match=r"3 of 4 parts are not finished \(shard indices \[0, 1, 3\]\)"):
        combine_parts(str(out))
    with pytest.raises(ConfigError, match="holds no part-NNNNN-of-NNNNN directories"):
        combine_parts(str(tmp_path / "nothing"))
    for i in (0, 1, 3):
        run_build(_cfg(tiny_model_dir, data_file, out, num_shards=4, shard_index=i), engine=hf_engine, progress=False)
    m = load_manifest(out)  # an empty part (its only row has an empty answer) combines like any other
    assert [p.rows for p in m.parts] == [1, 1, 0, 2] and CacheReader(out).verify() == []


def test_parts_of_other_settings_are_refused(combined, tmp_path, tiny_model_dir, data_file, hf_engine):
    out = tmp_path / "c"
    shutil.copytree(combined, out)
    (out / "manifest.json").unlink()
    shutil.rmtree(out / "part-00001-of-00003")
    with pytest.raises(ConfigError, match=r"part-00001-of-00003: built with other settings than part 0"):
        run_build(
            _cfg(tiny_model_dir, data_file, out, num_shards=3, shard_index=1, top_k=4), engine=hf_engine, progress=False
        )


def test_a_part_never_writes_into_another_cache(single, tmp_path, tiny_model_dir, data_file, hf_engine):
    out = tmp_path / "c"
    shutil.copytree(single, out)
    with pytest.raises(ConfigError, match="holds another cache .*choose another --out for the parts"):
        run_build(_cfg(tiny_model_dir, data_file, out, num_shards=2, shard_index=0, top_k=4), engine=hf_engine)


def test_parts_on_a_shared_fsspec_location(tmp_path, monkeypatch, tiny_model_dir, data_file, hf_engine, single):
    monkeypatch.setenv("FUSION_CACHE_HOME", str(tmp_path / "home"))  # local staging of each part
    url = "memory://fusion-cache-test-parts/cache"
    try:
        for i in (1, 0):
            run_build(_cfg(tiny_model_dir, data_file, url, num_shards=2, shard_index=i), engine=hf_engine)
        m = load_manifest(url)
        assert [p.path for p in m.parts] == ["part-00000-of-00002", "part-00001-of-00002"]
        assert CacheReader(url).verify() == []
        assert [r.sample_id for r in _rows(url)] == [r.sample_id for r in _rows(single)]
        assert not (tmp_path / "home" / "staging").exists()  # staging dirs are removed after the upload
    finally:
        fsspec.filesystem("memory").rm("/fusion-cache-test-parts", recursive=True)


@pytest.mark.parametrize("path", ["part-00001-of-00003/shard-00000-of-00001.arrow", "shard-00000-of-00001.arrow"])
def test_manifest_accepts_part_shard_paths(cache_copy, path):
    m = json.loads((cache_copy / "manifest.json").read_text())
    m["shards"][0]["path"] = path
    (cache_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FingerprintError, match="does not match its shards"):  # the path itself is accepted
        load_manifest(cache_copy)


@pytest.mark.parametrize("path", ["part-1-of-3/s.arrow", "part-00001-of-00003/../s.arrow", "a/b/s.arrow", "/s.arrow"])
def test_manifest_refuses_other_directories(cache_copy, path):
    m = json.loads((cache_copy / "manifest.json").read_text())
    m["shards"][0]["path"] = path
    (cache_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardFormatError, match="plain file name"):
        load_manifest(cache_copy)


def test_cli_parts_and_combine(combined, tmp_path, tiny_model_dir, data_file):
    from typer.testing import CliRunner

    out = tmp_path / "c"
    shutil.copytree(combined, out)
    (out / "manifest.json").unlink()
    runner = CliRunner()
    r = runner.invoke(app, ["combine", "--cache", str(out)])
    assert r.exit_code == 0, r.output
    assert "combined 3 parts" in r.output
    r = runner.invoke(app, ["verify", "--cache", str(out)])
    assert r.exit_code == 0 and "OK " in r.output and "4 rows" in r.output
    r = runner.invoke(app, ["inspect", "--cache", str(out)])
    assert "3 combined: part-00000-of-00003 (1 rows)" in r.output
    r = runner.invoke(app, ["combine", str(tmp_path / "none")])
    assert r.exit_code == 2 and "holds no part" in r.output
    args = ["build", "--teacher", tiny_model_dir, "--data", data_file, "--out", tmp_path / "d", "--engine", "hf"]
    r = runner.invoke(app, [str(a) for a in [*args, "--top-k", 8, "--num-shards", 2, "--shard-index", 1]])
    assert r.exit_code == 0, r.output
    assert "(part 1 of 2)" in r.output and "waiting for the other parts" in r.output


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
