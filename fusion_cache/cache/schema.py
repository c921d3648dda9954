"""The Arrow schema of a cache shard, version 1 (docs/cache-format.md is the human-readable spec).

One row per (sample, teacher). Row t of the top-K columns is the teacher's distribution that predicts
``input_ids[answer_start + t]``; there are ``n_answer = len(input_ids) - answer_start`` such rows, each with K
entries, flattened row-major into one list per sample.
"""

from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"fusion_cache"  # Arrow schema metadata key holding the JSON provenance of the shard
FORMAT_NAME = "fusion-cache"

# The raw codec: fp32 log-probs and int32 ids, uncompressed; the exact reference (compact codecs come later).
CODECS = ("raw",)

COLUMNS = {
    "sample_id": pa.string(),  # 32 hex chars, blake2b-128 of the canonical conversation JSON (teacher-independent)
    "row_index": pa.int64(),  # 0-based index of the row in the input dataset
    "conversation": pa.string(),  # canonical JSON list of {"role", "content"}; the last message is the answer
    "input_ids": pa.list_(pa.int32()),  # the teacher's tokens of the rendered conversation [n_tokens]
    "answer_start": pa.int32(),  # index of the first answer token in input_ids (>= 1)
    "token_byte_start": pa.list_(pa.int32()),  # [n_tokens] byte offset of each token's start in the rendered text
    "token_byte_end": pa.list_(pa.int32()),  # [n_tokens] byte offset one past each token's end
    "topk_ids": pa.list_(pa.int32()),  # [n_answer * K] token ids, each row sorted by descending log-prob
    "topk_logprobs": pa.list_(pa.float32()),  # [n_answer * K] natural-log probabilities, descending per row
    "target_logprobs": pa.list_(pa.float32()),  # [n_answer] log-prob of the actual answer token
}


def shard_schema(provenance: dict) -> pa.Schema:
    """The schema of a v1 shard, with the build's provenance JSON under the ``fusion_cache`` metadata key."""
    meta = {METADATA_KEY: json.dumps(provenance, sort_keys=True).encode()}
    return pa.schema([pa.field(name, typ, nullable=False) for name, typ in COLUMNS.items()], metadata=meta)


def shard_name(index: int, count: int) -> str:
    """``shard-00000-of-00008.arrow``."""
    return f"shard-{index:05d}-of-{count:05d}.arrow"
