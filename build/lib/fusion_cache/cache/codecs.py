"""Top-K codecs: how a shard stores the teacher's top-K block (docs/cache-format.md section 1.2 is the spec).

Four codecs, chosen at build time and recorded in the manifest and every shard's schema metadata:

- ``raw``: fp32 log-probs + int32 ids + fp32 target log-probs, uncompressed. The exact reference (v1's only codec).
- ``full`` (layout 3, schema version 3): ids as per-shard ranks split into byte planes (byte i of every rank), each
  plane one Arrow column per group of rank columns, so zstd gives each group its own Huffman table; values quantized
  relative to the row maximum with a log companding; the tail mass (1 - sum of the top-K probabilities) as fp16;
  target log-probs only where the answer token is not among the top-K ids (elsewhere they are the decoded value of
  that id); zstd level 16 (its optimal parsing codes the high rank plane and the value codes near their order-0
  entropy, where level 3's greedy matches lose 6.8 B/token on them at K=64). Layout 2 (schema version 3, the same
  but each rank as a bucket byte plus bit-packed offsets: 1.2 B/token smaller at the same level, ids ~2.5x slower
  to decode) and layout 1 (schema version 2: ungrouped byte planes, square-root companding, every target log-prob as
  fp16) are still read.
- ``values``: the sorted values only (ULD needs nothing else): fp16 row maximum and span + quantized codes, zstd.
- ``shape`` (schema version 3): the sorted values' shape only, ``(v_j - v_0) / (v_0 - v_{K-1})`` in [-1, 0],
  linearly quantized; no row maximum or span. The z-scored ULD loss is invariant to a row's offset and scale, so it
  is all that loss reads; anything that needs true log-probs (no z-score, the tail bucket, KL) must refuse it
  (``require_logprobs``).

Value quantization, per answer position with values ``v_0 >= ... >= v_{K-1}``:

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

Every decode is vectorized over a whole record batch (numpy; full layouts 2 and 3 in chunks of ~65k symbols so each pass
stays in the L2 cache); corrupt codes are refused with the shard and row. These numpy decoders are the reference:
where numba is installed, layout 3's ids and the grouped value codes go through compiled loops with the same
results bit for bit (fusion_cache/cache/fast_decode.py; ``FUSION_CACHE_DECODER=numpy`` turns them off).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusion_cache.cache import fast_decode
from fusion_cache.errors import ConfigError
from fusion_cache.errors import ShardFormatError

CODEC_NAMES = ("full", "values", "shape", "raw")
LATEST_SCHEMA_VERSION = 3  # fusion_cache/cache/schema.py re-exports it as SCHEMA_VERSION
DEFAULT_VALUE_BITS = {"full": 6, "values": 8, "shape": 8}
# zstd level of each compact codec's Arrow IPC compression. full: 16, the first level with zstd's optimal parsing
# (btultra): at K=64 on SmolLM2 output the high rank plane drops from 32.3 to 28.9 B/token and the value codes from
# 12.1 to 8.7 against level 3, and they decompress faster (fewer, longer sequences); encoding costs ~50 us/token
# (benchmarks/results/codec.md).
DEFAULT_ZSTD_LEVELS = {"full": 16, "values": 3, "shape": 3}
FULL_LAYOUT = 3  # the layout a build writes; layout 2 and layout 1 (no "layout" key, schema version 2) are still read
FULL_LAYOUTS = (2, 3)  # the layouts schema version 3 has
MU = 16.0  # the log companding's curvature (full layouts 2 and 3): f(x) = ln(1 + MU x) / ln(1 + MU)


@dataclass(frozen=True)
class CodecSpec:
    """A validated codec with its parameters.

    Attributes:
        name: "raw", "full", "values" or "shape".
        value_bits: bits per quantized value code (2..16), all but raw.
        id_bytes: bytes per token id (1..4; 1..3 for full layouts 2 and 3), full only.
        zstd_level: zstd level of the Arrow IPC buffer compression, all but raw.
        layout: full only: 3 or 2 (schema version 3) or None for layout 1 (schema version 2, no "layout" key).
    """

    name: str
    value_bits: int | None = None
    id_bytes: int | None = None
    zstd_level: int | None = None
    layout: int | None = None

    @property
    def has_ids(self) -> bool:
        return self.name in ("raw", "full")

    @property
    def has_targets(self) -> bool:
        return self.name in ("raw", "full")

    @property
    def has_tail_mass(self) -> bool:
        return self.name == "full"

    @property
    def has_logprobs(self) -> bool:
        """False for ``shape``: its decoded values are a row's standardized shape, not log-probabilities."""
        return self.name != "shape"

    @property
    def compressed(self) -> bool:
        return self.name != "raw"

    @property
    def companding(self) -> str:
        """ "sqrt" (values, full layout 1), "log" (full layouts 2 and 3) or "linear" (shape); "none" for raw."""
        if self.name == "full":
            return "sqrt" if self.layout is None else "log"
        return {"values": "sqrt", "shape": "linear"}.get(self.name, "none")

    def to_json(self) -> dict:
        """The manifest / schema-metadata form: ``{"name": ..., params...}`` (no None values)."""
        out = {"name": self.name}
        for key in ("value_bits", "id_bytes", "zstd_level", "layout"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def columns(self, k: int | None = None) -> dict[str, pa.DataType]:
        """The codec's Arrow columns (after the common columns), in schema order. ``k`` is needed by full layouts 2
        and 3, whose column groups depend on K."""
        code_type = pa.uint8() if (self.value_bits or 0) <= 8 else pa.uint16()
        if self.name == "raw":
            return {
                "topk_ids": pa.list_(pa.int32()),
                "topk_logprobs": pa.list_(pa.float32()),
                "target_logprobs": pa.list_(pa.float32()),
            }
        if self.name == "full" and self.layout is not None:
            if k is None:
                raise ValueError(f"the columns of full layout {self.layout} depend on K")
            if self.layout == 2:
                cols = {f"topk_id_buckets_g{g}": pa.list_(pa.uint8()) for g in range(len(id_groups(k)))}
                cols["topk_id_offsets"] = pa.list_(pa.uint8())
            else:
                cols = {name: pa.list_(pa.uint8()) for name in id_plane_columns(self.id_bytes, k)}
            cols.update({"topk_max": pa.list_(pa.float16()), "topk_span": pa.list_(pa.float16())})
            cols.update({f"topk_codes_g{g}": pa.list_(code_type) for g in range(len(code_groups(k)))})
            cols.update({"tail_mass": pa.list_(pa.float16()), "target_logprobs_missing": pa.list_(pa.float16())})
            return cols
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
        if self.name == "shape":
            return {"topk_codes": pa.list_(code_type), "topk_flat": pa.list_(pa.int32())}
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


def id_plane_columns(id_bytes: int, k: int) -> list[str]:
    """Full layout 3's id columns in schema order: ``topk_ids_b{i}_g{g}``, byte i (least significant first) of the
    ranks in column group g (``id_groups(k)``), for i = 0..id_bytes-1, then g."""
    return [f"topk_ids_b{i}_g{g}" for i in range(id_bytes) for g in range(len(id_groups(k)))]


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


def require_logprobs(codec: CodecSpec, what: str) -> None:
    """Refuse a use of the values that needs true log-probabilities (``what``) on a ``shape`` cache."""
    if not codec.has_logprobs:
        raise ConfigError(
            f"{what} needs the teacher's true log-probabilities, but a {codec.name!r} cache stores only the "
            "standardized shape of each row's sorted values (enough for the z-scored ULD loss only); use the "
            "default z-scored ULD loss, or rebuild the cache with --codec values, full or raw"
        )


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
        "zstd_level": DEFAULT_ZSTD_LEVELS[name] if zstd_level is None else zstd_level,
    }
    if name == "full":
        if vocab_size is None:
            raise ConfigError("the full codec needs the teacher's vocabulary size")
        params["id_bytes"] = id_bytes_for_vocab(vocab_size)
        params["layout"] = FULL_LAYOUT
        if params["id_bytes"] > 3:
            raise ConfigError(f"the full codec takes vocabularies of at most 2^24 ids, got {vocab_size}")
    try:
        return parse_codec(params)
    except ShardFormatError as e:
        raise ConfigError(str(e)) from None


# the parameters each codec takes, per schema version (v1: raw only; v3 adds shape and full's "layout")
_KEYS = {
    2: {
        "raw": {"name"},
        "full": {"name", "value_bits", "id_bytes", "zstd_level"},
        "values": {"name", "value_bits", "zstd_level"},
    },
    3: {
        "raw": {"name"},
        "full": {"name", "value_bits", "id_bytes", "zstd_level", "layout"},
        "values": {"name", "value_bits", "zstd_level"},
        "shape": {"name", "value_bits", "zstd_level"},
    },
}
_KEYS[1] = {"raw": {"name"}}


def parse_codec(raw: object, where: str = "codec", schema_version: int = LATEST_SCHEMA_VERSION) -> CodecSpec:
    """Validate a codec dict from a manifest or schema metadata (untrusted) against its schema version.

    Raises ShardFormatError naming ``where`` and the value: an unknown name or parameter, a parameter out of range,
    or a codec (or parameter) that the schema version does not have.
    """
    if not isinstance(raw, dict):
        raise ShardFormatError(f"{where}: must be an object like {{'name': 'raw'}}, got {raw!r}")
    name = raw.get("name")
    if name not in CODEC_NAMES:
        raise ShardFormatError(f"{where}: codec {name!r} is unknown; this version reads {list(CODEC_NAMES)}")
    if schema_version not in _KEYS:
        raise ShardFormatError(f"{where}: schema_version {schema_version!r} is unknown")
    if name not in _KEYS[schema_version]:
        raise ShardFormatError(
            f"{where}: schema_version {schema_version} has no codec {name!r} (it has {sorted(_KEYS[schema_version])})"
        )
    allowed = _KEYS[schema_version][name]
    extra = set(raw) - allowed
    missing = allowed - set(raw)
    if extra or missing:
        raise ShardFormatError(
            f"{where}: codec {name!r} in schema_version {schema_version} takes exactly {sorted(allowed)}; "
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
    layout = _int("layout", FULL_LAYOUTS[0], FULL_LAYOUTS[-1]) if "layout" in allowed else None
    ids = _int("id_bytes", 1, 4 if layout is None else 3) if name == "full" else None
    return CodecSpec(name, value_bits=bits, id_bytes=ids, zstd_level=level, layout=layout)


# ------------------------------------------------------------------------------------------------ values
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


# ------------------------------------------------------------------------------------------------ id planes
def decode_rank_planes(
    planes: list[list[np.ndarray]], n: int, k: int, id_bytes: int, table: np.ndarray | None = None
) -> np.ndarray:
    """Ranks of full layout 3 from their byte planes: int32 [n, k], or ``table[rank]`` when a rank -> id ``table``
    (of 256^id_bytes entries, id_bytes <= 2) is given.

    Args:
        planes: ``planes[i][g]``: uint8 [n * (b - a)], byte i (least significant first) of the ranks in column
            group g = ``id_groups(k)[g]`` = [a, b), row-major [n, b - a] (the reader checks the lengths).

    The bytes go straight into the byte lanes of a little-endian uint16 (uint32 for 3-byte ids) scratch matrix of
    ~DECODE_CHUNK ranks (strided byte copies: no shifts, no casts), which is then gathered through ``table`` into
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
    rows = max(1, min(n, DECODE_CHUNK // k))
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


# ------------------------------------------------------------------------------------------------ id buckets
# Full layout 2 codes each rank r as a bucket byte plus w(bucket) offset bits. Ranks below 64 are their own bucket
# (no offset bits); above, with e = floor(log2 r), bucket = 64 + 8 (e - 6) + the three bits after the leading one,
# and the e - 3 bits below them are the offset. zstd's Huffman stage codes the bucket bytes close to their entropy,
# the offsets are nearly uniform inside a bucket (an octave cut in eight), so this reaches within 1.5% of the
# ranks' order-0 entropy on SmolLM2 output while every step of the decoder is a whole-array numpy operation.
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


DECODE_CHUNK = 1 << 16  # symbols per step of the chunked decoders: their ~20 passes then stay in the core's L2 cache


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


# Prefix sums of small non-negative byte values, eight at a time ("SWAR"): multiplying a uint64 holding bytes
# x_0..x_7 (little-endian) by 0x0101010101010101 puts x_0 + .. + x_i into byte i, exactly while every such sum is
# below 256 (a carry would otherwise spill into the next byte). numpy's cumsum is a sequential loop at ~1 ns per
# element; this is one multiplication per eight elements plus a cumsum over an eighth of them.
_LANES_INCL = np.uint64(0x0101010101010101)
_LANES_EXCL = np.uint64(0x0101010101010100)
_BYTES_EVEN = np.uint64(0x00FF00FF00FF00FF)  # bytes 0, 2, 4, 6 of a uint64 as four 16-bit lanes
_WORDS_INCL = np.uint64(0x0001000100010001)  # the same prefix-sum trick over four 16-bit lanes


def decode_bucket_ids(
    buckets: np.ndarray,
    offset_bytes: np.ndarray,
    nbytes: np.ndarray,
    counts: np.ndarray,
    id_bytes: int,
    shard: str,
    table: np.ndarray | None = None,
) -> np.ndarray:
    """Inverse of encode_bucket_ids: ranks int32 [S], or ``table[rank]`` when a rank -> id ``table`` is given.

    Refuses unknown buckets and offset streams whose length differs from what the buckets say, naming the shard and
    row. Each row's bit count comes from byte sums eight widths at a time (``_LANES_*``). The rows are then decoded
    in chunks of whole rows of about DECODE_CHUNK ids (a row's offsets start on a byte, so a chunk's bit positions
    are an exclusive uint32 cumsum of its widths, the row padding put on each row's last width), each chunk as ~20
    numpy passes over scratch buffers allocated once, in the core's L2 cache: widths and bucket bases by uint8
    arithmetic (no table gathers: a gather first widens every index to int64), one gather of unaligned 32-bit words
    of the stream, shifts and masks in uint32, and the rank -> id gather. Every operation is between arrays of one
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
    at = before[g] + (((x[g] * _LANES_EXCL) >> (lane * np.uint64(8))) & np.uint64(0xFF)).astype(np.int64)
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
    bounds = _chunk_rows(sym_at, DECODE_CHUNK)
    chunk = int(np.max(np.diff(sym_at[bounds])))
    if chunk >= 1 << 27:  # bit positions inside a chunk are uint32: at most 28 bits per id
        raise ShardFormatError(f"{shard}: a row holds {chunk} ids, more than 2^27")
    # scratch, allocated once; every operation below is between arrays of one dtype (casts are explicit copyto's)
    pos, val, tmp = np.empty(chunk, np.uint32), np.empty(chunk, np.uint32), np.empty(chunk, np.uint32)
    w32, idx = np.empty(chunk, np.uint32), np.empty(chunk, np.int64)
    hi, sel = np.empty(chunk, np.uint8), np.empty(chunk, np.uint8)
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
    return ((x * _LANES_INCL) >> np.uint64(56)).view(np.int64)


def decode_value_groups(
    codes: list[np.ndarray],
    vmax: np.ndarray,
    span: np.ndarray,
    k: int,
    bits: int,
    shard: str,
    companding: str = "log",
) -> np.ndarray:
    """Values of full layouts 2 and 3: dequantize_values(vmax, span, code_sums(codes, bits, code_groups(k), n)) in
    chunks.

    Args:
        codes: one uint8/uint16 [n, b - a] array per column group ``code_groups(k)`` of the [n, K-2] code deltas.
        vmax, span: fp16 [n] (the stored row maxima and spans).

    Returns:
        float32 [n, K]. Refuses (naming the shard and answer position) codes that sum past 2^bits - 1 and a
        non-finite or negative max or span.

    About DECODE_CHUNK codes at a time go through a scratch [rows, K] matrix (the groups copied in after a zero
    column), then the running sums Q, the expansion table gathered with int64 indices (no index conversion)
    straight into the output, scaled by the negated span and added to the max. For codes of up to 8 bits every
    valid Q fits in a byte, so the running sums are computed eight bytes at a time (``_LANES_INCL``: one uint64
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
    rows = max(1, min(n, 2 * DECODE_CHUNK // k))
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
            np.bitwise_and(x, _BYTES_EVEN, out=gs)
            np.right_shift(x, np.uint64(8), out=tm)
            tm &= _BYTES_EVEN
            gs += tm
            gs *= _WORDS_INCL
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
            cy *= _LANES_INCL  # copied into every byte
            np.multiply(x, _LANES_INCL, out=p)  # prefix sums inside each lane group (every one <= m <= 255)
            p += cy
            np.copyto(qc, p.view(np.uint8)[:, :k])  # Q, widened for the gather
        qc[:, -1] = m
        np.take(table, qc, out=o, mode="clip")
        # max - span * g as max + (-span) * g: the same float32 result bit for bit (negation is exact), and the
        # output is the first operand of the add, so numpy does not copy it first (as it does for max - o)
        o *= neg_span[t0:t1, None]
        o += vmax[t0:t1, None]
    return out
