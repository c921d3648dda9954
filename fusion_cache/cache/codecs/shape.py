"""The ``shape`` codec (schema version 3): the sorted values' shape only, ``(v_j - v_0) / (v_0 - v_{K-1})`` in
[-1, 0], linearly quantized (codecs/quantize.py); no row maximum or span, zstd level 3.

The z-scored ULD loss is invariant to a row's offset and scale, so the shape is all that loss reads; anything that
needs true log-probs (no z-score, the tail bucket, KL) must refuse it (``has_logprobs`` is False;
codecs.require_logprobs). A row of equal values has no shape: it is listed in ``topk_flat`` and decodes to zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs.base import AnswerSpans
from fusion_cache.cache.codecs.base import TopK
from fusion_cache.cache.codecs.base import answer_counts
from fusion_cache.cache.codecs.base import checked_lists
from fusion_cache.cache.codecs.base import list_parts
from fusion_cache.cache.codecs.base import split_column
from fusion_cache.cache.codecs.base import stacked_values
from fusion_cache.cache.codecs.quantize import QuantizedCodec
from fusion_cache.cache.codecs.quantize import dequantize_values
from fusion_cache.cache.codecs.quantize import quantize_values
from fusion_cache.cache.row import CacheRow
from fusion_cache.errors import ShardFormatError


@dataclass(frozen=True, kw_only=True)
class ShapeCodec(QuantizedCodec):
    """Each row's standardized shape only: enough for the z-scored ULD loss, not for anything needing log-probs."""

    name = "shape"
    description = "the values' standardized shape only: z-scored ULD training only"
    since_version = 3
    has_logprobs = False
    default_value_bits = 8
    default_zstd_level = 3
    companding = "linear"

    def columns(self, k: int | None = None) -> dict[str, pa.DataType]:
        return {"topk_codes": pa.list_(self.code_type), "topk_flat": pa.list_(pa.int32())}

    def encode(self, rows: list[CacheRow], k: int, id_order: np.ndarray | None = None) -> dict[str, pa.Array]:
        cols = self.columns(k)
        n = answer_counts(rows)
        values = stacked_values(rows, k)
        _, _, codes = quantize_values(values, self.value_bits, np.float16, self.companding)
        # a row of equal values has no shape: its codes decode to [0, .., 0, -1], so list it to decode as zeros
        flat = values[:, 0] == values[:, -1]
        row_of = np.repeat(np.arange(len(rows)), n)
        local = np.arange(values.shape[0]) - np.repeat(np.cumsum(n) - n, n)
        return {
            "topk_codes": split_column(codes, n * (k - 2), cols["topk_codes"]),
            "topk_flat": split_column(
                local[flat].astype(np.int32), np.bincount(row_of[flat], minlength=len(rows)), cols["topk_flat"]
            ),
        }

    def decode(self, batch: pa.RecordBatch, spans: AnswerSpans) -> TopK:
        k = spans.k
        parts = checked_lists(batch, {"topk_codes": spans.n_answer * (k - 2)}, k, spans.shard)
        codes = parts["topk_codes"].reshape(spans.total, k - 2)
        values = dequantize_values(None, None, codes, self.value_bits, spans.shard, self.companding)
        values[_flat_positions(batch, spans)] = 0.0
        return TopK(values=values)


def _flat_positions(batch: pa.RecordBatch, spans: AnswerSpans) -> np.ndarray:
    """Batch-wide indices of the answer positions a shape shard lists in ``topk_flat`` (rows of equal values),
    checked: ascending within the row and < n_answer."""
    n_answer = spans.n_answer
    off, local = list_parts(batch.column("topk_flat"), spans.shard, "topk_flat")
    counts = np.diff(off)
    row_of = np.repeat(np.arange(len(n_answer)), counts)
    local = local.astype(np.int64)
    first = np.zeros(local.size, bool)
    first[off[:-1][counts > 0]] = True  # a row's first entry need not exceed the previous row's last
    bad = np.flatnonzero((local < 0) | (local >= n_answer[row_of]) | (~first & (np.diff(local, prepend=-1) <= 0)))
    if bad.size:
        r = int(row_of[bad[0]])
        raise ShardFormatError(
            f"{spans.shard}: row {r}: column 'topk_flat' holds {int(local[bad[0]])}, not an ascending "
            f"answer position below {int(n_answer[r])}"
        )
    return spans.offsets[row_of] + local
