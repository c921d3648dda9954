"""fusion_cache/hf.py: every codec's cache as a `datasets.Dataset` equals what the project's reader decodes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion_cache.cache.codecs import CODECS
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import MissingField
from fusion_cache.hf import DECODED_VIEW_NOTE
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


def test_torch_format_gives_tensors(synthetic_caches):
    ds = load_cache(synthetic_caches["full"])
    ds.set_format("torch", columns=["input_ids", "topk_ids", "topk_logprobs", "answer_start"])
    row = ds[0]
    n_answer = len(row["input_ids"]) - int(row["answer_start"])
    assert tuple(row["topk_logprobs"].shape) == (n_answer, 8) and row["topk_ids"].dtype.is_floating_point is False


def test_the_documented_snippet_runs_on_every_codec(synthetic_caches, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "cache-format.md").read_text()
    section = doc.split("### 4.1 With Hugging Face `datasets`", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    for codec, path in synthetic_caches.items():
        work = tmp_path / codec
        shutil.copytree(path, work / "cache")  # the snippet reads ./cache
        monkeypatch.chdir(work)
        scope: dict = {}
        exec(compile(snippet, "docs/cache-format.md", "exec"), scope)
        assert len(scope["ds"]) == len(list(CacheReader(path).iter_rows())), codec
        n_answer = len(scope["row"]["input_ids"]) - scope["row"]["answer_start"]
        assert tuple(scope["ds"][0]["topk_logprobs"].shape) == (n_answer, 8), codec  # a torch tensor now


def test_plain_load_dataset_does_not_decode_which_is_why_load_cache_exists(synthetic_caches, tmp_path):
    """The gaps the docs (section 4.1) name: if `datasets` ever keeps them closed, the docs must change."""
    from datasets import load_dataset

    def plain(codec):
        files = sorted(str(p) for p in synthetic_caches[codec].glob("shard-*.arrow"))
        return load_dataset("arrow", data_files=files, split="train", cache_dir=str(tmp_path / codec))

    full = plain("full")
    assert b"fusion_cache_id_order" not in (full.data.schema.metadata or {})  # full's id order is lost
    raw = plain("raw")
    row = raw[0]
    n_answer = len(row["input_ids"]) - row["answer_start"]
    assert len(row["topk_ids"]) == n_answer * 8 and isinstance(row["conversation"], str)  # flat, and a JSON string
