"""The ``values`` codec: the sorted top-K values only (the ULD loss needs nothing else), as an fp16 row maximum and
span plus square-root companded code deltas (codecs/quantize.py), zstd level 3."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs.base import AnswerSpans
from fusion_cache.cache.codecs.base import TopK
from fusion_cache.cache.codecs.base import answer_counts
from fusion_cache.cache.codecs.base import checked_lists
from fusion_cache.cache.codecs.base import split_column
from fusion_cache.cache.codecs.base import stacked_values
from fusion_cache.cache.codecs.quantize import QuantizedCodec
from fusion_cache.cache.codecs.quantize import dequantize_values
from fusion_cache.cache.codecs.quantize import quantize_values
from fusion_cache.cache.row import CacheRow


@dataclass(frozen=True, kw_only=True)
class ValuesCodec(QuantizedCodec):
    """Sorted values only: no ids, no target log-probs."""

    name = "values"
    description = "sorted values only, quantized, zstd: no ids"
    since_version = 2
    default_value_bits = 8
    default_zstd_level = 3
    companding = "sqrt"

    def columns(self, k: int | None = None) -> dict[str, pa.DataType]:
        return {
            "topk_max": pa.list_(pa.float16()),
            "topk_span": pa.list_(pa.float16()),
            "topk_codes": pa.list_(self.code_type),
        }

    def encode(self, rows: list[CacheRow], k: int, id_order: np.ndarray | None = None) -> dict[str, pa.Array]:
        cols = self.columns(k)
        n = answer_counts(rows)
        vmax, span, codes = quantize_values(stacked_values(rows, k), self.value_bits, np.float16, self.companding)
        return {
            "topk_max": split_column(vmax, n, cols["topk_max"]),
            "topk_span": split_column(span, n, cols["topk_span"]),
            "topk_codes": split_column(codes, n * (k - 2), cols["topk_codes"]),
        }

    def decode(self, batch: pa.RecordBatch, spans: AnswerSpans) -> TopK:
        k, n = spans.k, spans.n_answer
        expected = {"topk_max": n, "topk_span": n, "topk_codes": n * (k - 2)}
        parts = checked_lists(batch, expected, k, spans.shard)
        codes = parts["topk_codes"].reshape(spans.total, k - 2)
        values = dequantize_values(
            parts["topk_max"], parts["topk_span"], codes, self.value_bits, spans.shard, self.companding
        )
        return TopK(values=values)
