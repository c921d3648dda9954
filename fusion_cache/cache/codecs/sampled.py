"""The ``sampled`` codec: a sampled (RS-KD) capture's distinct draws with counts and log-probs, zstd
(docs/cache-format.md section 1.2; the capture: fusion_cache/capture/sampling.py).

Per answer position the build drew N tokens from the teacher's full softmax. Stored per row, over its positions in
order, for each position's U <= N distinct draws (most likely first):

- ``sample_id_order``: the key of the shard's id order (one string per row), which the shard's manifest entry holds
  (``shards[].id_order``), as in ``full`` layout 4: everything decoding needs is in the rows and the manifest, so the
  rows decode through `datasets` too (schema metadata does not survive it);
- ``sample_ids_b{i}``: byte i of each draw's rank in the shard's id order (codecs/ids.py, as the ``full`` codec:
  frequent ids get small ranks, so the high plane is mostly zero);
- ``sample_counts``: uint8, how many of the N draws gave that id (>= 1);
- ``sample_logprobs``: fp16, the teacher's log-prob of that id (the loss re-tempers and importance-weights with it;
  fp16's relative error 2^-11 moves a weight p^(1/T - 1) by under 0.1% at T >= 0.5);
- ``target_logprobs``: fp16 [n_answer], the log-prob of each answer token (the ``min_ce`` combine, eval).

A position's entries end where its counts reach N: no per-position length is stored (one byte saved per answer
token), and the decoder refuses counts that do not add up to exactly N at every position. Decoded (`TopK`), the
block is [total, N]: the U distinct ids, log-probs and counts first, then padding (id -1, log-prob -inf, count 0).

The seed and N are codec parameters: the manifest then says how the draws were made, the fingerprint covers both,
and a top-K build's codec entry (and so its fingerprint) is untouched.
"""

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
from fusion_cache.cache.codecs.base import list_parts
from fusion_cache.cache.codecs.base import split_column
from fusion_cache.cache.codecs.ids import id_order_doc
from fusion_cache.cache.codecs.ids import id_order_key
from fusion_cache.cache.codecs.ids import ids_through_row_orders
from fusion_cache.cache.codecs.ids import ids_to_ranks
from fusion_cache.cache.codecs.ids import make_id_order
from fusion_cache.cache.codecs.ids import pack_ids
from fusion_cache.cache.codecs.ids import ranks_to_ids
from fusion_cache.cache.codecs.ids import row_id_orders
from fusion_cache.cache.codecs.ids import unpack_ids
from fusion_cache.cache.codecs.quantize import ZSTD_LEVELS
from fusion_cache.cache.row import CacheRow
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError

ORDER_COLUMN = "sample_id_order"  # each row: the `id_order_key` of its shard's id order (in the manifest entry)
SAMPLES = (2, 255)  # N a manifest may hold: a count is one byte
SEED_MAX = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class SampledCodec(Codec):
    """Distinct sampled ids, their counts and log-probs.

    Attributes:
        samples: N, draws per answer position.
        seed: the build seed the draws derive from (with each sample id and position).
        id_bytes: bytes per id rank (1..4).
        zstd_level: zstd level of the Arrow IPC buffer compression.
    """

    samples: int
    seed: int
    id_bytes: int
    zstd_level: int

    name = "sampled"
    description = "N tokens drawn from the teacher's softmax (--sampling rs): ids + counts + log-probs, zstd"
    since_version = 4
    has_ids = True
    has_targets = True
    default_zstd_level = 16  # as full: optimal parsing packs the rank planes and counts near their entropy
    has_counts = True

    @classmethod
    def from_params(cls, read: Callable[[str, int, int], int], schema_version: int) -> SampledCodec:
        return cls(
            samples=read("samples", *SAMPLES),
            seed=read("seed", 0, SEED_MAX),
            id_bytes=read("id_bytes", 1, 4),
            zstd_level=read("zstd_level", *ZSTD_LEVELS),
        )

    @classmethod
    def from_options(
        cls,
        *,
        value_bits: int | None,
        zstd_level: int | None,
        vocab_size: int | None,
        samples: int | None = None,
        seed: int | None = None,
    ) -> SampledCodec:
        from fusion_cache.cache.codecs.full import id_bytes_for_vocab

        if value_bits is not None:
            raise ConfigError(f"--value-bits {value_bits}: the sampled codec stores fp16 log-probs, no value codes")
        if samples is None:
            raise ConfigError("codec 'sampled': it stores a sampled capture; build with --sampling rs")
        if vocab_size is None:
            raise ConfigError("the sampled codec needs the teacher's vocabulary size")
        level = cls.default_zstd_level if zstd_level is None else zstd_level
        return cls(samples=samples, seed=seed or 0, id_bytes=id_bytes_for_vocab(vocab_size), zstd_level=level)

    # ---------------------------------------------------------------- storage
    def columns(self, k: int | None = None) -> dict[str, pa.DataType]:
        cols: dict[str, pa.DataType] = {ORDER_COLUMN: pa.string()}
        cols.update({f"sample_ids_b{i}": pa.list_(pa.uint8()) for i in range(self.id_bytes)})
        cols["sample_counts"] = pa.list_(pa.uint8())
        cols["sample_logprobs"] = pa.list_(pa.float16())
        cols["target_logprobs"] = pa.list_(pa.float16())
        return cols

    def ipc_options(self) -> pa.ipc.IpcWriteOptions:
        return pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=self.zstd_level))

    def shard_metadata(self, first_rows: list[CacheRow]) -> tuple[dict[bytes, bytes], np.ndarray]:
        """The shard's id order, from the draws of its first rows (for its manifest entry, `shard_entry`)."""
        ids = np.concatenate([r.topk_ids[r.sample_counts > 0] for r in first_rows]) if first_rows else np.zeros(0)
        return {}, make_id_order(ids)

    def shard_entry(self, order: np.ndarray | None) -> dict:
        return {"id_order": id_order_doc(order)}

    def shard_entry_fields(self) -> tuple[str, ...]:
        return ("id_order",)

    # ---------------------------------------------------------------- encode / decode
    def encode(self, rows: list[CacheRow], k: int, id_order: np.ndarray | None = None) -> dict[str, pa.Array]:
        if id_order is None:
            raise ValueError("the sampled codec needs the shard's id order")
        if k != self.samples:
            raise ValueError(f"a sampled cache's K is its N={self.samples}, got K={k}")
        cols = self.columns(k)
        present, ids, lps, counts = [], [], [], []
        for r in rows:
            if r.sample_counts is None:
                raise ValueError(f"row {r.sample_id}: no sample counts (a top-K capture cannot be stored as sampled)")
            c = np.asarray(r.sample_counts)
            if c.shape != r.topk_ids.shape or (c.astype(np.int64).sum(axis=1) != self.samples).any():
                raise ValueError(f"row {r.sample_id}: sample counts must be [n, {k}] and sum to {k} per position")
            mask = c > 0
            present.append(int(mask.sum()))
            ids.append(r.topk_ids[mask])
            lps.append(r.topk_logprobs[mask])
            counts.append(c[mask])
        per_row = np.asarray(present, dtype=np.int64)
        flat_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        out = {ORDER_COLUMN: pa.array([id_order_key(id_order)] * len(rows), pa.string())}  # zstd: once a batch
        for i, p in enumerate(pack_ids(ids_to_ranks(flat_ids, id_order), self.id_bytes)):
            out[f"sample_ids_b{i}"] = split_column(p, per_row, cols[f"sample_ids_b{i}"])
        out["sample_counts"] = split_column(_cat(counts, np.uint8), per_row, cols["sample_counts"])
        out["sample_logprobs"] = split_column(_cat(lps, np.float16), per_row, cols["sample_logprobs"])
        out["target_logprobs"] = list_column([r.target_logprobs for r in rows], np.float16, cols["target_logprobs"])
        return out

    def decode(self, batch: pa.RecordBatch, spans: AnswerSpans) -> TopK:
        n, shard, total = self.samples, spans.shard, spans.total
        off, counts = list_parts(batch.column("sample_counts"), shard, "sample_counts")
        per_row = np.diff(off)
        names = [f"sample_ids_b{i}" for i in range(self.id_bytes)] + ["sample_logprobs"]
        parts = checked_lists(batch, {name: per_row for name in names}, n, shard)
        targets = checked_lists(batch, {"target_logprobs": spans.n_answer}, n, shard)["target_logprobs"]
        ends = _position_ends(counts.astype(np.int64), off, spans, n)
        ranks = unpack_ids([parts[f"sample_ids_b{i}"] for i in range(self.id_bytes)])
        orders, row_order = row_id_orders(batch, ORDER_COLUMN, spans)
        if row_order is None:  # the rows of one shard
            flat_ids = ranks_to_ids(ranks, orders[0])
        else:  # rows of several shards (a dataset's): each entry through its row's order
            flat_ids = ids_through_row_orders(ranks, orders, row_order, per_row)
        # entry e belongs to position searchsorted(ends, e) and sits at slot e - (that position's first entry)
        entry = np.arange(counts.size)
        pos = np.searchsorted(ends, entry, side="left")
        first = np.concatenate([[0], ends[:-1] + 1])
        slot = entry - first[pos]
        ids = np.full((total, n), -1, np.int32)
        values = np.full((total, n), -np.inf, np.float32)
        out_counts = np.zeros((total, n), np.uint8)
        ids[pos, slot] = flat_ids
        values[pos, slot] = parts["sample_logprobs"].astype(np.float32)
        out_counts[pos, slot] = counts
        return TopK(values=values, ids=ids, targets=targets.astype(np.float32), counts=out_counts)


def _cat(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def _position_ends(counts: np.ndarray, off: np.ndarray, spans: AnswerSpans, n: int) -> np.ndarray:
    """int64 [total]: the index of each answer position's last entry, checking that every position's counts add up
    to exactly N (a count of 0 or one that overshoots N is refused, naming the shard and row)."""
    total = spans.total
    cum = np.cumsum(counts)
    ends = np.flatnonzero(cum % n == 0)
    want = n * np.arange(1, total + 1)
    m = min(ends.size, total)
    bad = np.flatnonzero(cum[ends[:m]] != want[:m])
    if bad.size or ends.size != total or (total and ends[-1] != counts.size - 1):
        t = int(bad[0]) if bad.size else m if m < total else max(total - 1, 0)
        r = int(np.searchsorted(spans.offsets, t, side="right")) - 1
        raise ShardFormatError(
            f"{spans.shard}: row {r}: column 'sample_counts': the counts of answer position "
            f"{t - int(spans.offsets[r])} do not add up to N={n} (each must be in [1, {n}])"
        )
    # and no position may straddle two rows: each row's entries end with its last position
    row_ends = off[1:] - 1
    last_pos = spans.offsets[1:] - 1
    has = spans.n_answer > 0
    wrong = np.flatnonzero(has & (ends[np.maximum(last_pos, 0)] != row_ends))
    if wrong.size:
        r = int(wrong[0])
        raise ShardFormatError(f"{spans.shard}: row {r}: column 'sample_counts' does not end with its last position")
    return ends
