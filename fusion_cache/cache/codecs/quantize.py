"""Value quantization of the compact codecs (full, values, shape) and `QuantizedCodec`, their common base.

Per answer position with values ``v_0 >= ... >= v_{K-1}`` (docs/cache-format.md section 1.2 is the spec):

    max = v_0, span = v_0 - v_{K-1}           (stored as fp16; quantization and decoding use the stored ones)
    q_j = round(f(clip((max - v_j) / span, 0, 1)) * M),   M = 2^bits - 1,  q_0 = 0,  q_{K-1} = M
    (q_j = 0 for every j when span == 0), made non-decreasing by a running maximum
    stored codes c_j = q_j - q_{j-1}  for j = 1..K-2   (non-negative; q_{K-1} = M is implied, never stored)
    decoded v_j = max - span * g(Q_j / M),  Q_j = c_1 + ... + c_j,  Q_0 = 0,  Q_{K-1} = M

with the companding ``f(x) = sqrt(x)``, ``g(y) = y^2`` (``values``, ``full`` layout 1), ``f(x) = ln(1 + 16 x) /
ln(17)``, ``g(y) = (17^y - 1) / 16`` (``full`` layouts 2 and 3: finer near the maximum, where the probability mass
and so the KL is; 1.3 B/token less than the square root at a lower KL on SmolLM2 output), or ``f(x) = g(x) = x`` with
max = 0 and span = 1 after the division (``shape``: the z-score weighs every value alike, and linear codes moved
the ULD loss less than square-root ones at the same size). The deltas are small non-negative integers that zstd packs
to a few bits each.

Every decode is vectorized over a whole record batch (numpy; the grouped codes of full layouts 2 and 3 in chunks of
~65k codes so each pass stays in the L2 cache); corrupt codes are refused with the shard and answer position. These
numpy decoders are the reference: where numba is installed, the grouped value codes go through a compiled loop with
the same results bit for bit (fusion_cache/cache/fast_decode.py; ``FUSION_CACHE_DECODER=numpy`` turns it off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa

from fusion_cache.cache import fast_decode
from fusion_cache.cache.codecs.base import BYTES_EVEN
from fusion_cache.cache.codecs.base import DECODE_CHUNK
from fusion_cache.cache.codecs.base import LANES_INCL
from fusion_cache.cache.codecs.base import WORDS_INCL
from fusion_cache.cache.codecs.base import Codec
from fusion_cache.cache.codecs.base import code_groups
from fusion_cache.errors import ShardFormatError

MU = 16.0  # the log companding's curvature (full layouts 2 and 3): f(x) = ln(1 + MU x) / ln(1 + MU)
VALUE_BITS = (2, 16)  # the range of value_bits a manifest may hold
ZSTD_LEVELS = (-7, 22)  # the range of zstd_level a manifest may hold


@dataclass(frozen=True, kw_only=True)
class QuantizedCodec(Codec):
    """A codec that stores the top-K values as quantized code deltas in zstd-compressed Arrow IPC buffers.

    Attributes:
        value_bits: bits per value code (2..16).
        zstd_level: zstd level of the Arrow IPC buffer compression.
    """

    value_bits: int
    zstd_level: int
    companding: ClassVar[str]  # "sqrt", "log" or "linear" (module docstring)

    @classmethod
    def from_params(cls, read: Callable[[str, int, int], int], schema_version: int) -> QuantizedCodec:
        return cls(value_bits=read("value_bits", *VALUE_BITS), zstd_level=read("zstd_level", *ZSTD_LEVELS))

    @classmethod
    def from_options(cls, *, value_bits: int | None, zstd_level: int | None, vocab_size: int | None) -> QuantizedCodec:
        return cls(**cls._default_params(value_bits, zstd_level))

    @classmethod
    def _default_params(cls, value_bits: int | None, zstd_level: int | None) -> dict:
        return {
            "value_bits": cls.default_value_bits if value_bits is None else value_bits,
            "zstd_level": cls.default_zstd_level if zstd_level is None else zstd_level,
        }

    @property
    def code_type(self) -> pa.DataType:
        """The Arrow type of a stored value code."""
        return pa.uint8() if self.value_bits <= 8 else pa.uint16()

    def ipc_options(self) -> pa.ipc.IpcWriteOptions:
        return pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=self.zstd_level))


def _compand(x: np.ndarray, companding: str) -> np.ndarray:
    """f(x) of the module docstring, for x in [0, 1] (float64)."""
    if companding == "sqrt":
        return np.sqrt(x)
    if companding == "log":
        return np.log1p(MU * x) / np.log1p(MU)
    return x


_EXPAND_CACHE: dict[tuple[str, int], np.ndarray] = {}


def expand_table(companding: str, m: int) -> np.ndarray:
    """g(Q / m) for Q = 0..m as float32 [m + 1] (computed in float64): the decoder's lookup table."""
    key = (companding, m)
    if key not in _EXPAND_CACHE:
        y = np.arange(m + 1, dtype=np.float64) / m
        g = {"sqrt": lambda y: y * y, "log": lambda y: np.expm1(y * np.log1p(MU)) / MU}.get(companding, lambda y: y)
        _EXPAND_CACHE[key] = g(y).astype(np.float32)
    return _EXPAND_CACHE[key]


def quantize_values(
    values: np.ndarray, bits: int, stored_dtype: np.dtype, companding: str = "sqrt"
) -> tuple[np.ndarray, ...]:
    """Quantize sorted top-K rows.

    Args:
        values: float32 [N, K], each row sorted descending (log-probs).
        bits: code width; codes live in [0, 2^bits - 1].
        stored_dtype: dtype of the stored max/span (float32 or float16).
        companding: "sqrt", "log" or "linear" (module docstring). With "linear" (the shape codec) the exact
            float64 max and span normalize the row and nothing of them is stored.

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
    if companding == "linear":
        top, s = v[:, 0], v[:, 0] - v[:, -1]
    else:
        top, s = vmax.astype(np.float64), span.astype(np.float64)
    x = (top[:, None] - v) / np.where(s > 0, s, 1.0)[:, None]
    q = np.rint(_compand(np.clip(x, 0.0, 1.0), companding) * m).astype(np.int64)
    q[:, 0] = 0
    q[:, -1] = m  # the last value is max - span by definition: its code is implied, never stored
    q[s <= 0] = 0
    q = np.maximum.accumulate(q, axis=1)  # monotone even where the stored max rounded below v_0
    codes = np.diff(q[:, :-1], axis=1).astype(np.uint8 if bits <= 8 else np.uint16)
    return vmax, span, codes


def code_sums(
    codes: np.ndarray | list[np.ndarray], bits: int, groups: list[tuple[int, int]] | None = None, n: int | None = None
) -> np.ndarray:
    """Q of the module docstring: int32 [N, K] with Q_0 = 0, Q_{K-1} = 2^bits - 1 and the running sums of the code
    deltas between. ``codes`` is [N, K-2], or (full layouts 2, 3) one [N, b - a] array per column group ``groups`` of
    an ``n``-row matrix."""
    m = (1 << bits) - 1
    if groups is not None:  # reassemble first: a cumsum over short strided group slices is several times slower
        joined = np.empty((n, groups[-1][1] if groups else 0), dtype=codes[0].dtype if codes else np.uint8)
        for c, (a, b) in zip(codes, groups, strict=True):
            joined[:, a:b] = c
        codes = joined
    qi = np.empty((codes.shape[0], codes.shape[1] + 2), dtype=np.int32)
    qi[:, 0] = 0
    qi[:, -1] = m
    np.cumsum(codes, axis=1, dtype=np.int32, out=qi[:, 1:-1])  # integer cumsum: ~3x faster than float32's
    return qi


def dequantize_values(
    vmax: np.ndarray | None,
    span: np.ndarray | None,
    codes: np.ndarray,
    bits: int,
    shard: str,
    companding: str = "sqrt",
    qi: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of quantize_values. codes [N, K-2] (or their sums ``qi`` [N, K] from code_sums) -> float32 [N, K].
    Refuses codes that overflow 2^bits - 1.

    With "linear" companding (shape codec) vmax and span are None and the rows decode to -Q / M in [-1, 0].
    """
    m = (1 << bits) - 1
    if qi is None:
        qi = code_sums(codes, bits)
    n = qi.shape[0]
    if vmax is None:
        vmax = np.zeros(n, np.float32)
        span = np.ones(n, np.float32)
    vmax = vmax.astype(np.float32)
    span = span.astype(np.float32)
    bad = np.flatnonzero((qi[:, -2] > m) | ~np.isfinite(vmax) | ~np.isfinite(span) | (span < 0))
    if bad.size:
        t = int(bad[0])
        raise ShardFormatError(
            f"{shard}: answer position {t}: corrupt value codes (sum {int(qi[t, -2])} > {m}, "
            f"max {float(vmax[t])}, span {float(span[t])})"
        )
    if companding == "sqrt":
        q = qi.astype(np.float32)  # exact: every code is < 2^17
        q *= np.float32(1.0 / m)
        np.square(q, out=q)
    elif companding == "linear":
        q = qi.astype(np.float32)
        q *= np.float32(1.0 / m)
        return np.negative(q, out=q)
    else:
        q = np.take(expand_table(companding, m), qi)  # np.take: ~1.5x faster than fancy indexing
    q *= span[:, None]
    np.subtract(vmax[:, None], q, out=q)
    return q


def tail_mass(values: np.ndarray) -> np.ndarray:
    """1 - sum(exp(top-K log-probs)) per row, clipped to [0, 1]. values [N, K] -> float32 [N]."""
    v = values.astype(np.float64)
    return np.clip(1.0 - np.exp(v).sum(axis=1), 0.0, 1.0).astype(np.float32)


def decode_value_groups(
    codes: list[np.ndarray],
    vmax: np.ndarray,
    span: np.ndarray,
    k: int,
    bits: int,
    shard: str,
    companding: str = "log",
    *,
    chunk: int = DECODE_CHUNK,
) -> np.ndarray:
    """Values of full layouts 2 and 3: dequantize_values(vmax, span, code_sums(codes, bits, code_groups(k), n)) in
    chunks.

    Args:
        codes: one uint8/uint16 [n, b - a] array per column group ``code_groups(k)`` of the [n, K-2] code deltas.
        vmax, span: fp16 [n] (the stored row maxima and spans).
        chunk: the numpy decoder's step, in symbols (tests vary it; every value decodes the same).

    Returns:
        float32 [n, K]. Refuses (naming the shard and answer position) codes that sum past 2^bits - 1 and a
        non-finite or negative max or span.

    About ``chunk`` codes at a time go through a scratch [rows, K] matrix (the groups copied in after a zero
    column), then the running sums Q, the expansion table gathered with int64 indices (no index conversion)
    straight into the output, scaled by the negated span and added to the max. For codes of up to 8 bits every
    valid Q fits in a byte, so the running sums are computed eight bytes at a time (``LANES_INCL``: one uint64
    multiplication gives the prefix sums inside eight lanes, then each lane group's carry is added): about 1/8 of
    a numpy pass per code where a cumsum is a sequential loop over every code, and it is checked first with exact
    per-row totals (so no lane can overflow). Wider codes take one flat int64 cumsum across the rows minus each
    row's running total before it (a flat cumsum is ~1.5x faster than numpy's per-row ``axis=1`` one).
    """
    n = vmax.shape[0]
    m = (1 << bits) - 1
    vmax = vmax.astype(np.float32)
    span = span.astype(np.float32)
    groups = code_groups(k)
    out = np.empty((n, k), np.float32)
    if n == 0:
        return out
    table = expand_table(companding, m)
    fast = fast_decode.kernels() if groups else None
    if fast is not None:  # the compiled decoder: the same float32 arithmetic, one pass
        starts, ends = fast_decode.group_bounds(groups)
        codes_t = tuple(fast_decode.readonly(c) for c in codes)
        t = fast["value_groups"](codes_t, starts, ends, vmax, span, n, k, m, table, out)
        if t >= 0:
            total_t = int(sum(int(np.sum(c[t], dtype=np.int64)) for c in codes))
            raise ShardFormatError(
                f"{shard}: answer position {t}: corrupt value codes (sum {total_t} > {m}, "
                f"max {float(vmax[t])}, span {float(span[t])})"
            )
        return out
    bad = ~np.isfinite(vmax) | ~np.isfinite(span) | (span < 0)
    neg_span = np.negative(span)
    # twice the ids' chunk: the eight-lane steps work on 1/8 of the codes each, so a smaller chunk is bound by
    # numpy's per-call cost (K=64: 3.9 ms against 4.7 at DECODE_CHUNK codes)
    rows = max(1, min(n, 2 * chunk // k))
    lanes = bits <= 8 and all(c.dtype == np.uint8 for c in codes)
    width = -(-k // 8) * 8 if lanes else k  # whole uint64 lane groups (the padding columns stay 0)
    scratch = np.zeros((rows, width), dtype=np.uint8 if lanes else (codes[0].dtype if codes else np.uint8))
    q, before = np.empty((rows, k), np.int64), np.empty(rows, np.int64)
    if lanes:
        g8 = width // 8
        prefix, sums, tmp, carry = (np.empty((rows, g8), "<u8") for _ in range(4))
    for t0 in range(0, n, rows):
        t1 = min(t0 + rows, n)
        r = t1 - t0
        sc, qc, o = scratch[:r], q[:r], out[t0:t1]
        for c, (a, b) in zip(codes, groups, strict=True):
            sc[:, 1 + a : 1 + b] = c[t0:t1]
        if lanes:
            x, p, gs, tm, cy = sc.view("<u8"), prefix[:r], sums[:r], tmp[:r], carry[:r]
            # exact sum of each lane group's eight bytes: bytes -> four 16-bit lanes -> their sum in the top lane
            np.bitwise_and(x, BYTES_EVEN, out=gs)
            np.right_shift(x, np.uint64(8), out=tm)
            tm &= BYTES_EVEN
            gs += tm
            gs *= WORDS_INCL
            gs >>= np.uint64(48)
            np.cumsum(gs.reshape(-1), out=cy.reshape(-1))  # inclusive, across the rows
            total = cy[:, -1] - (cy[:, 0] - gs[:, 0])  # each row's sum (uint64 wraps back exactly)
            over = total > np.uint64(m)
        else:
            flat = qc.reshape(-1)
            np.cumsum(sc.reshape(-1), dtype=np.int64, out=flat)
            np.copyto(before[:r], qc[:, 0])  # column 0 holds the running total of the rows before
            qc -= before[:r, None]  # (a copy first: an operand overlapping the output is copied whole by numpy)
            over = qc[:, -2] > m if k > 2 else np.zeros(r, bool)
        if over.any() or bad[t0:t1].any():
            t = int(np.flatnonzero(over | bad[t0:t1])[0])
            total_t = int(np.sum(sc[t], dtype=np.int64))
            raise ShardFormatError(
                f"{shard}: answer position {t0 + t}: corrupt value codes (sum {total_t} > {m}, "
                f"max {float(vmax[t0 + t])}, span {float(span[t0 + t])})"
            )
        if lanes:
            cy -= gs  # exclusive running sums across the rows ...
            np.copyto(before[:r], cy[:, 0].view(np.int64))
            cy -= before[:r, None].view(np.uint64)  # ... restarted at each row: the carry into each lane group
            cy *= LANES_INCL  # copied into every byte
            np.multiply(x, LANES_INCL, out=p)  # prefix sums inside each lane group (every one <= m <= 255)
            p += cy
            np.copyto(qc, p.view(np.uint8)[:, :k])  # Q, widened for the gather
        qc[:, -1] = m
        np.take(table, qc, out=o, mode="clip")
        # max - span * g as max + (-span) * g: the same float32 result bit for bit (negation is exact), and the
        # output is the first operand of the add, so numpy does not copy it first (as it does for max - o)
        o *= neg_span[t0:t1, None]
        o += vmax[t0:t1, None]
    return out
