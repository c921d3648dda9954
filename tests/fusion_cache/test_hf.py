"""fusion_cache/hf.py: every codec's cache as a `datasets.Dataset` equals what the project's reader decodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fusion_cache.cache.codecs import CODECS
from fusion_cache.cache.codecs.ids import id_order_doc
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import MissingField
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError
from fusion_cache.hf import DECODED_VIEW_NOTE
from fusion_cache.hf import decode_dataset
from fusion_cache.hf import load_cache


@pytest.mark.parametrize("codec", list(CODECS))
def test_load_cache_equals_the_reader_for_every_codec(synthetic_caches, codec):
    path = synthetic_caches[codec]
    ds = load_cache(path)
    rows = list(CacheReader(path).iter_rows())
    assert len(ds) == len(rows) and ds.info.description == DECODED_VIEW_NOTE
    k = CacheReader(path).k
    for got, want in zip(ds, rows, strict=True):
        assert got["sample_id"] == want.sample_id and got["answer_start"] == want.answer_start
        assert got["input_ids"] == want.input_ids.tolist()
        assert got["messages"] == json.loads(want.conversation)
        lps = np.array(got["topk_logprobs"], np.float32)  # [n_answer, K]
        assert lps.shape == (want.n_answer, k)
        np.testing.assert_array_equal(lps, want.topk_logprobs)
        ids = np.array(got["topk_ids"], np.int32)
        if isinstance(want.topk_ids, MissingField):
            assert (ids == -1).all() and ids.shape == lps.shape
        else:
            np.testing.assert_array_equal(ids, want.topk_ids)
        target = np.array(got["target_logprobs"], np.float32)
        if isinstance(want.target_logprobs, MissingField):
            assert np.isneginf(target).all() and target.shape == (want.n_answer,)
        else:
            np.testing.assert_array_equal(target, want.target_logprobs)
        if want.sample_counts is None:
            assert got["sample_counts"] is None
        else:  # a sampled cache: each position's counts add up to N, as the reader's
            np.testing.assert_array_equal(np.array(got["sample_counts"], np.uint8), want.sample_counts)
            assert (np.array(got["sample_counts"]).sum(1) == k).all()


def test_torch_format_gives_tensors(synthetic_caches):
    ds = load_cache(synthetic_caches["full"])
    ds.set_format("torch", columns=["input_ids", "topk_ids", "topk_logprobs", "answer_start"])
    row = ds[0]
    n_answer = len(row["input_ids"]) - int(row["answer_start"])
    assert tuple(row["topk_logprobs"].shape) == (n_answer, 8) and row["topk_ids"].dtype.is_floating_point is False


def test_the_documented_snippets_run_on_every_codec(synthetic_caches, tmp_path, monkeypatch):
    """Every snippet of docs/cache-format.md section 4.1 (load_cache, then load_dataset + decode_dataset), in a
    directory holding the cache as ./cache, for every codec."""
    import shutil

    import datasets

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cache-format.md").read_text()
    section = doc.split("### 4.1 With Hugging Face `datasets`", 1)[1].split("\n## ", 1)[0]
    snippets = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(snippets) == 2 and "decode_dataset(" in snippets[1]
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not the user's cache
    for codec, path in synthetic_caches.items():
        work = tmp_path / codec
        shutil.copytree(path, work / "cache")  # the snippets read ./cache
        monkeypatch.chdir(work)
        n_rows = len(list(CacheReader(path).iter_rows()))
        scope: dict = {}
        exec(compile(snippets[0], "docs/cache-format.md", "exec"), scope)
        assert len(scope["ds"]) == n_rows, codec
        n_answer = len(scope["row"]["input_ids"]) - scope["row"]["answer_start"]
        assert tuple(scope["ds"][0]["topk_logprobs"].shape) == (n_answer, 8), codec  # a torch tensor now
        exec(compile(snippets[1], "docs/cache-format.md", "exec"), scope)
        by_index = {r["row_index"]: r for r in load_cache(path)}
        assert sorted(scope["ds"]["row_index"]) == sorted(by_index), codec
        for row in scope["ds"]:
            assert row["topk_ids"] == by_index[row["row_index"]]["topk_ids"], codec


def _shard_rows(cache, tmp_path, name="plain"):
    """The cache's shard rows as a user loads them: ``load_dataset("arrow", data_files=...)``."""
    from datasets import load_dataset

    files = sorted(str(p) for p in Path(cache).glob("shard-*.arrow"))
    return load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / name))


def _assert_same_view(got, want):
    """Two decoded views hold the same rows: every column equal (NaN equal to NaN)."""
    assert got.column_names == want.column_names and len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for name in want.column_names:
            if name in ("tail_mass", "target_logprobs", "topk_logprobs"):
                np.testing.assert_array_equal(np.array(a[name], np.float32), np.array(b[name], np.float32))
            else:
                assert a[name] == b[name], name


@pytest.mark.parametrize("codec", list(CODECS))
def test_decode_dataset_of_plain_load_dataset_equals_load_cache_for_every_codec(synthetic_caches, tmp_path, codec):
    path = synthetic_caches[codec]
    plain = _shard_rows(path, tmp_path)
    assert "conversation" in plain.column_names and "messages" not in plain.column_names  # the shards' own columns
    if codec == "full":  # schema metadata is gone; the id order's key is a column, the order is in the manifest
        assert b"fusion_cache_id_order" not in (plain.data.schema.metadata or {})
        assert len(set(plain["topk_id_order"])) == len(CacheReader(path).manifest.shards) == 2
    got = decode_dataset(plain, path)
    assert got.info.description == DECODED_VIEW_NOTE
    _assert_same_view(got, load_cache(path))
    _assert_same_view(decode_dataset(plain, path / "manifest.json"), got)  # the manifest file alone will do
    _assert_same_view(decode_dataset(plain, CacheReader(path).manifest), got)


@pytest.mark.parametrize("codec", ["full", "raw", "sampled"])
def test_shuffled_filtered_rows_of_several_shards_decode_each_on_its_own(synthetic_caches, tmp_path, codec):
    path = synthetic_caches[codec]
    plain = _shard_rows(path, tmp_path).shuffle(seed=3).filter(lambda r: r["row_index"] != 1)
    got = decode_dataset(plain, path, batch_size=4)
    by_index = {r["row_index"]: r for r in load_cache(path)}
    assert len(got) == len(by_index) - 1 and [r["row_index"] for r in got] == plain["row_index"]
    for row in got:
        assert row == by_index[row["row_index"]] or np.isnan(row["tail_mass"]).all()
        assert row["topk_ids"] == by_index[row["row_index"]]["topk_ids"]


def test_a_streamed_dataset_decodes_lazily_to_the_same_rows(synthetic_caches):
    from datasets import IterableDataset
    from datasets import load_dataset

    path = synthetic_caches["full"]
    files = sorted(str(p) for p in path.glob("shard-*.arrow"))
    streamed = load_dataset("arrow", data_files=files, split="train", streaming=True)
    got = decode_dataset(streamed, path, batch_size=4)
    assert isinstance(got, IterableDataset)
    want = list(load_cache(path))
    rows = list(got)
    assert [r["row_index"] for r in rows] == [r["row_index"] for r in want]
    for a, b in zip(rows, want, strict=True):
        assert set(a) == set(b) and a["topk_ids"] == b["topk_ids"] and a["messages"] == b["messages"]
        np.testing.assert_array_equal(np.array(a["topk_logprobs"], np.float32), np.array(b["topk_logprobs"]))


def test_a_cache_repo_and_its_parquet_conversion_decode_like_the_directory(synthetic_caches, tmp_path):
    """``load_dataset`` of a cache directory as pushed (its card lists the shards: what ``load_dataset("org/name")``
    reads from the Hub), and of its rows converted to parquet (what the Hub's parquet conversion serves)."""
    import shutil

    from datasets import load_dataset

    from fusion_cache.cache.card import write_card

    repo = tmp_path / "repo"
    shutil.copytree(synthetic_caches["full"], repo)
    write_card(CacheReader(repo).manifest, repo)
    want = load_cache(repo)
    pushed = load_dataset(str(repo), split="train", cache_dir=str(tmp_path / "hf"))
    _assert_same_view(decode_dataset(pushed, repo), want)
    pushed.to_parquet(str(tmp_path / "converted.parquet"))
    converted = load_dataset("parquet", data_files=str(tmp_path / "converted.parquet"), split="train")
    _assert_same_view(decode_dataset(converted, repo / "manifest.json"), want)


def test_decode_dataset_refuses_rows_the_manifest_does_not_describe(synthetic_caches, tmp_path):
    import shutil

    from fusion_cache.cache.fingerprint import chain_fingerprint

    plain = _shard_rows(synthetic_caches["full"], tmp_path)
    with pytest.raises(ShardFormatError, match="lacks the 'raw' shard columns \\['topk_ids', 'topk_logprobs'"):
        decode_dataset(plain, synthetic_caches["raw"])
    with pytest.raises(ShardFormatError, match="lacks the 'full' shard columns"):
        decode_dataset(load_cache(synthetic_caches["full"]), synthetic_caches["full"])  # a decoded view
    # an edited id order (resealed: the formulas are public) no longer hashes to the key its rows name
    edited = tmp_path / "edited"
    shutil.copytree(synthetic_caches["full"], edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["shards"][0]["id_order"] = id_order_doc(np.arange(7))
    m["fingerprint"] = chain_fingerprint(m["config_fingerprint"], m["shards"])
    (edited / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        ShardFormatError,
        match=r"dataset\[0:6\]: row 0: column 'topk_id_order' names id order '[0-9a-f]{32}', which the manifest does",
    ):
        decode_dataset(plain, edited)
    with pytest.raises(ShardFormatError, match="shard-00000-of-00002.arrow, record batch 0: row 0: column 'topk_id_"):
        list(CacheReader(edited).iter_rows())


def test_load_cache_takes_fsspec_urls_and_refuses_a_bare_repo_id(synthetic_caches, tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in synthetic_caches["full"].iterdir():
        fs.pipe_file(f"/hfds2/full/{f.name}", f.read_bytes())
    _assert_same_view(load_cache("memory://hfds2/full"), load_cache(synthetic_caches["full"]))
    with pytest.raises(
        ConfigError, match="cache 'some-org/some-cache': no such local directory; .*'hf://datasets/some"
    ):
        load_cache("some-org/some-cache")
    with pytest.raises(ConfigError, match="hf://datasets/some-org/some-cache@v1"):
        decode_dataset(load_cache(synthetic_caches["raw"]), "some-org/some-cache@v1")
