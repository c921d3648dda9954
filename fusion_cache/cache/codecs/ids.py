"""Token ids of the `full` codec: byte planes, the per-shard id order and ranks, and the rank byte-plane decoder.

The `full` codec stores each id's rank in a per-shard order instead of the id itself (`make_id_order`): frequent ids
get small ranks, so the high byte plane is mostly zero and the low one skewed, which zstd's Huffman stage exploits
(108.6 -> 96.1 B/token at K=64 on SmolLM2 output, the order costing 0.45 B/token). Layouts 3 and 4 store the ranks
as byte planes (`pack_ids`), each cut into the column groups `id_groups`; layout 2's bucket coding is in buckets.py.

Where the order lives: layouts 1-3 keep it in the shard's schema metadata (``ID_ORDER_KEY``), which
``datasets.load_dataset`` and the Hub's parquet conversion drop. Layout 4 (schema version 4) keeps it in the shard's
manifest entry (``"id_order"``: `id_order_doc`) and names it in every row's ``topk_id_order`` column by its content
hash (`id_order_key`): a row decodes wherever it goes (shuffled, filtered, converted) as long as the manifest travels
with it, and the shard's sha256 (which covers the key) pins the manifest's order, so the fingerprint covers it.

The numpy decoder is the reference: where numba is installed, layout 3's rank planes go through a compiled loop
with the same results bit for bit (fusion_cache/cache/fast_decode.py; ``FUSION_CACHE_DECODER=numpy`` turns it off).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

import numpy as np
import pyarrow as pa

from fusion_cache.cache import fast_decode
from fusion_cache.cache.codecs.base import DECODE_CHUNK
from fusion_cache.cache.codecs.base import id_groups
from fusion_cache.errors import ShardFormatError

ID_ORDER_KEY = b"fusion_cache_id_order"  # the schema metadata key of a full shard's id order


# ------------------------------------------------------------------------------------------------ byte planes
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


def id_plane_columns(id_bytes: int, k: int) -> list[str]:
    """Full layout 3's id columns in schema order: ``topk_ids_b{i}_g{g}``, byte i (least significant first) of the
    ranks in column group g (``id_groups(k)``), for i = 0..id_bytes-1, then g."""
    return [f"topk_ids_b{i}_g{g}" for i in range(id_bytes) for g in range(len(id_groups(k)))]


# ------------------------------------------------------------------------------------------------ id order
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


def id_order_doc(order: np.ndarray) -> dict:
    """Serialize an order as JSON-ready ``{"runs": [...], "count": U, "zstd_b64": "..."}`` (docs/cache-format.md
    section 1.2): the manifest entry of a layout 4 shard, and (as bytes) the schema metadata of layouts 1-3.

    The order is cut into runs of ascending ids; each run is stored as deltas from 0 (first) and from the previous
    id, as uint32 little-endian, zstd-compressed and base64-encoded.
    """
    order = np.asarray(order, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(order) <= 0) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64) if order.size else np.zeros(0, np.int64)
    runs = np.diff(np.concatenate([starts, [order.size]])).tolist()
    deltas = np.diff(order, prepend=0)
    deltas[starts] = order[starts]
    raw = deltas.astype("<u4").tobytes()
    packed = pa.Codec("zstd", compression_level=19).compress(raw, asbytes=True)
    return {"runs": runs, "count": int(order.size), "zstd_b64": base64.b64encode(packed).decode()}


def id_order_metadata(order: np.ndarray) -> bytes:
    """The order as the schema metadata value under ``ID_ORDER_KEY`` (layouts 1-3): `id_order_doc` as JSON bytes."""
    return json.dumps(id_order_doc(order), separators=(",", ":")).encode()


def id_order_key(order: np.ndarray) -> str:
    """The content hash that a layout 4 row's ``topk_id_order`` column holds: blake2b-128 hex of the order's ids as
    uint32 little-endian (of the ids, not of their serialization, so any valid encoding of the order matches)."""
    return hashlib.blake2b(np.asarray(order).astype("<u4").tobytes(), digest_size=16).hexdigest()


_ORDER_CACHE: dict[bytes, np.ndarray] = {}


def parse_id_order(meta: bytes | dict | None, id_bytes: int, shard: str) -> np.ndarray:
    """The order from a shard's schema metadata value (bytes, layouts 1-3) or manifest entry (dict, layout 4),
    validated: distinct ids in range. Cached per distinct value."""
    if meta is None:
        raise ShardFormatError(f"{shard}: schema metadata key {ID_ORDER_KEY.decode()!r} (the id order) is missing")
    cache_key = meta if isinstance(meta, bytes) else json.dumps(meta, sort_keys=True).encode()
    if cache_key in _ORDER_CACHE:
        return _ORDER_CACHE[cache_key]
    try:
        doc = json.loads(meta) if isinstance(meta, bytes) else meta
        runs, count = doc["runs"], doc["count"]
        if type(count) is not int or not 0 <= count <= 1 << (8 * id_bytes):
            raise ValueError(f"count {count!r} out of range")
        if not isinstance(runs, list) or any(type(r) is not int or r < 1 for r in runs) or sum(runs) != count:
            raise ValueError("runs must be positive integers summing to count")
        raw = pa.Codec("zstd").decompress(base64.b64decode(doc["zstd_b64"], validate=True), count * 4, asbytes=True)
        deltas = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    except (ValueError, KeyError, TypeError, binascii.Error, pa.ArrowException) as e:
        raise ShardFormatError(f"{shard}: id order is corrupt: {e}") from None
    order = np.cumsum(deltas)
    if count:
        starts = np.concatenate([[0], np.cumsum(runs)[:-1]])
        base = np.repeat(order[starts] - deltas[starts], runs)
        order = order - base
    if order.size and (order.max() >= 1 << (8 * id_bytes) or np.unique(order).size != order.size):
        raise ShardFormatError(f"{shard}: id order holds ids out of range or repeated")
    if len(_ORDER_CACHE) > 64:
        _ORDER_CACHE.clear()
    _ORDER_CACHE[cache_key] = order
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


# ------------------------------------------------------------------------------------------------ rank planes
def decode_rank_planes(
    planes: list[list[np.ndarray]],
    n: int,
    k: int,
    id_bytes: int,
    table: np.ndarray | None = None,
    *,
    chunk: int = DECODE_CHUNK,
) -> np.ndarray:
    """Ranks of full layout 3 from their byte planes: int32 [n, k], or ``table[rank]`` when a rank -> id ``table``
    (of 256^id_bytes entries, id_bytes <= 2) is given.

    Args:
        planes: ``planes[i][g]``: uint8 [n * (b - a)], byte i (least significant first) of the ranks in column
            group g = ``id_groups(k)[g]`` = [a, b), row-major [n, b - a] (the reader checks the lengths).
        chunk: the numpy decoder's step, in ranks (tests vary it; every rank decodes the same).

    The bytes go straight into the byte lanes of a little-endian uint16 (uint32 for 3-byte ids) scratch matrix of
    ~``chunk`` ranks (strided byte copies: no shifts, no casts), which is then gathered through ``table`` into
    the output while it is in the L2 cache. Every rank < 256^id_bytes is valid, so nothing can be corrupt here.
    """
    groups = id_groups(k)
    out = np.empty((n, k), np.int32)
    if n == 0 or k == 0:
        return out
    fast = fast_decode.kernels()
    if fast is not None:  # the compiled decoder: the same result, one pass
        planes_t = [tuple(fast_decode.readonly(p) for p in planes[i]) for i in range(id_bytes)]
        planes_t += [planes_t[0]] * (3 - id_bytes)  # bytes a rank does not have are never read
        starts, ends = fast_decode.group_bounds(groups)
        use = table is not None
        lookup = table if use else np.zeros(1, np.int32)
        fast["rank_planes"](*planes_t, id_bytes, starts, ends, n, lookup, use, out)
        return out
    lanes = 2 if id_bytes <= 2 else 4
    rows = max(1, min(n, chunk // k))
    scratch = np.zeros((rows, k), f"<u{lanes}")  # lanes past id_bytes stay zero
    lane = scratch.view(np.uint8).reshape(rows, k, lanes)
    for t0 in range(0, n, rows):
        t1 = min(t0 + rows, n)
        for i in range(id_bytes):
            for g, (a, b) in enumerate(groups):
                lane[: t1 - t0, a:b, i] = planes[i][g][t0 * (b - a) : t1 * (b - a)].reshape(t1 - t0, b - a)
        if table is None:
            out[t0:t1] = scratch[: t1 - t0]
        else:  # a uint16 index array: numpy widens it in its own buffer, as fast as an explicit int64 copy
            np.take(table, scratch[: t1 - t0], out=out[t0:t1], mode="clip")
    return out


def row_id_orders(batch: pa.RecordBatch, column: str, spans) -> tuple[list[np.ndarray], np.ndarray | None]:
    """The id orders that a record batch's rows name in their key ``column`` (``full`` layout 4's ``topk_id_order``,
    ``sampled``'s ``sample_id_order``), looked up in ``spans.id_orders`` (the manifest's, by `id_order_key`).

    Returns:
        (the distinct orders, int64 [rows] each row's index into them, or None when there is one: the rows of one
        shard, the reader's fast path).

    Raises:
        ShardFormatError: a null key, or a key that names no order of the manifest (an edited order, or a row of
            another cache), naming the shard and the row.
    """
    import pyarrow.compute as pc

    shard = spans.shard
    col = batch.column(column)
    if col.null_count:
        raise ShardFormatError(f"{shard}: column {column!r} has nulls")
    if len(col) == 0:
        return [np.zeros(0, np.int64)], None  # no ids to decode
    keys, index = pc.unique(col).to_pylist(), None  # one key: the rows of one shard (~4 us a record batch)
    if len(keys) > 1:  # rows of several shards (a dataset's): each row's index into the keys
        enc = col.dictionary_encode()
        keys, index = enc.dictionary.to_pylist(), enc.indices.to_numpy().astype(np.int64)
    for j, key in enumerate(keys):
        if key not in spans.id_orders:
            r = 0 if index is None else int(np.flatnonzero(index == j)[0])
            raise ShardFormatError(
                f"{shard}: row {r}: column {column!r} names id order {key[:32]!r}, which the manifest does not hold "
                "(for this shard): its id_order was edited, or the row belongs to another cache"
            )
    return [spans.id_orders[key] for key in keys], index


def ids_through_row_orders(ranks: np.ndarray, orders: list[np.ndarray], row_order: np.ndarray, repeats,
                           to_ids=None) -> np.ndarray:  # fmt: skip
    """Token ids of a batch whose rows name different id orders (a dataset's rows of several shards).

    Args:
        ranks: [E, ...] the decoded ranks, the entries of row 0 first, then row 1's, and so on.
        orders, row_order: `row_id_orders`'s result (its ``row_order`` not None).
        repeats: int [R] the entries of each row (answer positions, or a sampled row's draws).
        to_ids: ``(ranks, order) -> ids`` (default `ranks_to_ids`).
    """
    to_ids = ranks_to_ids if to_ids is None else to_ids
    of_entry = np.repeat(row_order, repeats)
    ids = np.empty_like(ranks)
    for j, order in enumerate(orders):
        at = of_entry == j
        ids[at] = to_ids(ranks[at], order)
    return ids
