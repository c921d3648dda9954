"""The ``raw`` codec: fp32 log-probs + int32 ids + fp32 target log-probs, uncompressed. The exact reference (the only
codec of schema version 1), and what bench_codec.py compares the compact codecs against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs.base import AnswerSpans
from fusion_cache.cache.codecs.base import Codec
from fusion_cache.cache.codecs.base import TopK
from fusion_cache.cache.codecs.base import checked_lists
from fusion_cache.cache.codecs.base import list_column
from fusion_cache.cache.row import CacheRow
from fusion_cache.errors import ConfigError


@dataclass(frozen=True)
class RawCodec(Codec):
    """The exact top-K block: no parameters."""

    name = "raw"
    description = "exact fp32 values, int32 ids and target log-probs, uncompressed"
    since_version = 1
    has_ids = True
    has_targets = True

    @classmethod
    def from_params(cls, read: Callable[[str, int, int], int], schema_version: int) -> RawCodec:
        return cls()

    @classmethod
    def from_options(cls, *, value_bits: int | None, zstd_level: int | None, vocab_size: int | None) -> RawCodec:
        if value_bits is not None:
            raise ConfigError("--value-bits: the raw codec stores exact fp32 values and takes no value bits")
        return cls()

    def columns(self, k: int | None = None) -> dict[str, pa.DataType]:
        return {
            "topk_ids": pa.list_(pa.int32()),
            "topk_logprobs": pa.list_(pa.float32()),
            "target_logprobs": pa.list_(pa.float32()),
        }

    def encode(self, rows: list[CacheRow], k: int, id_order: np.ndarray | None = None) -> dict[str, pa.Array]:
        cols = self.columns(k)
        return {
            "topk_ids": list_column([r.topk_ids for r in rows], np.int32, cols["topk_ids"]),
            "topk_logprobs": list_column([r.topk_logprobs for r in rows], np.float32, cols["topk_logprobs"]),
            "target_logprobs": list_column([r.target_logprobs for r in rows], np.float32, cols["target_logprobs"]),
        }

    def decode(self, batch: pa.RecordBatch, spans: AnswerSpans) -> TopK:
        k, n = spans.k, spans.n_answer
        expected = {"topk_ids": n * k, "topk_logprobs": n * k, "target_logprobs": n}
        parts = checked_lists(batch, expected, k, spans.shard)
        total = spans.total
        return TopK(
            values=parts["topk_logprobs"].reshape(total, k),
            ids=parts["topk_ids"].reshape(total, k),
            targets=parts["target_logprobs"].astype(np.float32, copy=False),
        )
