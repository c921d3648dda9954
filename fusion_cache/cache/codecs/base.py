"""The `Codec` base class (one subclass per codec, registered in codecs/__init__.py) and what the codecs share.

A codec is one class that owns its Arrow columns, its encode (rows -> its columns) and its decode (a record batch
-> its decoded arrays, every declared length checked), as a feature type does in HF datasets. It also declares its
capabilities (ids, target log-probs, tail mass, true log-probs), its defaults and a one-line description for the
CLI help. An instance is the parameterized codec of one cache (``value_bits``, ``zstd_level``, ...), what its
manifest records under ``"codec"``; the writer and the reader only ever call its methods.

Also here: the list-column helpers every codec's encode and decode use, the column groups of the grouped layouts,
and the chunk size and byte-lane constants of the chunked numpy decoders (codecs/quantize.py, ids.py, buckets.py).
"""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from typing import ClassVar

import numpy as np
import pyarrow as pa

from fusion_cache.cache.row import CacheRow
from fusion_cache.errors import ShardFormatError

# ------------------------------------------------------------------------------------------------ decoded block
DECODE_CHUNK = 1 << 16  # symbols per step of the chunked decoders: their ~20 passes then stay in the core's L2 cache


@dataclass(frozen=True)
class AnswerSpans:
    """What a codec's decode needs of a record batch's common columns (already checked by the reader).

    Attributes:
        k: K of the cache.
        shard: the shard's name, for error messages.
        n_answer: int64 [R], answer positions of each row.
        offsets: int64 [R + 1], each row's first answer position in the batch-wide [total, K] arrays, and the total.
        input_ids: int32 [sum of n_tokens], every row's tokens, concatenated.
        ids_offsets: int64 [R + 1], each row's first token in ``input_ids``.
        answer_start: int64 [R], each row's first answer token.
        id_orders: the id orders the rows may name, by key (``full`` layout 4: the manifest's, `id_order_key`).
    """

    k: int
    shard: str
    n_answer: np.ndarray
    offsets: np.ndarray
    input_ids: np.ndarray
    ids_offsets: np.ndarray
    answer_start: np.ndarray
    id_orders: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Answer positions in the batch."""
        return int(self.offsets[-1])


@dataclass(frozen=True)
class TopK:
    """A record batch's decoded top-K block, batch-wide (the reader slices it per row).

    Attributes:
        values: float32 [total, K], sorted descending (a ``shape`` codec's standardized shapes).
        ids: int32 [total, K], or None when the codec stores no ids.
        targets: float32 [total] target log-probs, or None when the codec stores none.
        tail_mass: float32 [total], or None when the codec stores none.
        counts: uint8 [total, K] of a sampled cache (``sampled`` codec: ``values`` and ``ids`` are each position's
            distinct draws, padded with -inf and -1 where the count is 0), else None.
    """

    values: np.ndarray
    ids: np.ndarray | None = None
    targets: np.ndarray | None = None
    tail_mass: np.ndarray | None = None
    counts: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------ the codec
@dataclass(frozen=True)
class Codec(ABC):
    """One codec with its parameters (the dataclass fields: the keys its manifest entry holds besides ``name``).

    Subclasses set the class attributes below and implement the abstract methods; registering one is a line in
    codecs/__init__.py.
    """

    name: ClassVar[str]
    description: ClassVar[str]  # one line for the CLI help
    since_version: ClassVar[int]  # the first schema version that has the codec
    has_ids: ClassVar[bool] = False  # topk_ids are stored
    has_targets: ClassVar[bool] = False  # target log-probs are stored
    has_tail_mass: ClassVar[bool] = False  # 1 - sum of the top-K probabilities is stored
    has_logprobs: ClassVar[bool] = True  # the decoded values are log-probs (False: a row's standardized shape)
    has_counts: ClassVar[bool] = False  # a sampled capture: the block is N draws' distinct ids with counts, not a top-K
    default_value_bits: ClassVar[int | None] = None  # None: takes no --value-bits
    default_zstd_level: ClassVar[int | None] = None  # None: uncompressed

    # ---------------------------------------------------------------- parameters
    @classmethod
    def param_names(cls, schema_version: int) -> set[str]:
        """The keys of the codec's manifest entry in ``schema_version`` (``name`` and its dataclass fields)."""
        return {"name"} | {f.name for f in fields(cls)}

    @classmethod
    @abstractmethod
    def from_params(cls, read: Callable[[str, int, int], int], schema_version: int) -> Codec:
        """The codec from a checked manifest entry: ``read(key, lo, hi)`` returns the integer under ``key`` and
        raises ShardFormatError naming the key and value when it is not an integer in [lo, hi]."""

    @classmethod
    @abstractmethod
    def from_options(cls, *, value_bits: int | None, zstd_level: int | None, vocab_size: int | None) -> Codec:
        """The codec a build writes, from its options (None: the default). Raises ConfigError on bad values."""

    def to_json(self) -> dict:
        """The manifest / schema-metadata form: ``{"name": ..., params...}`` (no None values)."""
        out = {"name": self.name}
        for f in fields(self):
            if getattr(self, f.name) is not None:
                out[f.name] = getattr(self, f.name)
        return out

    # ---------------------------------------------------------------- storage
    @abstractmethod
    def columns(self, k: int | None = None) -> dict[str, pa.DataType]:
        """The codec's Arrow columns (after the common columns), in schema order; ``k`` where they depend on K."""

    def ipc_options(self) -> pa.ipc.IpcWriteOptions:
        """Arrow IPC write options of the codec's shards: uncompressed here (the compact codecs use zstd)."""
        return pa.ipc.IpcWriteOptions()

    def shard_metadata(self, first_rows: list[CacheRow]) -> tuple[dict[bytes, bytes], np.ndarray | None]:
        """(schema metadata the codec adds to a shard, the id order its encode takes) from the shard's first rows;
        only the ``full`` codec has any (its per-shard id order)."""
        return {}, None

    def shard_entry(self, order: np.ndarray | None) -> dict:
        """Fields the codec adds to a shard's manifest entry, from the state `shard_metadata` returned; none here
        (``full`` layout 4: its ``id_order``). Their names are `shard_entry_fields`."""
        return {}

    def shard_entry_fields(self) -> tuple[str, ...]:
        """The names of the fields `shard_entry` adds: every shard's manifest entry has exactly these."""
        return ()

    # ---------------------------------------------------------------- encode / decode
    @abstractmethod
    def encode(self, rows: list[CacheRow], k: int, id_order: np.ndarray | None = None) -> dict[str, pa.Array]:
        """The codec's columns for ``rows`` (each row's top-K block [n_answer, K] checked by the writer), vectorized
        over all the rows' answer positions. ``id_order`` is the shard's id order from `shard_metadata`."""

    @abstractmethod
    def decode(self, batch: pa.RecordBatch, spans: AnswerSpans) -> TopK:
        """The top-K block of ``batch``, whose column types the reader has checked: every list length is checked
        against ``spans`` first, and corrupt data is refused with a ShardFormatError naming the shard and row."""


# ------------------------------------------------------------------------------------------------ column groups
def id_groups(k: int) -> list[tuple[int, int]]:
    """Column groups of the [n, K] id buckets (full layout 2) and rank byte planes (layout 3): group g holds columns
    [2^g - 1, min(2^(g+1) - 1, K)).

    Each group is its own Arrow column, so its own zstd frame with its own Huffman table: the top ranks' buckets
    (and high bytes) are far more skewed than the 60th's.
    """
    out, g = [], 0
    while (1 << g) - 1 < k:
        out.append(((1 << g) - 1, min((1 << (g + 1)) - 1, k)))
        g += 1
    return out


def code_groups(k: int) -> list[tuple[int, int]]:
    """Groups of the [n, K-2] code deltas c_1..c_{K-2} (full layouts 2 and 3): group g holds c_j for j in
    [2^g, 2^(g+1)), as 0-based column ranges [2^g - 1, min(2^(g+1) - 1, K-2)) of the [n, K-2] matrix. Empty for
    K = 2."""
    return id_groups(k - 2)


# ------------------------------------------------------------------------------------------------ list columns
def answer_counts(rows: list[CacheRow]) -> np.ndarray:
    """int64 [R]: the answer positions (top-K rows) of each row."""
    return np.fromiter((r.topk_logprobs.shape[0] for r in rows), dtype=np.int64, count=len(rows))


def stacked_values(rows: list[CacheRow], k: int) -> np.ndarray:
    """The rows' top-K log-probs, concatenated: float32 [total, K] (float64 [0, K] for no rows)."""
    return np.concatenate([r.topk_logprobs for r in rows]).astype(np.float32) if rows else np.zeros((0, k))


def list_column(arrays: list[np.ndarray], dtype: np.dtype, arrow_type: pa.DataType) -> pa.Array:
    """Build a list<T> column from per-row arrays without a per-element Python loop."""
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype, copy=False) if arrays else np.array([], dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, arrow_type.value_type))


def split_column(flat: np.ndarray, per_row: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """A list<T> column from one flat array and each row's element count."""
    offsets = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(per_row, out=offsets[1:])
    if offsets[-1] >= 1 << 31:
        raise ValueError("a record batch holds more than 2^31 list elements; write fewer rows per batch")
    values = pa.array(np.ascontiguousarray(flat).reshape(-1), arrow_type.value_type)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32), pa.int32()), values)


def list_parts(col: pa.Array, shard: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1] int64, values) of a list column, rebased so offsets[0] == 0 (batches may be slices)."""
    if not pa.types.is_list(col.type):
        raise ShardFormatError(f"{shard}: column {name!r} must be a list, got {col.type}")
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def checked_lists(batch: pa.RecordBatch, expected: dict[str, np.ndarray], k: int, shard: str) -> dict[str, np.ndarray]:
    """The flat values of each list column in ``expected`` (name -> int [R] the length each row must have), after
    checking every row's length, in order; the first mismatch is refused naming the shard, row and column."""
    parts = {}
    for name, want in expected.items():
        off, vals = list_parts(batch.column(name), shard, name)
        got = np.diff(off)
        bad = np.flatnonzero(got != want)
        if bad.size:
            r = int(bad[0])
            raise ShardFormatError(
                f"{shard}: row {r}: column {name!r} has {int(got[r])} values, expected {int(want[r])} (K={k})"
            )
        parts[name] = vals
    return parts


# ------------------------------------------------------------------------------------------------ byte lanes
# Prefix sums of small non-negative byte values, eight at a time ("SWAR"): multiplying a uint64 holding bytes
# x_0..x_7 (little-endian) by 0x0101010101010101 puts x_0 + .. + x_i into byte i, exactly while every such sum is
# below 256 (a carry would otherwise spill into the next byte). numpy's cumsum is a sequential loop at ~1 ns per
# element; this is one multiplication per eight elements plus a cumsum over an eighth of them.
LANES_INCL = np.uint64(0x0101010101010101)
LANES_EXCL = np.uint64(0x0101010101010100)
BYTES_EVEN = np.uint64(0x00FF00FF00FF00FF)  # bytes 0, 2, 4, 6 of a uint64 as four 16-bit lanes
WORDS_INCL = np.uint64(0x0001000100010001)  # the same prefix-sum trick over four 16-bit lanes
