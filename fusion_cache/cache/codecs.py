"""Top-K codecs: how a shard stores the teacher's top-K block (docs/cache-format.md section 1.2 is the spec).

Three codecs, chosen at build time and recorded in the manifest and every shard's schema metadata:

- ``raw``: fp32 log-probs + int32 ids + fp32 target log-probs, uncompressed. The exact reference (v1's only codec).
- ``full``: ids as little-endian byte planes (one ``list<uint8>`` column per byte, so zstd sees the skewed high
  bytes apart from the noisy low bytes), values quantized relative to the row maximum, the leftover tail mass
  (1 - sum of the top-K probabilities) and the target log-probs as fp16; the Arrow IPC buffers are zstd-compressed.
- ``values``: the sorted values only (ULD needs nothing else): fp16 row maximum and span + quantized codes, zstd.

Value quantization (``full`` and ``values``), per answer position with values ``v_0 >= ... >= v_{K-1}``:

    max = v_0, span = v_0 - v_{K-1}           (stored as fp16; quantization and decoding use the stored ones)
    q_j = round(sqrt(clip((max - v_j) / span, 0, 1)) * M),   M = 2^bits - 1,  q_0 = 0,  q_{K-1} = M
    (q_j = 0 for every j when span == 0), made non-decreasing by a running maximum
    stored codes c_j = q_j - q_{j-1}  for j = 1..K-2   (non-negative; q_{K-1} = M is implied, never stored)
    decoded v_j = max - span * (Q_j / M)^2,  Q_j = c_1 + ... + c_j,  Q_0 = 0,  Q_{K-1} = M

The square-root companding spends the code points near the maximum, where the probability mass (and so the KL and
the ULD loss) is; the deltas are small non-negative integers that zstd packs to a few bits each.

Every decode is vectorized over a whole record batch (numpy); corrupt codes are refused with the shard and row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError

CODEC_NAMES = ("full", "values", "raw")
DEFAULT_VALUE_BITS = {"full": 6, "values": 8}
DEFAULT_ZSTD_LEVEL = 3


@dataclass(frozen=True)
class CodecSpec:
    """A validated codec with its parameters.

    Attributes:
        name: "raw", "full" or "values".
        value_bits: bits per quantized value code (2..16), full/values only.
        id_bytes: bytes per token id (1..4) = number of id byte planes, full only.
        zstd_level: zstd level of the Arrow IPC buffer compression, full/values only.
    """

    name: str
    value_bits: int | None = None
    id_bytes: int | None = None
    zstd_level: int | None = None

    @property
    def has_ids(self) -> bool:
        return self.name != "values"

    @property
    def has_targets(self) -> bool:
        return self.name != "values"

    @property
    def has_tail_mass(self) -> bool:
        return self.name == "full"

    @property
    def compressed(self) -> bool:
        return self.name != "raw"

    def to_json(self) -> dict:
        """The manifest / schema-metadata form: ``{"name": ..., params...}`` (no None values)."""
        out = {"name": self.name}
        for key in ("value_bits", "id_bytes", "zstd_level"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def columns(self) -> dict[str, pa.DataType]:
        """The codec's Arrow columns (after the common columns), in schema order."""
        code_type = pa.uint8() if (self.value_bits or 0) <= 8 else pa.uint16()
        if self.name == "raw":
            return {
                "topk_ids": pa.list_(pa.int32()),
                "topk_logprobs": pa.list_(pa.float32()),
                "target_logprobs": pa.list_(pa.float32()),
            }
        if self.name == "full":
            cols = {f"topk_ids_b{i}": pa.list_(pa.uint8()) for i in range(self.id_bytes)}
            cols.update(
                {
                    "topk_max": pa.list_(pa.float16()),
                    "topk_span": pa.list_(pa.float16()),
                    "topk_codes": pa.list_(code_type),
                    "tail_mass": pa.list_(pa.float16()),
                    "target_logprobs": pa.list_(pa.float16()),
                }
            )
            return cols
        return {
            "topk_max": pa.list_(pa.float16()),
            "topk_span": pa.list_(pa.float16()),
            "topk_codes": pa.list_(code_type),
        }

    def ipc_options(self) -> pa.ipc.IpcWriteOptions:
        """Arrow IPC write options: zstd buffer compression for the compact codecs."""
        if not self.compressed:
            return pa.ipc.IpcWriteOptions()
        return pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=self.zstd_level))


def id_bytes_for_vocab(vocab_size: int) -> int:
    """Bytes per id so that every id < vocab_size fits (2 for a 49152 vocab, 3 for 151k)."""
    return max(1, (int(vocab_size - 1).bit_length() + 7) // 8)


def make_codec(
    name: str, *, value_bits: int | None = None, vocab_size: int | None = None, zstd_level: int | None = None
):
    """Build a CodecSpec from build options (``--codec``, ``--value-bits``); raises ConfigError on bad values."""
    if name not in CODEC_NAMES:
        raise ConfigError(f"--codec {name!r}: unknown codec; choose one of {list(CODEC_NAMES)}")
    if name == "raw":
        if value_bits is not None:
            raise ConfigError("--value-bits: the raw codec stores exact fp32 values and takes no value bits")
        return CodecSpec("raw")
    params = {
        "name": name,
        "value_bits": DEFAULT_VALUE_BITS[name] if value_bits is None else value_bits,
        "zstd_level": DEFAULT_ZSTD_LEVEL if zstd_level is None else zstd_level,
    }
    if name == "full":
        if vocab_size is None:
            raise ConfigError("the full codec needs the teacher's vocabulary size")
        params["id_bytes"] = id_bytes_for_vocab(vocab_size)
    try:
        return parse_codec(params)
    except ShardFormatError as e:
        raise ConfigError(str(e)) from None


def parse_codec(raw: object, where: str = "codec") -> CodecSpec:
    """Validate a codec dict from a manifest or schema metadata (untrusted). Raises ShardFormatError."""
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{where}: must be an object like {{'name': 'raw'}}, got {raw!r}")
    name = raw.get("name")
    if name not in CODEC_NAMES:
        raise ShardFormatError(f"{where}: codec {name!r} is unknown; this version reads {list(CODEC_NAMES)}")
    allowed = {"raw": {"name"}, "full": {"name", "value_bits", "id_bytes", "zstd_level"}}.get(
        name, {"name", "value_bits", "zstd_level"}
    )
    extra = set(raw) - allowed
    missing = allowed - set(raw)
    if extra or missing:
        raise ShardFormatError(
            f"{where}: codec {name!r} takes exactly {sorted(allowed)}; "
            f"unknown {sorted(extra)}, missing {sorted(missing)}"
        )

    def _int(key: str, lo: int, hi: int) -> int:
        v = raw[key]
        if type(v) is not int or not lo <= v <= hi:
            raise ShardFormatError(f"{where}: codec {name!r} {key}={v!r} must be an integer in [{lo}, {hi}]")
        return v

    if name == "raw":
        return CodecSpec("raw")
    bits = _int("value_bits", 2, 16)
    level = _int("zstd_level", -7, 22)
    ids = _int("id_bytes", 1, 4) if name == "full" else None
    return CodecSpec(name, value_bits=bits, id_bytes=ids, zstd_level=level)


# ------------------------------------------------------------------------------------------------ values
def quantize_values(values: np.ndarray, bits: int, stored_dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """Quantize sorted top-K rows.

    Args:
        values: float32 [N, K], each row sorted descending (log-probs).
        bits: code width; codes live in [0, 2^bits - 1].
        stored_dtype: dtype of the stored max/span (float32 or float16).

    Returns:
        (vmax [N] stored_dtype, span [N] stored_dtype, codes [N, K-2] uint8/uint16: the deltas of the codes
        q_1..q_{K-2}; q_0 = 0 and q_{K-1} = 2^bits - 1 are implied).
    """
    v = values.astype(np.float64)
    if v.ndim != 2 or v.shape[1] < 2:
        raise ValueError(f"values must be [N, K>=2], got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("top-K values must be finite to be quantized")
    if (np.diff(v, axis=1) > 0).any():
        raise ValueError("top-K values must be sorted descending in every row")
    m = (1 << bits) - 1
    vmax = v[:, 0].astype(stored_dtype)
    span = np.maximum(v[:, 0] - v[:, -1], 0).astype(stored_dtype)
    s = span.astype(np.float64)
    x = (vmax.astype(np.float64)[:, None] - v) / np.where(s > 0, s, 1.0)[:, None]
    q = np.rint(np.sqrt(np.clip(x, 0.0, 1.0)) * m).astype(np.int64)
    q[:, 0] = 0
    q[:, -1] = m  # the last value is max - span by definition: its code is implied, never stored
    q[s <= 0] = 0
    q = np.maximum.accumulate(q, axis=1)  # monotone even where the stored max rounded below v_0
    codes = np.diff(q[:, :-1], axis=1).astype(np.uint8 if bits <= 8 else np.uint16)
    return vmax, span, codes


def dequantize_values(vmax: np.ndarray, span: np.ndarray, codes: np.ndarray, bits: int, shard: str) -> np.ndarray:
    """Inverse of quantize_values. codes [N, K-2] -> float32 [N, K]. Refuses codes that overflow 2^bits - 1."""
    m = (1 << bits) - 1
    n = codes.shape[0]
    qi = np.empty((n, codes.shape[1] + 2), dtype=np.int32)
    qi[:, 0] = 0
    qi[:, -1] = m
    np.cumsum(codes, axis=1, dtype=np.int32, out=qi[:, 1:-1])  # integer cumsum: ~3x faster than float32's
    q = qi.astype(np.float32)  # exact: every code is < 2^17
    vmax = vmax.astype(np.float32)
    span = span.astype(np.float32)
    bad = np.flatnonzero((q[:, -2] > m) | ~np.isfinite(vmax) | ~np.isfinite(span) | (span < 0))
    if bad.size:
        t = int(bad[0])
        raise ShardFormatError(
            f"{shard}: answer position {t}: corrupt value codes (sum {int(q[t, -2])} > {m}, "
            f"max {float(vmax[t])}, span {float(span[t])})"
        )
    q *= np.float32(1.0 / m)
    np.square(q, out=q)
    q *= span[:, None]
    np.subtract(vmax[:, None], q, out=q)
    return q


def tail_mass(values: np.ndarray) -> np.ndarray:
    """1 - sum(exp(top-K log-probs)) per row, clipped to [0, 1]. values [N, K] -> float32 [N]."""
    v = values.astype(np.float64)
    return np.clip(1.0 - np.exp(v).sum(axis=1), 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ ids
def pack_ids(ids: np.ndarray, id_bytes: int) -> list[np.ndarray]:
    """int ids [..] -> ``id_bytes`` uint8 arrays of the same shape, least significant byte first."""
    a = ids.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= 1 << (8 * id_bytes)):
        raise ValueError(f"token id out of range for {id_bytes} id bytes: min {a.min()}, max {a.max()}")
    return [((a >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(id_bytes)]


def unpack_ids(planes: list[np.ndarray]) -> np.ndarray:
    """Inverse of pack_ids: uint8 planes (least significant first) -> int32 ids."""
    out = planes[-1].astype(np.int32)
    for p in reversed(planes[:-1]):
        out <<= 8
        out |= p
    return out


# ------------------------------------------------------------------------------------------------ id order
# The `full` codec stores each id's rank in a per-shard order instead of the id itself: frequent ids get small
# ranks, so the high byte plane is mostly zero and the low one skewed, which zstd's Huffman stage exploits
# (108.6 -> 96.1 B/token at K=64 on SmolLM2 output, the order costing 0.45 B/token).
ID_ORDER_KEY = b"fusion_cache_id_order"


def make_id_order(ids: np.ndarray) -> np.ndarray:
    """The order of a shard: its distinct ids by frequency class floor(log2(count)) descending, then id ascending.

    Args:
        ids: int [...] ids (the shard's first record batch).

    Returns:
        int64 [U] distinct ids.
    """
    u, c = np.unique(ids.reshape(-1).astype(np.int64), return_counts=True)
    cls = np.floor(np.log2(c)).astype(np.int64)
    return u[np.lexsort((u, -cls))]


def id_order_metadata(order: np.ndarray) -> bytes:
    """Serialize an order as the JSON stored under ``ID_ORDER_KEY`` (docs/cache-format.md section 1.2).

    The order is cut into runs of ascending ids; each run is stored as deltas from 0 (first) and from the previous
    id, as uint32 little-endian, zstd-compressed and base64-encoded: {"runs": [...], "count": U, "zstd_b64": "..."}.
    """
    import base64

    order = np.asarray(order, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(order) <= 0) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64) if order.size else np.zeros(0, np.int64)
    runs = np.diff(np.concatenate([starts, [order.size]])).tolist()
    deltas = np.diff(order, prepend=0)
    deltas[starts] = order[starts]
    raw = deltas.astype("<u4").tobytes()
    packed = pa.Codec("zstd", compression_level=19).compress(raw, asbytes=True)
    doc = {"runs": runs, "count": int(order.size), "zstd_b64": base64.b64encode(packed).decode()}
    import json

    return json.dumps(doc, separators=(",", ":")).encode()


_ORDER_CACHE: dict[bytes, np.ndarray] = {}


def parse_id_order(meta: bytes | None, id_bytes: int, shard: str) -> np.ndarray:
    """The order stored in a shard's metadata (validated: distinct ids in range). Cached per distinct value."""
    import base64
    import binascii
    import json

    if meta is None:
        raise ShardFormatError(f"{shard}: schema metadata key {ID_ORDER_KEY.decode()!r} (the id order) is missing")
    if meta in _ORDER_CACHE:
        return _ORDER_CACHE[meta]
    try:
        doc = json.loads(meta)
        runs, count = doc["runs"], doc["count"]
        if type(count) is not int or not 0 <= count <= 1 << (8 * id_bytes):
            raise ValueError(f"count {count!r} out of range")
        if not isinstance(runs, list) or any(type(r) is not int or r < 1 for r in runs) or sum(runs) != count:
            raise ValueError("runs must be positive integers summing to count")
        raw = pa.Codec("zstd").decompress(base64.b64decode(doc["zstd_b64"], validate=True), count * 4, asbytes=True)
        deltas = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    except (ValueError, KeyError, TypeError, binascii.Error, pa.ArrowException) as e:
        raise ShardFormatError(f"{shard}: id order metadata is corrupt: {e}") from None
    order = np.cumsum(deltas)
    if count:
        starts = np.concatenate([[0], np.cumsum(runs)[:-1]])
        base = np.repeat(order[starts] - deltas[starts], runs)
        order = order - base
    if order.size and (order.max() >= 1 << (8 * id_bytes) or np.unique(order).size != order.size):
        raise ShardFormatError(f"{shard}: id order holds ids out of range or repeated")
    if len(_ORDER_CACHE) > 64:
        _ORDER_CACHE.clear()
    _ORDER_CACHE[meta] = order
    return order


def ids_to_ranks(ids: np.ndarray, order: np.ndarray) -> np.ndarray:
    """rank(id): its index in ``order``, or U + (number of ids not in order that are < id). A bijection."""
    ids = ids.astype(np.int64)
    u = order.size
    if u == 0:
        return ids
    srt = np.sort(order)
    rank_of_sorted = np.empty(u, dtype=np.int64)
    rank_of_sorted[np.searchsorted(srt, order)] = np.arange(u)
    j = np.searchsorted(srt, ids)
    jj = np.minimum(j, u - 1)
    return np.where(srt[jj] == ids, rank_of_sorted[jj], u + ids - j)


def ranks_to_ids(ranks: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Inverse of ids_to_ranks, vectorized: one gather through a table of the ranks present."""
    if ranks.size == 0:
        return ranks.astype(np.int32)
    top = int(ranks.max()) + 1
    u = order.size
    if top <= u:
        return order[ranks].astype(np.int32)
    unseen = np.setdiff1d(np.arange(top, dtype=np.int64), order, assume_unique=True)[: top - u]
    return np.concatenate([order, unseen])[ranks].astype(np.int32)


_PERM_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def rank_table(order: np.ndarray, size: int) -> np.ndarray:
    """The full rank -> id table over [0, size) (for 1- and 2-byte ids), cached per order array."""
    hit = _PERM_CACHE.get(id(order))
    if hit is not None and hit[0] is order and hit[1].size == size:
        return hit[1]
    unseen = np.setdiff1d(np.arange(size, dtype=np.int64), order, assume_unique=True)
    table = np.concatenate([order, unseen]).astype(np.int32)
    if len(_PERM_CACHE) > 64:
        _PERM_CACHE.clear()
    _PERM_CACHE[id(order)] = (order, table)
    return table
