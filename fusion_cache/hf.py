"""A fusion-cache cache as a Hugging Face `datasets.Dataset`: the decoded view that any training stack can use.

The shards themselves are not usable through ``datasets.load_dataset("arrow", ...)`` alone: ``full`` needs the id
order kept in each shard's schema metadata (which `datasets` drops), ``raw`` stores the top-K block flat
(``n_answer * K``, K in the manifest) and the conversation is a JSON string. `load_cache` therefore decodes every
row with the project's own reader (`CacheReader`, checksums and content checks included) and returns plain columns.

The result is a decoded *view*, not a cache: ``push_to_hub`` on it publishes decoded rows (larger, and without the
manifest, fingerprint or codec), which fusion-cache cannot read back as a cache. Publish the cache directory itself.

This module imports only the cache layer; `datasets` is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.row import MissingField
from fusion_cache.errors import MissingDependencyError

__all__ = ["DECODED_VIEW_NOTE", "load_cache", "row_to_dict"]

# Written into the dataset's description, so that a pushed copy says what it is.
DECODED_VIEW_NOTE = (
    "Decoded view of a fusion-cache cache (fusion_cache.hf.load_cache); not a cache: fusion-cache cannot read it back."
)


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise MissingDependencyError("fusion_cache.hf needs `datasets`: pip install datasets") from e
    return datasets


def _features(datasets):
    f = datasets
    return f.Features(
        {
            "sample_id": f.Value("string"),
            "row_index": f.Value("int64"),
            "messages": [{"role": f.Value("string"), "content": f.Value("string")}],
            "input_ids": f.Sequence(f.Value("int32")),
            "answer_start": f.Value("int32"),
            "topk_ids": f.Sequence(f.Sequence(f.Value("int32"))),
            "topk_logprobs": f.Sequence(f.Sequence(f.Value("float32"))),
            "target_logprobs": f.Sequence(f.Value("float32")),
            "tail_mass": f.Sequence(f.Value("float32")),
        }
    )


def row_to_dict(row: CacheRow) -> dict:
    """One decoded row as the plain values of `load_cache`'s columns.

    Where the cache's codec stores no ids (``values``, ``shape``) ``topk_ids`` is -1 everywhere; where it stores no
    target log-probs ``target_logprobs`` is -inf; where the tail mass is unknown ``tail_mass`` is NaN.

    Args:
        row: a row from `CacheReader.iter_rows`.

    Returns:
        A dict: ``topk_ids`` / ``topk_logprobs`` nested lists [n_answer, K], ``target_logprobs`` and ``tail_mass``
        [n_answer], ``input_ids`` [n_tokens], ``messages`` a list of {role, content}.
    """
    lps = np.asarray(row.topk_logprobs, np.float32)  # [n_answer, K]
    ids = np.full(lps.shape, -1, np.int32) if isinstance(row.topk_ids, MissingField) else row.topk_ids
    if isinstance(row.target_logprobs, MissingField):
        target = np.full(lps.shape[0], -np.inf, np.float32)
    else:
        target = np.asarray(row.target_logprobs, np.float32)
    tail = np.full(lps.shape[0], np.nan, np.float32) if row.tail_mass is None else row.tail_mass
    messages = [{"role": m["role"], "content": m["content"]} for m in json.loads(row.conversation)]
    return {
        "sample_id": row.sample_id,
        "row_index": int(row.row_index),
        "messages": messages,
        "input_ids": np.asarray(row.input_ids, np.int32).tolist(),
        "answer_start": int(row.answer_start),
        "topk_ids": np.asarray(ids, np.int32).tolist(),
        "topk_logprobs": lps.tolist(),
        "target_logprobs": target.tolist(),
        "tail_mass": np.asarray(tail, np.float32).tolist(),
    }


def load_cache(path: str | Path, split: str = "train"):
    """Decode a cache into an in-memory `datasets.Dataset` (a decoded view, not a cache; see the module docstring).

    Columns: ``sample_id``, ``row_index``, ``messages``, ``input_ids`` [n_tokens], ``answer_start``,
    ``topk_ids`` / ``topk_logprobs`` [n_answer, K], ``target_logprobs`` / ``tail_mass`` [n_answer]; per codec:
    ``full`` and ``raw`` fill every column (``raw`` has no tail mass: NaN); ``values`` has no ids (-1) and no target
    log-probs (-inf); ``shape`` likewise, and its ``topk_logprobs`` are the standardized shapes in [-1, 0], not
    log-probs. ``set_format("torch")`` works on the result.

    Args:
        path: the cache directory (manifest.json and shards), a local path or any fsspec URL.
        split: the split name the dataset carries.

    Returns:
        A `datasets.Dataset` with one row per cached (sample, teacher) row, in cache order.
    """
    datasets = _datasets()
    reader = CacheReader(path)
    rows = [row_to_dict(r) for r in reader.iter_rows()]
    features = _features(datasets)
    info = datasets.DatasetInfo(description=DECODED_VIEW_NOTE, features=features)
    return datasets.Dataset.from_list(rows, features=features, info=info, split=split)
