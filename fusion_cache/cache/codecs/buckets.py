"""Full layout 2's ids (schema version 3, still read): each rank as a bucket byte plus bit-packed offset bits.

Ranks below 64 are their own bucket (no offset bits); above, with e = floor(log2 r), bucket = 64 + 8 (e - 6) + the
three bits after the leading one, and the e - 3 bits below them are the offset. zstd's Huffman stage codes the bucket
bytes close to their entropy, the offsets are nearly uniform inside a bucket (an octave cut in eight), so this
reaches within 1.5% of the ranks' order-0 entropy on SmolLM2 output while every step of the decoder is a whole-array
numpy operation. Layout 3's byte planes (ids.py) are 1.2 B/token larger at the same zstd level, and decode ~2.5x
faster.
"""

from __future__ import annotations

import numpy as np

from fusion_cache.cache.codecs.base import DECODE_CHUNK
from fusion_cache.cache.codecs.base import LANES_EXCL
from fusion_cache.cache.codecs.base import LANES_INCL
from fusion_cache.errors import ShardFormatError

BUCKET_DIRECT = 64  # ranks below this are coded by the bucket byte alone
BUCKET_SUB_BITS = 3  # each octave above is cut into 2^3 buckets


_BUCKET_CACHE: dict[int, tuple[np.ndarray, ...]] = {}


def bucket_tables(id_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offset bits [B] uint8, base rank [B] int32, offset mask [B] uint32) of every bucket of ``id_bytes``-byte
    ranks; B = 64 + 8 (8D - 6)."""
    if id_bytes not in _BUCKET_CACHE:
        octaves = 8 * id_bytes - 6  # e = 6 .. 8D-1
        e = 6 + np.arange(octaves * 8, dtype=np.int64) // 8
        sub = np.arange(octaves * 8, dtype=np.int64) % 8
        w = np.concatenate([np.zeros(BUCKET_DIRECT, np.int64), e - BUCKET_SUB_BITS])
        base = np.concatenate([np.arange(BUCKET_DIRECT), (8 + sub) << (e - BUCKET_SUB_BITS)])
        mask = (np.int64(1) << w) - 1
        _BUCKET_CACHE[id_bytes] = (w.astype(np.uint8), base.astype(np.int32), mask.astype(np.uint32))
    return _BUCKET_CACHE[id_bytes]


def encode_bucket_ids(
    ranks: np.ndarray, counts: np.ndarray, id_bytes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ranks into bucket bytes and per-row bit-packed offsets.

    Args:
        ranks: int [S] the ranks of every answer position's K ids, row after row (row-major [n, K] each).
        counts: int [R] symbols per row (n_answer * K); sum(counts) == S.
        id_bytes: D; every rank must be < 256^D.

    Returns:
        (buckets uint8 [S], offset bytes uint8 [sum(nbytes)], nbytes int64 [R]): row r's offsets are packed
        least-significant bit first, in symbol order, into ceil(bits_r / 8) bytes (the last one zero-padded).
    """
    r = ranks.astype(np.int64)
    if r.size and (r.min() < 0 or r.max() >= 1 << (8 * id_bytes)):
        raise ValueError(f"rank out of range for {id_bytes} id bytes: min {r.min()}, max {r.max()}")
    e = np.zeros_like(r)
    big = r >= BUCKET_DIRECT
    e[big] = np.floor(np.log2(r[big])).astype(np.int64)
    # float log2 can be off by one just below a power of two: fix it exactly
    e[big] += (r[big] >> (e[big] + 1)) > 0
    e[big] -= (r[big] >> e[big]) == 0
    w = np.where(big, e - BUCKET_SUB_BITS, 0)
    buckets = np.where(big, BUCKET_DIRECT + 8 * (e - 6) + ((r >> np.maximum(w, 0)) & 7), r).astype(np.uint8)
    offsets = r & ((np.int64(1) << w) - 1)
    row_bits = np.add.reduceat(w, _starts(counts)) if r.size else np.zeros(len(counts), np.int64)
    row_bits[counts == 0] = 0
    nbytes = (row_bits + 7) // 8
    pos = _bit_positions(w, counts, nbytes)
    bits = np.zeros(int(nbytes.sum()) * 8, dtype=np.uint8)
    for b in range(int(w.max()) if w.size else 0):  # one pass per offset bit (at most 21), not per symbol
        sel = (w > b) & (((offsets >> b) & 1) == 1)
        bits[pos[sel] + b] = 1
    return buckets, np.packbits(bits, bitorder="little"), nbytes


def _starts(counts: np.ndarray) -> np.ndarray:
    """Index of each row's first symbol (rows of zero symbols get a valid index; their sums are zeroed)."""
    s = np.zeros(len(counts), np.int64)
    np.cumsum(counts[:-1], out=s[1:])
    return np.minimum(s, max(int(np.sum(counts)) - 1, 0))


def _bit_positions(w: np.ndarray, counts: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Bit position (int32) of each symbol's offset in the concatenated per-row byte streams: an exclusive cumsum
    of the widths ``w`` (uint8), with each row's padding added to its last symbol so the next row starts on its own
    byte (the encoder's; the decoder works in chunks, decode_bucket_ids)."""
    if int(nbytes.sum()) >= 1 << 28:
        raise ShardFormatError(f"a record batch holds {int(nbytes.sum())} offset bytes, more than 2^28")
    w2 = w.astype(np.uint8, copy=True)
    has = counts > 0
    if w2.size:
        last = np.cumsum(counts)[has] - 1
        row_bits = np.add.reduceat(w2, _starts(counts), dtype=np.int64)[has]
        w2[last] += (nbytes[has] * 8 - row_bits).astype(np.uint8)  # padding < 8, one last symbol per row
    pos = np.empty(w2.shape, np.int32)
    if pos.size:
        pos[0] = 0
        np.cumsum(w2[:-1], dtype=np.int32, out=pos[1:])  # int32: 6x faster than int64 here
    return pos


def bucket_widths(buckets: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """w(b), the offset bits of every (validated) bucket byte: uint8, same shape (into ``out`` if given).

    0 below 64, else 3 + (b - 64) // 8 = (b >> 3) - 5: five uint8 passes, several times cheaper than a table
    gather (which first widens every index to int64). Every operand is uint8: a mixed-type numpy operation casts
    through a buffer and runs several times slower.
    """
    w = np.right_shift(buckets, np.uint8(3), out=out)
    w -= np.uint8(5)  # wraps below 64; those are zeroed next
    big = np.greater_equal(buckets, np.uint8(BUCKET_DIRECT)).view(np.uint8)
    w &= np.negative(big, out=big)  # 0xFF where b >= 64 (and, not multiply: numpy has no SIMD uint8 multiply)
    return w


def decode_bucket_ids(
    buckets: np.ndarray,
    offset_bytes: np.ndarray,
    nbytes: np.ndarray,
    counts: np.ndarray,
    id_bytes: int,
    shard: str,
    table: np.ndarray | None = None,
    *,
    chunk: int = DECODE_CHUNK,
) -> np.ndarray:
    """Inverse of encode_bucket_ids: ranks int32 [S], or ``table[rank]`` when a rank -> id ``table`` is given.

    Refuses unknown buckets and offset streams whose length differs from what the buckets say, naming the shard and
    row. Each row's bit count comes from byte sums eight widths at a time (``LANES_*``, codecs/base.py). The rows
    are then decoded in chunks of whole rows of about ``chunk`` ids (a row's offsets start on a byte, so a chunk's
    bit positions are an exclusive uint32 cumsum of its widths, the row padding put on each row's last width), each
    chunk as ~20 numpy passes over scratch buffers allocated once, in the core's L2 cache: widths and bucket bases by
    uint8 arithmetic (no table gathers: a gather first widens every index to int64), one gather of unaligned 32-bit
    words of the stream, shifts and masks in uint32, and the rank -> id gather. Every operation is between arrays of one
    dtype (mixed dtypes make numpy cast through a buffer, several times slower) and every gather is
    ``np.take(..., out=, mode="clip")`` with int64 indices (no conversion, no bounds pass; indices are in range by
    construction). About 2x faster than whole-array passes with table gathers (8.2-8.6 against 16.7-18.3 ms for
    1.1M ids of K=64 SmolLM2 output; benchmarks/results/codec.md).
    """
    n_buckets = BUCKET_DIRECT + 8 * (8 * id_bytes - 6)
    if buckets.size and int(buckets.max()) >= n_buckets:
        t = int(np.flatnonzero(buckets >= n_buckets)[0])
        raise ShardFormatError(
            f"{shard}: id symbol {t}: bucket {int(buckets[t])} does not exist for {id_bytes}-byte ids"
        )
    counts = np.asarray(counts, dtype=np.int64)
    nbytes = np.asarray(nbytes, dtype=np.int64)
    size = buckets.size
    n_groups = (size + 7) // 8 + 1  # one zero group past the end: the prefix at index ``size`` is then in range
    w = np.zeros(8 * n_groups, np.uint8)
    bucket_widths(buckets, out=w[:size])
    x = w.view(np.uint64)
    sym_at = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=sym_at[1:])
    if int(sym_at[-1]) != size or int(nbytes.sum()) != offset_bytes.size:  # the reader's list offsets ensure both
        raise ValueError(
            f"counts sum to {int(sym_at[-1])} for {size} buckets, nbytes to {int(nbytes.sum())} for "
            f"{offset_bytes.size} offset bytes"
        )
    # bits before each row's first symbol (unpadded): group prefix + the lane prefix inside the symbol's group
    before = np.zeros(n_groups + 1, np.int64)
    np.cumsum(_group_sums(x), out=before[1:])
    g, lane = sym_at >> 3, (sym_at & 7).astype(np.uint64)
    at = before[g] + (((x[g] * LANES_EXCL) >> (lane * np.uint64(8))) & np.uint64(0xFF)).astype(np.int64)
    row_bits = np.diff(at)
    bad = np.flatnonzero((row_bits + 7) // 8 != nbytes)
    if bad.size:
        r = int(bad[0])
        raise ShardFormatError(
            f"{shard}: row {r}: column 'topk_id_offsets' has {int(nbytes[r])} bytes, "
            f"the id buckets need {int((row_bits[r] + 7) // 8)}"
        )
    out = np.empty(size, np.int32)
    if not size:
        return out
    # pad each row to a whole byte on its last symbol's width, in place (for the bit positions; the masks take the
    # padding off again)
    pad = (nbytes * 8 - row_bits).astype(np.uint8)
    has = counts > 0
    last = sym_at[1:] - 1
    w[last[has]] += pad[has]
    byte_at = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(nbytes, out=byte_at[1:])
    # every offset fits in the 4 bytes from its first byte (at most 21 bits + a 7-bit shift): read them as unaligned
    # little-endian uint32 words through a strided view of the stream, zero-padded so the last word is whole
    padded = np.zeros(offset_bytes.size + 8, np.uint8)
    padded[: offset_bytes.size] = offset_bytes
    bounds = _chunk_rows(sym_at, chunk)
    longest = int(np.max(np.diff(sym_at[bounds])))
    if longest >= 1 << 27:  # bit positions inside a chunk are uint32: at most 28 bits per id
        raise ShardFormatError(f"{shard}: a row holds {longest} ids, more than 2^27")
    # scratch, allocated once; every operation below is between arrays of one dtype (casts are explicit copyto's)
    pos, val, tmp = np.empty(longest, np.uint32), np.empty(longest, np.uint32), np.empty(longest, np.uint32)
    w32, idx = np.empty(longest, np.uint32), np.empty(longest, np.int64)
    hi, sel = np.empty(longest, np.uint8), np.empty(longest, np.uint8)
    one, three, seven = np.uint32(1), np.uint32(3), np.uint32(7)
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
        s, e = int(sym_at[r0]), int(sym_at[r1])
        c, byte0 = e - s, int(byte_at[r0])
        if c == 0:
            continue
        p, v, t, wc, ix, h, m = pos[:c], val[:c], tmp[:c], w32[:c], idx[:c], hi[:c], sel[:c]
        # a chunk starts a row, so on a byte: bit positions from its first byte are an exclusive cumsum
        p[0] = 0
        np.cumsum(w[s : e - 1], dtype=np.uint32, out=p[1:])
        bc = buckets[s:e]
        n_words = int(byte_at[r1]) - byte0 + 1
        np.copyto(wc, w[s:e])
        sel_rows = has[r0:r1]
        wc[last[r0:r1][sel_rows] - s] -= pad[r0:r1][sel_rows]  # the true widths
        words = np.ndarray((n_words,), dtype="<u4", buffer=padded, offset=byte0, strides=(1,))
        np.right_shift(p, three, out=t)
        np.copyto(ix, t)
        np.take(np.ascontiguousarray(words), ix, out=v, mode="clip")
        np.bitwise_and(p, seven, out=p)
        np.right_shift(v, p, out=v)
        np.left_shift(one, wc, out=t)
        t -= one
        v &= t
        # base(b) = hi << w with hi = b below 64, else 8 + (b & 7) = b - ((b & 0xF8) - 8)
        np.bitwise_and(bc, np.uint8(0xF8), out=h)
        h -= np.uint8(8)
        np.greater_equal(bc, np.uint8(BUCKET_DIRECT), out=m.view(bool))
        h &= np.negative(m, out=m)
        np.subtract(bc, h, out=h)
        np.copyto(t, h)
        t <<= wc
        v |= t
        if table is None:
            out[s:e] = v
        else:
            np.copyto(ix, v)
            np.take(table, ix, out=out[s:e], mode="clip")
    return out


def _chunk_rows(sym_at: np.ndarray, chunk: int) -> list[int]:
    """Row boundaries [0, .., R] of chunks of whole rows holding at most ``chunk`` symbols each (a longer row is a
    chunk of its own); ``sym_at`` [R + 1] is each row's first symbol index and the total."""
    bounds = [0]
    n_rows = sym_at.size - 1
    while bounds[-1] < n_rows:
        r0 = bounds[-1]
        r1 = int(np.searchsorted(sym_at, sym_at[r0] + chunk, side="right")) - 1  # last row end within the chunk
        bounds.append(min(max(r1, r0 + 1), n_rows))
    return bounds


def _group_sums(x: np.ndarray) -> np.ndarray:
    """Sum of the eight bytes of every uint64 (each sum below 256), as int64 (a view: cumsum then needs no cast)."""
    return ((x * LANES_INCL) >> np.uint64(56)).view(np.int64)
