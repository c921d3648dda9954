"""The ``full`` codec: ids, quantized values, tail mass and target log-probs, zstd (docs/cache-format.md section 1.2).

Layout 4 (schema version 4, what a build writes) is layout 3 with the shard's id order moved out of the schema
metadata, which ``datasets.load_dataset`` and the Hub's parquet conversion drop, into the shard's manifest entry;
each row names it in its ``topk_id_order`` column (codecs/ids.py says why and how; ~0.01 B/token).

Layout 3 (schema version 3): ids as per-shard ranks (codecs/ids.py) split into byte planes
(byte i of every rank), each plane one Arrow column per group of rank columns, so zstd gives each group its own
Huffman table; values quantized relative to the row maximum with a log companding (codecs/quantize.py), their code
deltas grouped the same way; the tail mass (1 - sum of the top-K probabilities) as fp16; target log-probs only where
the answer token is not among the top-K ids (elsewhere they are the decoded value of that id); zstd level 16 (its
optimal parsing codes the high rank plane and the value codes near their order-0 entropy, where level 3's greedy
matches lose 6.8 B/token on them at K=64).

Still read: layout 3 (above), layout 2 (schema version 3, the same but each rank as a bucket byte plus bit-packed
offsets, codecs/buckets.py: 1.2 B/token smaller at the same level, ids ~2.5x slower to decode) and layout 1 (schema
version 2, no ``layout`` key: ungrouped byte planes, square-root companding, every target log-prob as fp16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs.base import DECODE_CHUNK
from fusion_cache.cache.codecs.base import AnswerSpans
from fusion_cache.cache.codecs.base import TopK
from fusion_cache.cache.codecs.base import answer_counts
from fusion_cache.cache.codecs.base import checked_lists
from fusion_cache.cache.codecs.base import code_groups
from fusion_cache.cache.codecs.base import id_groups
from fusion_cache.cache.codecs.base import list_column
from fusion_cache.cache.codecs.base import list_parts
from fusion_cache.cache.codecs.base import split_column
from fusion_cache.cache.codecs.base import stacked_values
from fusion_cache.cache.codecs.buckets import decode_bucket_ids
from fusion_cache.cache.codecs.buckets import encode_bucket_ids
from fusion_cache.cache.codecs.ids import ID_ORDER_KEY
from fusion_cache.cache.codecs.ids import decode_rank_planes
from fusion_cache.cache.codecs.ids import id_order_doc
from fusion_cache.cache.codecs.ids import id_order_key
from fusion_cache.cache.codecs.ids import id_order_metadata
from fusion_cache.cache.codecs.ids import id_plane_columns
from fusion_cache.cache.codecs.ids import ids_through_row_orders
from fusion_cache.cache.codecs.ids import ids_to_ranks
from fusion_cache.cache.codecs.ids import make_id_order
from fusion_cache.cache.codecs.ids import pack_ids
from fusion_cache.cache.codecs.ids import parse_id_order
from fusion_cache.cache.codecs.ids import rank_table
from fusion_cache.cache.codecs.ids import ranks_to_ids
from fusion_cache.cache.codecs.ids import row_id_orders
from fusion_cache.cache.codecs.ids import unpack_ids
from fusion_cache.cache.codecs.quantize import VALUE_BITS
from fusion_cache.cache.codecs.quantize import ZSTD_LEVELS
from fusion_cache.cache.codecs.quantize import QuantizedCodec
from fusion_cache.cache.codecs.quantize import decode_value_groups
from fusion_cache.cache.codecs.quantize import dequantize_values
from fusion_cache.cache.codecs.quantize import quantize_values
from fusion_cache.cache.codecs.quantize import tail_mass
from fusion_cache.cache.row import CacheRow
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError

FULL_LAYOUT = 4  # the layout a build writes; layouts 3, 2 and 1 (no "layout" key, schema version 2) are still read
# the layouts each schema version has (version 2: layout 1 only, no "layout" key); later versions have the last's
FULL_LAYOUTS = {3: (2, 3), 4: (4,)}
ORDER_COLUMN = "topk_id_order"  # layout 4: the `id_order_key` of the shard's id order, in every row


def full_layouts(schema_version: int) -> tuple[int, ...]:
    """The ``layout`` values of the full codec in ``schema_version`` (>= 3)."""
    return FULL_LAYOUTS[min(schema_version, max(FULL_LAYOUTS))]


def id_bytes_for_vocab(vocab_size: int) -> int:
    """Bytes per id so that every id < vocab_size fits (2 for a 49152 vocab, 3 for 151k)."""
    return max(1, (int(vocab_size - 1).bit_length() + 7) // 8)


@dataclass(frozen=True, kw_only=True)
class FullCodec(QuantizedCodec):
    """Everything a trainer reads, compressed.

    Attributes:
        value_bits: bits per value code (2..16).
        id_bytes: bytes per token id (1..4; 1..3 for layouts 2 and 3).
        zstd_level: zstd level of the Arrow IPC buffer compression.
        layout: 4 (schema version 4), 3 or 2 (schema version 3), or None for layout 1 (schema version 2, no
            "layout" key).
    """

    id_bytes: int
    layout: int | None = None

    name = "full"
    description = "ids + quantized values + tail mass + target log-probs, zstd"
    since_version = 2
    has_ids = True
    has_targets = True
    has_tail_mass = True
    default_value_bits = 6
    # level 16, the first with zstd's optimal parsing (btultra): at K=64 on SmolLM2 output the high rank plane drops
    # from 32.3 to 28.9 B/token and the value codes from 12.1 to 8.7 against level 3, and they decompress faster
    # (fewer, longer sequences); encoding costs ~50 us/token (benchmarks/results/codec.md)
    default_zstd_level = 16

    @property
    def companding(self) -> str:
        """ "sqrt" for layout 1, "log" for layouts 2 to 4."""
        return "sqrt" if self.layout is None else "log"

    @property
    def grouped(self) -> bool:
        """Layouts 2 to 4: column groups, log companding, targets only outside the top-K."""
        return self.layout is not None

    @property
    def order_in_manifest(self) -> bool:
        """Layout 4: the id order is in the shard's manifest entry, named by each row's ``topk_id_order``."""
        return self.layout is not None and self.layout >= 4

    # ---------------------------------------------------------------- parameters
    @classmethod
    def param_names(cls, schema_version: int) -> set[str]:
        names = super().param_names(schema_version)
        return names if schema_version >= 3 else names - {"layout"}  # version 2 had layout 1 only

    @classmethod
    def from_params(cls, read: Callable[[str, int, int], int], schema_version: int) -> FullCodec:
        bits, level = read("value_bits", *VALUE_BITS), read("zstd_level", *ZSTD_LEVELS)
        layouts = full_layouts(schema_version) if schema_version >= 3 else None
        layout = read("layout", layouts[0], layouts[-1]) if layouts else None
        id_bytes = read("id_bytes", 1, 4 if layout is None else 3)
        return cls(value_bits=bits, id_bytes=id_bytes, zstd_level=level, layout=layout)

    @classmethod
    def from_options(cls, *, value_bits: int | None, zstd_level: int | None, vocab_size: int | None) -> FullCodec:
        params = cls._default_params(value_bits, zstd_level)
        if vocab_size is None:
            raise ConfigError("the full codec needs the teacher's vocabulary size")
        id_bytes = id_bytes_for_vocab(vocab_size)
        if id_bytes > 3:
            raise ConfigError(f"the full codec takes vocabularies of at most 2^24 ids, got {vocab_size}")
        return cls(**params, id_bytes=id_bytes, layout=FULL_LAYOUT)

    # ---------------------------------------------------------------- storage
    def columns(self, k: int | None = None) -> dict[str, pa.DataType]:
        """The columns in schema order; those of layouts 2 to 4 depend on ``k`` (their column groups)."""
        f16, u8 = pa.list_(pa.float16()), pa.list_(pa.uint8())
        codes = pa.list_(self.code_type)
        if not self.grouped:
            cols = {f"topk_ids_b{i}": u8 for i in range(self.id_bytes)}
            cols.update({"topk_max": f16, "topk_span": f16, "topk_codes": codes})
            cols.update({"tail_mass": f16, "target_logprobs": f16})
            return cols
        if k is None:
            raise ValueError(f"the columns of full layout {self.layout} depend on K")
        if self.layout == 2:
            cols = {f"topk_id_buckets_g{g}": u8 for g in range(len(id_groups(k)))}
            cols["topk_id_offsets"] = u8
        else:
            cols = {ORDER_COLUMN: pa.string()} if self.order_in_manifest else {}
            cols.update({name: u8 for name in id_plane_columns(self.id_bytes, k)})
        cols.update({"topk_max": f16, "topk_span": f16})
        cols.update({f"topk_codes_g{g}": codes for g in range(len(code_groups(k)))})
        cols.update({"tail_mass": f16, "target_logprobs_missing": f16})
        return cols

    def shard_metadata(self, first_rows: list[CacheRow]) -> tuple[dict[bytes, bytes], np.ndarray]:
        """The shard's id order, from the ids of its first rows (its first record batch); in the schema metadata
        up to layout 3, in the manifest entry (`shard_entry`) from layout 4."""
        order = make_id_order(np.concatenate([r.topk_ids.reshape(-1) for r in first_rows]))
        return ({} if self.order_in_manifest else {ID_ORDER_KEY: id_order_metadata(order)}), order

    def shard_entry(self, order: np.ndarray | None) -> dict:
        """Layout 4: ``{"id_order": ...}``, the shard's id order for its manifest entry."""
        return {"id_order": id_order_doc(order)} if self.order_in_manifest else {}

    def shard_entry_fields(self) -> tuple[str, ...]:
        return ("id_order",) if self.order_in_manifest else ()

    # ---------------------------------------------------------------- encode
    def encode(self, rows: list[CacheRow], k: int, id_order: np.ndarray | None = None) -> dict[str, pa.Array]:
        if id_order is None:
            raise ValueError("the full codec needs the shard's id order")
        cols = self.columns(k)
        n = answer_counts(rows)
        values = stacked_values(rows, k)
        vmax, span, codes = quantize_values(values, self.value_bits, np.float16, self.companding)
        if self.grouped:
            return self._encode_grouped(rows, k, id_order, values, vmax, span, codes, n, cols)
        ranks = ids_to_ranks(np.concatenate([r.topk_ids for r in rows]), id_order)
        out = {
            f"topk_ids_b{i}": split_column(p, n * k, cols[f"topk_ids_b{i}"])
            for i, p in enumerate(pack_ids(ranks, self.id_bytes))
        }
        out["topk_max"] = split_column(vmax, n, cols["topk_max"])
        out["topk_span"] = split_column(span, n, cols["topk_span"])
        out["topk_codes"] = split_column(codes, n * (k - 2), cols["topk_codes"])
        out["tail_mass"] = split_column(tail_mass(values).astype(np.float16), n, cols["tail_mass"])
        out["target_logprobs"] = list_column([r.target_logprobs for r in rows], np.float16, cols["target_logprobs"])
        return out

    def _encode_grouped(self, rows, k, id_order, values, vmax, span, codes, n, cols) -> dict[str, pa.Array]:
        """The columns of layouts 2 and 3: the ids (layout 3: grouped rank byte planes; layout 2: grouped id buckets
        and bit-packed offsets), max/span, grouped code deltas, tail mass, and the target log-probs of answer tokens
        outside the top-K."""
        ids = np.concatenate([r.topk_ids for r in rows]) if rows else np.zeros((0, k), np.int32)
        total = ids.shape[0]
        ranks = ids_to_ranks(ids, id_order)
        out = {}
        if self.order_in_manifest:  # the same key in every row: zstd stores it once per record batch
            out[ORDER_COLUMN] = pa.array([id_order_key(id_order)] * len(rows), pa.string())
        if self.layout == 2:
            buckets, offset_bytes, nbytes = encode_bucket_ids(ranks.reshape(-1), n * k, self.id_bytes)
            buckets = buckets.reshape(total, k)
            for g, (a, b) in enumerate(id_groups(k)):
                out[f"topk_id_buckets_g{g}"] = split_column(buckets[:, a:b], n * (b - a), cols[f"topk_id_buckets_g{g}"])
            out["topk_id_offsets"] = split_column(offset_bytes, nbytes, cols["topk_id_offsets"])
        else:
            for i, plane in enumerate(pack_ids(ranks, self.id_bytes)):  # [total, k] uint8 each
                for g, (a, b) in enumerate(id_groups(k)):
                    name = f"topk_ids_b{i}_g{g}"
                    out[name] = split_column(plane[:, a:b], n * (b - a), cols[name])
        out["topk_max"] = split_column(vmax, n, cols["topk_max"])
        out["topk_span"] = split_column(span, n, cols["topk_span"])
        for g, (a, b) in enumerate(code_groups(k)):
            out[f"topk_codes_g{g}"] = split_column(codes[:, a:b], n * (b - a), cols[f"topk_codes_g{g}"])
        out["tail_mass"] = split_column(tail_mass(values).astype(np.float16), n, cols["tail_mass"])
        # the answer token's log-prob is the decoded value of its id when it is among the top-K: store only the others
        answer = np.concatenate([r.input_ids[r.answer_start :] for r in rows]) if rows else np.zeros(0, np.int32)
        if answer.shape[0] != total:
            raise ValueError(f"answer tokens ({answer.shape[0]}) and top-K rows ({total}) differ in number")
        missing = ~(ids == answer[:, None]).any(axis=1)
        targets = np.concatenate([r.target_logprobs for r in rows]) if rows else np.zeros(0, np.float32)
        row_of = np.repeat(np.arange(len(rows)), n)
        miss_counts = np.bincount(row_of[missing], minlength=len(rows)).astype(np.int64)
        out["target_logprobs_missing"] = split_column(
            targets[missing].astype(np.float16), miss_counts, cols["target_logprobs_missing"]
        )
        return out

    # ---------------------------------------------------------------- decode
    def decode(self, batch: pa.RecordBatch, spans: AnswerSpans) -> TopK:
        k, total, shard = spans.k, spans.total, spans.shard
        parts = checked_lists(batch, self._lengths(spans), k, shard)
        if self.grouped:
            codes = [parts[f"topk_codes_g{g}"].reshape(total, b - a) for g, (a, b) in enumerate(code_groups(k))]
            values = decode_value_groups(codes, parts["topk_max"], parts["topk_span"], k, self.value_bits, shard)
        else:
            codes = parts["topk_codes"].reshape(total, k - 2)
            values = dequantize_values(parts["topk_max"], parts["topk_span"], codes, self.value_bits, shard)
        ids = self._decode_ids(batch, parts, spans)
        if self.grouped:
            targets = _grouped_targets(batch, ids, values, spans)
        else:
            targets = parts["target_logprobs"].astype(np.float32)
        return TopK(values=values, ids=ids, targets=targets, tail_mass=parts["tail_mass"].astype(np.float32))

    def _lengths(self, spans: AnswerSpans) -> dict[str, np.ndarray]:
        """The length each row's list must have in every fixed-size column, in the order they are checked."""
        k, n = spans.k, spans.n_answer
        if not self.grouped:
            expected = {"topk_max": n, "topk_span": n, "topk_codes": n * (k - 2)}
            expected.update({f"topk_ids_b{i}": n * k for i in range(self.id_bytes)})
            expected.update({"tail_mass": n, "target_logprobs": n})
            return expected
        if self.layout == 2:
            expected = {f"topk_id_buckets_g{g}": n * (b - a) for g, (a, b) in enumerate(id_groups(k))}
        else:
            widths = [b - a for a, b in id_groups(k)] * self.id_bytes
            expected = {c: n * w for c, w in zip(id_plane_columns(self.id_bytes, k), widths, strict=True)}
        expected.update({"topk_max": n, "topk_span": n, "tail_mass": n})
        expected.update({f"topk_codes_g{g}": n * (b - a) for g, (a, b) in enumerate(code_groups(k))})
        return expected

    def _decode_ids(self, batch: pa.RecordBatch, parts: dict, spans: AnswerSpans) -> np.ndarray:
        """int32 [total, K] token ids: the ranks of the layout's columns through each row's id order."""
        orders, row_order = self._row_orders(batch, spans)
        if row_order is None:  # one order (every shard read as a shard): the fast path
            return self._decode_ranks(batch, parts, spans, orders[0])
        # rows of several shards (a dataset's rows): decode the ranks once, then map each row's through its order
        ranks = self._decode_ranks(batch, parts, spans, None)
        return ids_through_row_orders(ranks, orders, row_order, spans.n_answer, self._decode_ranks_from)

    def _row_orders(self, batch: pa.RecordBatch, spans: AnswerSpans) -> tuple[list[np.ndarray], np.ndarray | None]:
        """(the distinct id orders of the batch's rows, each row's index into them; None when there is one)."""
        if not self.order_in_manifest:
            return [parse_id_order((batch.schema.metadata or {}).get(ID_ORDER_KEY), self.id_bytes, spans.shard)], None
        return row_id_orders(batch, ORDER_COLUMN, spans)

    def _decode_ranks_from(self, ranks: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Token ids of decoded ranks through one id order."""
        if self.id_bytes <= 2:
            return np.take(rank_table(order, 1 << (8 * self.id_bytes)), ranks)
        return ranks_to_ids(ranks, order)

    def _decode_ranks(
        self, batch: pa.RecordBatch, parts: dict, spans: AnswerSpans, order: np.ndarray | None
    ) -> np.ndarray:
        """int32 [total, K]: the ranks of the layout's columns, mapped through ``order`` unless it is None."""
        k, total, shard, id_bytes = spans.k, spans.total, spans.shard, self.id_bytes
        # 1- and 2-byte ids: one gather through the whole rank -> id table, inside the rank decoders
        table = rank_table(order, 1 << (8 * id_bytes)) if id_bytes <= 2 and order is not None else None
        if self.layout == 2:
            buckets = _gather_groups(parts, "topk_id_buckets_g", id_groups(k), total, k).reshape(-1)
            off_off, off_bytes = list_parts(batch.column("topk_id_offsets"), shard, "topk_id_offsets")
            counts = spans.n_answer * k
            ranks = decode_bucket_ids(buckets, off_bytes, np.diff(off_off), counts, id_bytes, shard, table)
        elif self.layout is not None:  # layouts 3 and 4
            n_groups = len(id_groups(k))
            names = id_plane_columns(id_bytes, k)
            planes = [[parts[names[i * n_groups + g]] for g in range(n_groups)] for i in range(id_bytes)]
            ranks = decode_rank_planes(planes, total, k, id_bytes, table)
        else:
            ranks = unpack_ids([parts[f"topk_ids_b{i}"] for i in range(id_bytes)])
            ranks = ranks if table is None else np.take(table, ranks)
        if table is None and order is not None:
            ranks = ranks_to_ids(ranks, order)
        return ranks.reshape(total, k)


def _gather_groups(parts: dict, prefix: str, groups: list, total: int, width: int) -> np.ndarray:
    """Reassemble column groups (``prefix`` + g, each row-major [total, b - a]) into one [total, width] array."""
    if len(groups) == 1:
        return parts[f"{prefix}0"].reshape(total, width)
    dtype = parts[f"{prefix}0"].dtype if groups else np.uint8
    out = np.empty((total, width), dtype=dtype)
    for g, (a, b) in enumerate(groups):
        out[:, a:b] = parts[f"{prefix}{g}"].reshape(total, b - a)
    return out


def _grouped_targets(batch: pa.RecordBatch, topk_ids: np.ndarray, values: np.ndarray, spans: AnswerSpans) -> np.ndarray:
    """Target log-probs of layouts 2 and 3: float32 [total], the decoded value of the answer token's id where it is
    among the top-K, else the next entry of the row's ``target_logprobs_missing`` list (whose length must match)."""
    n_answer, shard = spans.n_answer, spans.shard
    pos = np.repeat(spans.ids_offsets[:-1] + spans.answer_start, n_answer) + _ranges(n_answer)
    answer = spans.input_ids[pos]
    n, k = topk_ids.shape
    # the first column holding the answer's id (0 where none does), a few thousand positions at a time so the
    # [rows, K] comparison stays in the cache
    first = np.empty(n, np.int64)
    rows = max(1, min(n, DECODE_CHUNK // max(k, 1)))
    eq = np.empty((rows, k), bool)
    for t0 in range(0, n, rows):
        t1 = min(t0 + rows, n)
        np.equal(topk_ids[t0:t1], answer[t0:t1, None], out=eq[: t1 - t0])
        first[t0:t1] = eq[: t1 - t0].argmax(axis=1)
    first += np.arange(n) * k
    found = np.take(topk_ids.reshape(-1), first) == answer
    targets = np.take(values.reshape(-1), first)
    off, missing = list_parts(batch.column("target_logprobs_missing"), shard, "target_logprobs_missing")
    row_of = np.repeat(np.arange(len(n_answer)), n_answer)
    want = np.bincount(row_of[~found], minlength=len(n_answer))
    bad = np.flatnonzero(np.diff(off) != want)
    if bad.size:
        r = int(bad[0])
        raise ShardFormatError(
            f"{shard}: row {r}: column 'target_logprobs_missing' has {int(np.diff(off)[r])} values, but "
            f"{int(want[r])} answer tokens of the row are not among its top-K ids"
        )
    targets[~found] = missing
    return targets


def _ranges(counts: np.ndarray) -> np.ndarray:
    """concatenate([arange(c) for c in counts]) without a Python loop."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - starts
