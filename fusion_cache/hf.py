"""A fusion-cache cache as a Hugging Face `datasets.Dataset`: the decoded view that any training stack can use.

Two ways in, the same decoded view out (`row_to_dict`'s columns: ``messages``, ``input_ids``, ``answer_start``,
``topk_ids`` / ``topk_logprobs`` [n_answer, K], ``sample_counts`` of a sampled cache, ...):

- `load_cache(path_or_url)`: reads the cache directory with the project's own reader (`CacheReader`: sha256 of every
  shard, the manifest's counts, content checks) and decodes every row.
- `decode_dataset(ds, cache)`: decodes a dataset of the shards' own rows, as ``datasets.load_dataset("arrow",
  data_files=shards)`` or ``load_dataset`` of a pushed cache repo (its card lists the shards) return them, also
  after the Hub's parquet conversion, a shuffle, a filter or a select. Everything decoding needs is in the rows'
  columns or in the manifest (schema version 4: the ``full`` and ``sampled`` codecs' id orders are in the manifest,
  each row names its own by hash), so only ``manifest.json`` must travel with the rows. The rows' content is
  checked as the reader checks it; their shard files' sha256 is not (`datasets` read them, not fusion-cache).

The result is a decoded *view*, not a cache: ``push_to_hub`` on it publishes decoded rows (larger, and without the
manifest, fingerprint or codec), which fusion-cache cannot read back as a cache. Publish the cache directory itself.

This module imports only the cache layer; `datasets` is imported lazily.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs import FullCodec
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.fingerprint import hash_json
from fusion_cache.cache.manifest import MANIFEST_NAME
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.reader import decode_record_batch
from fusion_cache.cache.reader import manifest_id_orders
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.row import MissingField
from fusion_cache.cache.schema import shard_columns
from fusion_cache.cache.validate import ContentRules
from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.errors import ShardFormatError

__all__ = ["DECODED_VIEW_NOTE", "decode_dataset", "load_cache", "row_to_dict"]

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


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # org/name[@revision], as the Hub spells it


def _cache_url(path_or_url: str | Path) -> str:
    """A local cache path or an fsspec URL, as `CacheLocation` takes it; a bare Hub repo id is refused with the URL
    to use (a repo id and a relative path look alike: guessing would send a mistyped path to the network)."""
    s = str(path_or_url)
    if "://" not in s and not Path(s).exists() and _REPO_ID.match(s):
        raise ConfigError(
            f"cache {s!r}: no such local directory; a cache in a Hub dataset repo is read as "
            f"'hf://datasets/{s}' (fsspec's Hugging Face filesystem, installed with huggingface_hub)"
        )
    return s


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
            "sample_counts": f.Sequence(f.Sequence(f.Value("uint8"))),
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
        "sample_counts": None if row.sample_counts is None else np.asarray(row.sample_counts, np.uint8).tolist(),
    }


def load_cache(path: str | Path, split: str = "train"):
    """Decode a cache into an in-memory `datasets.Dataset` (a decoded view, not a cache; see the module docstring).

    Columns: ``sample_id``, ``row_index``, ``messages``, ``input_ids`` [n_tokens], ``answer_start``,
    ``topk_ids`` / ``topk_logprobs`` [n_answer, K], ``target_logprobs`` / ``tail_mass`` [n_answer]; per codec:
    ``full`` and ``raw`` fill every column (``raw`` has no tail mass: NaN); ``values`` has no ids (-1) and no target
    log-probs (-inf); ``shape`` likewise, and its ``topk_logprobs`` are the standardized shapes in [-1, 0], not
    log-probs; ``sampled`` holds each position's distinct draws and their ``sample_counts`` [n_answer, N] (None for
    the other codecs), no tail mass (NaN). ``set_format("torch")`` works on the result.

    Args:
        path: the cache directory (manifest.json and shards): a local path or any fsspec URL, e.g.
            ``hf://datasets/org/name`` for a cache in a Hub dataset repo (huggingface_hub's filesystem).
        split: the split name the dataset carries.

    Returns:
        A `datasets.Dataset` with one row per cached (sample, teacher) row, in cache order.

    Raises:
        ConfigError: ``path`` is a bare Hub repo id (``org/name``) that is no local directory; the message gives
            the ``hf://datasets/...`` URL.
    """
    datasets = _datasets()
    reader = CacheReader(_cache_url(path))
    rows = [row_to_dict(r) for r in reader.iter_rows()]
    features = _features(datasets)
    info = datasets.DatasetInfo(description=DECODED_VIEW_NOTE, features=features)
    return datasets.Dataset.from_list(rows, features=features, info=info, split=split)


# ------------------------------------------------------------------------------------------------ shard rows
def _manifest(cache: str | Path | Manifest) -> Manifest:
    """The manifest of ``cache``: a `Manifest`, a ``manifest.json`` file, or a cache directory / URL."""
    if isinstance(cache, Manifest):
        return cache
    s = _cache_url(cache)
    if s.rstrip("/").endswith("/" + MANIFEST_NAME) or s == MANIFEST_NAME:
        s = s.rstrip("/")[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return load_manifest(s)


class _RowDecoder:
    """The `Dataset.map` function of `decode_dataset`: an Arrow table of shard rows -> the decoded view's columns."""

    def __init__(self, manifest: Manifest, out_schema: pa.Schema):
        self.out_schema = out_schema  # the decoded view's (`_features`): an arrow-formatted map returns a table
        self.codec = parse_codec(manifest.codec, MANIFEST_NAME, manifest.schema_version)
        self.k = manifest.k
        self.schema = pa.schema([pa.field(n, t, nullable=False) for n, t in shard_columns(self.codec, self.k).items()])
        # every check of the reader but the order of the rows, which a user may have shuffled
        self.rules = dataclasses.replace(ContentRules.from_manifest(manifest, self.codec), in_order=False)
        self.id_orders = manifest_id_orders(manifest, self.codec)

    def __call__(self, table: pa.Table, indices: list[int]) -> pa.Table:
        # errors name the rows as a slice of the dataset and a row of it: "dataset[256:512], row 3"
        where = f"dataset[{indices[0]}:{indices[-1] + 1}]" if indices else "dataset"
        try:  # the types `datasets` (or a parquet round trip) gives back -> the shards' own
            table = table.select(self.schema.names).cast(self.schema).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError) as e:
            raise ShardFormatError(f"{where}: not the shards' columns: {e}") from None
        rows: list[CacheRow] = []
        for batch in table.to_batches():  # one batch: the table was combined
            rows += decode_record_batch(batch, self.codec, self.k, where, rules=self.rules, id_orders=self.id_orders)
        dicts = [row_to_dict(r) for r in rows]
        return pa.Table.from_pydict({n: [d[n] for d in dicts] for n in self.out_schema.names}, schema=self.out_schema)


def decode_dataset(ds, cache: str | Path | Manifest, *, batch_size: int = 256, num_proc: int | None = None):
    """Decode a `datasets.Dataset` (or `IterableDataset`) of a cache's shard rows into `load_cache`'s decoded view.

    The rows are what ``datasets.load_dataset("arrow", data_files=shards)`` returns (``streaming=True`` too), or
    ``load_dataset`` of a pushed cache repo (or of the cache directory: its card lists the shards), also after the
    Hub's parquet conversion, a shuffle, a filter or a select: each row decodes on its own. Schema version 4
    caches (every codec) and the ``raw``, ``values`` and ``shape`` caches of earlier versions decode; a ``full``
    cache of version 3 or earlier keeps its id orders in the shards' schema metadata, which `datasets` drops: read
    it with `load_cache`.

    Every row's content is checked as `CacheReader` checks it (lengths, ids below the vocabulary, sorted values,
    sample ids); the shard files' sha256 is not (`datasets` read them): `load_cache` or ``fusion-cache verify``
    checks those.

    Args:
        ds: the shard rows (every column of the cache's shards; other columns are ignored).
        cache: the cache's manifest: a `Manifest`, the path or URL of its ``manifest.json``, or the cache directory
            (a local path or an fsspec URL such as ``hf://datasets/org/name``).
        batch_size: rows decoded per `Dataset.map` batch.
        num_proc: `Dataset.map` processes (not for an `IterableDataset`, which decodes lazily as it is iterated).

    Returns:
        A dataset of the same kind as ``ds`` with `load_cache`'s columns, one row per row of ``ds``, in its order.

    Raises:
        ShardFormatError: ``ds`` lacks the shards' columns, a row fails a check, or names an id order the manifest
            does not hold (its manifest is another cache's, or was edited).
    """
    datasets = _datasets()
    manifest = _manifest(cache)
    features = _features(datasets)
    decoder = _RowDecoder(manifest, features.arrow_schema)
    columns = ds.column_names or []  # an IterableDataset may not know its columns before it is read
    missing = [c for c in decoder.schema.names if ds.column_names is not None and c not in columns]
    if missing:
        raise ShardFormatError(
            f"dataset: lacks the {decoder.codec.name!r} shard columns {missing[:4]}{' ...' if len(missing) > 4 else ''}"
            "; decode_dataset takes the shards' own rows (load_dataset('arrow', data_files=shards))"
        )
    if isinstance(decoder.codec, FullCodec) and not decoder.codec.order_in_manifest:
        raise ShardFormatError(
            f"dataset: a schema_version {manifest.schema_version} 'full' cache keeps its id orders in the shards' "
            "schema metadata, which datasets drops; read it with fusion_cache.hf.load_cache(dir), or rebuild it"
        )
    kwargs = {"batched": True, "batch_size": batch_size, "with_indices": True, "features": features}
    if isinstance(ds, datasets.IterableDataset):
        # an IterableDataset removes `remove_columns` after taking the function's output: name only the input
        # columns that the output does not replace (the output's sample_id, input_ids, ... replace the input's)
        dropped = [c for c in columns if c not in features]
        out = ds.with_format("arrow").map(decoder, remove_columns=dropped or None, **kwargs)
        if not columns:  # columns unknown before reading: keep the decoded view's only
            out = out.select_columns(list(features))
    else:
        # the rows and the manifest decide the result: no need to hash the decoder (orders, rules) by pickling it
        fingerprint = hash_json(["fusion_cache.hf.decode_dataset", ds._fingerprint, manifest.fingerprint])[:32]
        out = ds.with_format("arrow").map(
            decoder,
            remove_columns=columns,
            num_proc=num_proc,
            new_fingerprint=fingerprint,
            desc="decode fusion-cache rows",
            **kwargs,
        )
    out = out.with_format(None)
    out.info.description = DECODED_VIEW_NOTE
    return out
