"""The Arrow schema of a cache shard, version 4 (docs/cache-format.md is the human-readable spec).

One row per (sample, teacher). Row t of the top-K block is the teacher's distribution that predicts
``input_ids[answer_start + t]``; there are ``n_answer = len(input_ids) - answer_start`` such rows, each with K
entries. The common columns below are the same for every codec; the top-K block's columns depend on the codec
(fusion_cache/cache/codecs/, one module per codec). Versions 1 (raw only), 2 (no shape codec, full layout 1) and 3
(full layouts 2 and 3, whose id order is in the schema metadata) are still read.
"""

from __future__ import annotations

import json

import pyarrow as pa

from fusion_cache.cache.codecs import LATEST_SCHEMA_VERSION
from fusion_cache.cache.codecs import Codec
from fusion_cache.cache.codecs import RawCodec

SCHEMA_VERSION = LATEST_SCHEMA_VERSION  # 4
# v1 = v2 with the raw codec only; v3 = v2 + the shape codec + full layouts 2 and 3; v4 = v3 with full layout 4 only
# (the id order in the manifest, so the shards decode through `datasets`). Each codec's class has its rules.
READABLE_SCHEMA_VERSIONS = tuple(range(1, LATEST_SCHEMA_VERSION + 1))  # (1, 2, 3, 4)
METADATA_KEY = b"fusion_cache"  # Arrow schema metadata key holding the JSON provenance of the shard
FORMAT_NAME = "fusion-cache"

COMMON_COLUMNS = {
    "sample_id": pa.string(),  # 32 hex chars, blake2b-128 of the canonical conversation JSON (teacher-independent)
    "row_index": pa.int64(),  # 0-based index of the row in the input dataset
    "conversation": pa.string(),  # canonical JSON list of {"role", "content"}; the last message is the answer
    "input_ids": pa.list_(pa.int32()),  # the teacher's tokens of the rendered conversation [n_tokens]
    "answer_start": pa.int32(),  # index of the first answer token in input_ids (>= 1)
    "token_byte_start": pa.list_(pa.int32()),  # [n_tokens] byte offset of each token's start in the rendered text
    "token_byte_end": pa.list_(pa.int32()),  # [n_tokens] byte offset one past each token's end
}

# The v1 / raw columns, kept under the old name for code that writes raw shards directly.
COLUMNS = {**COMMON_COLUMNS, **RawCodec().columns()}


def shard_columns(codec: Codec, k: int | None = None) -> dict[str, pa.DataType]:
    """Every column of a shard written with ``codec`` (and K, which full layouts 2 and 3's columns depend on)."""
    return {**COMMON_COLUMNS, **codec.columns(k)}


def shard_schema(provenance: dict, codec: Codec | None = None, k: int | None = None) -> pa.Schema:
    """The schema of a shard, with the build's provenance JSON under the ``fusion_cache`` metadata key."""
    codec = codec or RawCodec()
    meta = {METADATA_KEY: json.dumps(provenance, sort_keys=True).encode()}
    cols = shard_columns(codec, provenance.get("k") if k is None else k)
    return pa.schema([pa.field(name, typ, nullable=False) for name, typ in cols.items()], metadata=meta)


def shard_name(index: int, count: int) -> str:
    """``shard-00000-of-00008.arrow``."""
    return f"shard-{index:05d}-of-{count:05d}.arrow"
