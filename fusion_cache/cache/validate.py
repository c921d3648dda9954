"""What every reader checks in a shard it did not write: bounded decoding, then the content of every decoded row.

A cache is input from someone else: its manifest's checksums and fingerprints are public formulas, so anyone can
change a shard and reseal the manifest, and then only these checks stand between the cache and the student. The
reader (cache/reader.py) runs them on every record batch it reads, so `verify`, `train`, `eval`, the training
stream and any caller of `CacheReader` get them; docs/cache-format.md section 6 states what they guarantee.

Before a record batch is decompressed (`check_message`): the sizes its IPC header declares, against `DecodeLimits`
(decoded bytes at most ``max_ratio`` times the stored body or ``allowance``, and never above ``max_batch_bytes``), so
a decompression bomb is refused from its header and never allocated.

After it is decoded (`check_common`, `check_topk`), every row against `ContentRules` (from the manifest): strings
valid UTF-8, ``sample_id`` the hash of its conversation, ``row_index`` within the input and increasing, at most
``max_length`` tokens, token ids and top-K ids below the vocabulary size, top-K ids distinct per position, values
finite, sorted, at most 0 and with ``logsumexp <= 0`` (within the codec's rounding), target log-probs finite and at
most the row's top-1, tail mass in [0, 1], byte offsets non-negative, non-decreasing and within the text. The first
bad row is refused with a `ShardFormatError` naming the shard, the record batch, the row and the field.

Across record batches (`ScanTally`): each shard's rows and answer tokens against the manifest's, and the total
tokens against ``stats.tokens``, as the rows stream past.

The top-K checks are the expensive ones (a pass over [n, K] ids and values); where numba is installed they run in one
compiled pass per position (fusion_cache/cache/fast_decode.py), with the same verdicts as the numpy code here.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from fusion_cache.cache import fast_decode
from fusion_cache.cache.codecs import Codec
from fusion_cache.cache.codecs.base import TopK
from fusion_cache.cache.codecs.quantize import MU
from fusion_cache.cache.codecs.quantize import QuantizedCodec
from fusion_cache.errors import ShardFormatError

# ------------------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what decoding one record batch may allocate, checked from its IPC header before decompressing.

    Attributes:
        max_ratio: decoded bytes per stored body byte of a compressed record batch. Real shards decompress 2-6x
            (zstd over byte planes, value codes, token ids and text); a bomb decompresses thousands of times.
        allowance: decoded bytes any record batch may have whatever its ratio (small batches of repetitive text).
        max_batch_bytes: decoded bytes of one record batch, never exceeded (uncompressed shards too).
    """

    max_ratio: float = 64.0
    allowance: int = 64 << 20
    max_batch_bytes: int = 16 << 30


# CompressionType of the Arrow IPC format (Schema.fbs / Message.fbs)
_ZSTD, _LZ4 = 1, 0
_RECORD_BATCH = 3  # MessageHeader.RecordBatch


class _FlatBuffer:
    """Bounds-checked reads of the few tables of an Arrow IPC message header (FlatBuffers, little-endian): the
    header is untrusted bytes, so every offset is checked before it is followed."""

    def __init__(self, data: bytes, where: str):
        self.data = data
        self.where = where

    def _fail(self, what: str):
        raise ShardFormatError(f"{self.where}: corrupt IPC message header ({what})")

    def _unpack(self, fmt: str, at: int):
        if at < 0 or at + struct.calcsize(fmt) > len(self.data):
            self._fail(f"offset {at} outside its {len(self.data)} bytes")
        return struct.unpack_from(fmt, self.data, at)[0]

    def root(self) -> int:
        return self._unpack("<I", 0)

    def field(self, table: int, index: int) -> int:
        """The position of field ``index`` of the table at ``table``, or 0 when the field is absent."""
        vtable = table - self._unpack("<i", table)
        size = self._unpack("<H", vtable)
        if size < 4 or size % 2:
            self._fail(f"vtable size {size}")
        if 4 + 2 * index >= size:
            return 0
        off = self._unpack("<H", vtable + 4 + 2 * index)
        return table + off if off else 0

    def deref(self, at: int) -> int:
        return at + self._unpack("<I", at)

    def structs(self, at: int, size: int) -> list[tuple[int, int]]:
        """A vector of (int64, int64) structs (FieldNode, Buffer) whose offset field is at ``at``."""
        start = self.deref(at)
        n = self._unpack("<I", start)
        if start + 4 + n * size > len(self.data):
            self._fail(f"a vector of {n} entries overruns the header")
        return [struct.unpack_from("<qq", self.data, start + 4 + i * size) for i in range(n)]


def check_message(message: pa.ipc.Message, limits: DecodeLimits, where: str) -> None:
    """Refuse a record-batch message whose buffers would decode to more than `DecodeLimits` allow, reading only its
    header and the 8-byte length prefix of each compressed buffer (nothing is decompressed).

    Raises:
        ShardFormatError: a malformed header, a buffer outside the body, or too many decoded bytes.
    """
    fb = _FlatBuffer(message.metadata.to_pybytes(), where)
    msg = fb.root()
    kind_at, header_at = fb.field(msg, 1), fb.field(msg, 2)
    kind = fb._unpack("<B", kind_at) if kind_at else 0
    if kind != _RECORD_BATCH or not header_at:
        raise ShardFormatError(f"{where}: an IPC message of type {kind} where a record batch was expected")
    batch = fb.deref(header_at)
    buffers_at, compression_at = fb.field(batch, 2), fb.field(batch, 3)
    buffers = fb.structs(buffers_at, 16) if buffers_at else []
    compressed = False
    if compression_at:
        codec_at = fb.field(fb.deref(compression_at), 0)
        codec = fb._unpack("<b", codec_at) if codec_at else _LZ4
        if codec not in (_ZSTD, _LZ4):
            raise ShardFormatError(f"{where}: unknown IPC compression {codec}")
        compressed = True
    body = message.body
    stored = body.size if body is not None else 0
    decoded = 0
    for offset, length in buffers:
        if offset < 0 or length < 0 or offset + length > stored:
            raise ShardFormatError(
                f"{where}: an IPC buffer at {offset} of {length} bytes lies outside the {stored}-byte body"
            )
        if not compressed or length == 0:
            decoded += length
            continue
        if length < 8:
            raise ShardFormatError(f"{where}: a compressed IPC buffer of {length} bytes has no length prefix")
        n = struct.unpack("<q", body.slice(offset, 8).to_pybytes())[0]
        if n < -1:
            raise ShardFormatError(f"{where}: a compressed IPC buffer declares {n} bytes")
        decoded += length - 8 if n == -1 else n  # -1: stored uncompressed
    allowed = min(limits.max_batch_bytes, max(limits.allowance, int(limits.max_ratio * stored)))
    if decoded > allowed:
        raise ShardFormatError(
            f"{where}: the record batch would decode to {decoded} bytes from {stored} stored "
            f"(ratio {decoded / max(stored, 1):.0f}); more than the {allowed} allowed (a decompression bomb, or a "
            f"batch larger than DecodeLimits(max_batch_bytes={limits.max_batch_bytes}))"
        )


# ------------------------------------------------------------------------------------------------ rules

TEMPLATE_SLACK = 1 << 16  # bytes a chat template may add to a conversation's text (headers, system prompts, specials)
EXACT_TOL = 1e-4  # raw codec: how far above 0 the fp32 top-1 log-prob, and above the top-1 a target log-prob, may be
EXACT_LSE_TOL = 1e-3  # raw codec: how far above 0 logsumexp of the fp32 top-K may be (a full-vocabulary softmax's sum)
_GMAX = {"sqrt": 2.0, "log": (1.0 + MU) * math.log1p(MU) / MU, "linear": 1.0}  # max of the companding's g'


@dataclass(frozen=True)
class ContentRules:
    """What every decoded row of one cache must satisfy, from its manifest.

    Attributes:
        vocab_size: token ids and top-K ids must be below it.
        vocab_source: where ``vocab_size`` comes from (for messages): the manifest, or for a cache written before
            the manifest recorded it, the codec's id width (``full``: 256^id_bytes) or the int32 range.
        max_length: tokens per row, at most.
        row_start, row_end: ``row_index`` must lie in [row_start, row_end).
        codec: the cache's codec (which fields exist, and how exact the values are).
        k: K of the cache.
        in_order: rows must come in input order, each once (a cache's shards; not a dataset's rows, which a user
            may have shuffled: `fusion_cache.hf.decode_dataset`).
    """

    vocab_size: int
    vocab_source: str
    max_length: int
    row_start: int
    row_end: int
    codec: Codec
    k: int
    in_order: bool = True

    @classmethod
    def from_manifest(cls, manifest, codec: Codec) -> ContentRules:
        vocab, source = manifest.teacher.vocab_size, "the manifest's teacher.vocab_size"
        if vocab is None:
            id_bytes = getattr(codec, "id_bytes", None)
            if id_bytes is not None:
                vocab, source = 1 << (8 * id_bytes), "256^id_bytes of the codec (no vocab_size in the manifest)"
            else:
                vocab, source = 1 << 31, "the int32 range (no vocab_size in the manifest)"
        lo, hi = 0, manifest.dataset.rows_read
        if manifest.part is not None:
            lo, hi = manifest.part.row_start, manifest.part.row_end
        return cls(vocab, source, manifest.max_length, lo, hi, codec, manifest.k)

    @property
    def exact(self) -> bool:
        """Values are stored exactly (fp32), so they must be sorted as they are; quantized codecs decode sorted
        values by construction (non-negative code deltas), finite ones (their max and span are checked)."""
        return not isinstance(self.codec, QuantizedCodec)

    def value_tolerance(self) -> tuple[float, float]:
        """(fixed, per-unit-span) slack of ``logsumexp`` above 0 and of a target above the top-1: the codec's
        rounding. A quantized value is at most span * max(g') / (2 (2^B - 1)) above the original, plus fp16 rounding
        of the row's max and span (docs/cache-format.md, "Value codes")."""
        if self.exact:
            return EXACT_LSE_TOL, 0.0
        m = (1 << self.codec.value_bits) - 1
        return EXACT_LSE_TOL, _GMAX[self.codec.companding] / (2 * m) + 2.0**-10


@dataclass(frozen=True)
class Where:
    """Names a record batch and its rows in messages: ``shard-00000-of-00001.arrow, record batch 2, row 7``."""

    shard: str
    batch: int | None = None
    rows: list[int] | None = None  # the batch's row numbers, when it is a subset (`RecordBatch.take`) of one

    def __str__(self) -> str:
        return self.shard if self.batch is None else f"{self.shard}, record batch {self.batch}"

    def row(self, r: int, sample_id: str | None = None) -> str:
        n = self.rows[r] if self.rows is not None else r
        return f"{self}, row {n}" + (f" (sample {sample_id})" if sample_id else "")


def _fail(where: Where, r: int, field: str, problem: str, sample_ids=None) -> None:
    sid = sample_ids[r] if sample_ids is not None and r < len(sample_ids) else None
    raise ShardFormatError(f"{where.row(r, sid)}: {field}: {problem}")


def _row_of(offsets: np.ndarray, position: int) -> int:
    """The row holding flat position ``position`` of a list column with (rebased) ``offsets`` [R + 1]."""
    return int(np.searchsorted(offsets, position, side="right")) - 1


# ------------------------------------------------------------------------------------------------ common columns


def check_strings(batch: pa.RecordBatch, where: Where) -> None:
    """``sample_id`` and ``conversation`` are valid UTF-8 (before anything decodes them to Python strings).

    A column that fails Arrow's full validation is looked at through its raw buffers, never through ``as_py``:
    offsets out of order or past the data (a resealed byte flip can make them so) would have Arrow build a string of
    that length, a C++ ``length_error`` that aborts the process.
    """
    for name in ("sample_id", "conversation"):
        col = batch.column(name)
        try:
            col.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        corrupt = f"{where}: column {name!r} is corrupt"
        buffers = col.buffers()
        if len(buffers) != 3 or buffers[1] is None:
            raise ShardFormatError(corrupt)
        offsets = np.frombuffer(buffers[1], dtype=np.int32)[col.offset : col.offset + len(col) + 1]
        data = buffers[2].to_pybytes() if buffers[2] is not None else b""
        if len(offsets) != len(col) + 1 or offsets[0] < 0 or (np.diff(offsets) < 0).any() or offsets[-1] > len(data):
            raise ShardFormatError(f"{corrupt} (its string offsets are out of order or point past its data)")
        for r in range(len(col)):
            try:
                data[offsets[r] : offsets[r + 1]].decode("utf-8")
            except UnicodeDecodeError as e:
                _fail(where, r, name, f"not valid UTF-8 ({e.reason} at byte {e.start})")
        raise ShardFormatError(corrupt)


def check_common(
    batch: pa.RecordBatch,
    ids_offsets: np.ndarray,
    input_ids: np.ndarray,
    byte_start: np.ndarray,
    byte_end: np.ndarray,
    rules: ContentRules,
    where: Where,
) -> list[str]:
    """The common columns of a decoded record batch (see the module docstring); returns the sample ids.

    Args:
        ids_offsets: int64 [R + 1] each row's first token in ``input_ids``, rebased to 0.
        input_ids, byte_start, byte_end: [sum of n_tokens] every row's tokens and byte offsets, concatenated.
    """
    sample_ids = batch.column("sample_id").to_pylist()
    n_tokens = np.diff(ids_offsets)
    long = np.flatnonzero(n_tokens > rules.max_length)
    if long.size:
        r = int(long[0])
        _fail(where, r, "input_ids", f"{int(n_tokens[r])} tokens, more than max_length={rules.max_length}", sample_ids)
    if input_ids.size and (int(input_ids.min()) < 0 or int(input_ids.max()) >= rules.vocab_size):
        t = int(np.flatnonzero((input_ids < 0) | (input_ids >= rules.vocab_size))[0])
        problem = f"token id {int(input_ids[t])} outside [0, {rules.vocab_size}) ({rules.vocab_source})"
        _fail(where, _row_of(ids_offsets, t), "input_ids", problem, sample_ids)
    row_index = batch.column("row_index").to_numpy()
    bad = np.flatnonzero((row_index < rules.row_start) | (row_index >= rules.row_end))
    if bad.size:
        r = int(bad[0])
        _fail(where, r, "row_index", f"{int(row_index[r])} outside the input rows [{rules.row_start}, "
              f"{rules.row_end})", sample_ids)  # fmt: skip
    bad = np.flatnonzero(np.diff(row_index) <= 0) if rules.in_order else []
    if len(bad):
        r = int(bad[0]) + 1
        _fail(where, r, "row_index", f"{int(row_index[r])} after {int(row_index[r - 1])}: rows must be in input "
              "order, each once", sample_ids)  # fmt: skip
    _check_offsets(ids_offsets, byte_start, byte_end, batch.column("conversation"), where, sample_ids)
    _check_sample_ids(batch.column("conversation"), sample_ids, where)
    return sample_ids


def _check_offsets(off, start, end, conversations: pa.Array, where: Where, sample_ids) -> None:
    """Byte offsets: non-negative, start <= end, both non-decreasing within a row, within the rendered text (at most
    the conversation's bytes plus ``TEMPLATE_SLACK``)."""
    if not start.size:
        return
    bad = (start < 0) | (start > end)
    # within a row, each token's start and end are at least the previous token's (row starts are exempt)
    step = np.ones(start.size, bool)
    step[1:] = (start[1:] >= start[:-1]) & (end[1:] >= end[:-1])
    step[off[:-1][off[:-1] < start.size]] = True
    bad |= ~step
    text = np.diff(_string_offsets(conversations)) + TEMPLATE_SLACK  # [R] bytes
    has = np.diff(off) > 0
    last_end = np.zeros(len(text), np.int64)
    last_end[has] = end[off[1:][has] - 1]
    over = np.flatnonzero(last_end > text)
    if bad.any():
        t = int(np.flatnonzero(bad)[0])
        r = _row_of(off, t)
        _fail(where, r, "token_byte_start/token_byte_end",
              f"token {t - int(off[r])} spans bytes [{int(start[t])}, {int(end[t])}), not a non-negative span after "
              "the previous token's", sample_ids)  # fmt: skip
    if over.size:
        r = int(over[0])
        _fail(where, r, "token_byte_end", f"{int(last_end[r])} lies past the rendered text (at most "
              f"{int(text[r])} bytes for its conversation)", sample_ids)  # fmt: skip


def _string_offsets(col: pa.Array) -> np.ndarray:
    """int64 [R + 1]: where each string of a (validated) string column starts in its data buffer, and the end."""
    buf = col.buffers()[1]
    if buf is None or len(col) == 0:
        return np.zeros(len(col) + 1, np.int64)
    return np.frombuffer(buf, np.int32)[col.offset : col.offset + len(col) + 1].astype(np.int64)


def _check_sample_ids(conversations: pa.Array, sample_ids: list[str], where: Where) -> None:
    """``sample_id`` is blake2b-128 of the conversation's UTF-8 bytes (hashed straight from the Arrow buffer)."""
    offsets = _string_offsets(conversations).tolist()
    data = conversations.buffers()[2]
    view = memoryview(data) if data is not None else memoryview(b"")
    for r, sid in enumerate(sample_ids):
        if hashlib.blake2b(view[offsets[r] : offsets[r + 1]], digest_size=16).hexdigest() != sid:
            _fail(where, r, "sample_id", f"{sid!r} is not the hash of the row's conversation", sample_ids)


# ------------------------------------------------------------------------------------------------ top-K block

_BITSET_MAX = 1 << 26  # largest id range the compiled distinctness check keeps a bitset for (8 MiB)
# verdicts of a top-K check (shared with the compiled kernel, fast_decode.py)
TOPK_OK, NOT_FINITE, NOT_SORTED, ABOVE_ZERO, LSE_ABOVE_ZERO, ID_RANGE, ID_REPEATED = range(7)


def check_topk(top: TopK, spans, rules: ContentRules, where: Where, sample_ids: list[str] | None = None) -> None:
    """The top-K block of a decoded record batch (module docstring); ``spans`` is its `AnswerSpans`."""
    values, ids = top.values, top.ids
    n = values.shape[0]
    if not n:
        return
    if top.counts is not None:
        check_sampled(top, spans, rules, where, sample_ids)
        return
    codec = rules.codec
    fixed, per_span = rules.value_tolerance()
    kern = fast_decode.kernels()
    bitset_size = rules.vocab_size
    if kern is not None and ids is not None and bitset_size > _BITSET_MAX:  # (an old raw cache: the int32 range)
        bitset_size = int(ids.max()) + 1 if ids.size and int(ids.max()) >= 0 else 1
    if kern is not None and bitset_size <= _BITSET_MAX:
        ids_in = ids if ids is not None else np.zeros((1, 1), np.int32)
        words = fast_decode.id_bitset(bitset_size if ids is not None else 1)
        tols = np.array([fixed, per_span, EXACT_TOL], np.float64)
        t, code, j = kern["topk_rows"](
            values, ids_in, ids is not None, rules.vocab_size, words, rules.exact, codec.has_logprobs, tols
        )  # fmt: skip
        if codec.has_logprobs:
            t, code, j = with_lse(values, (int(t), int(code), int(j)), rules.exact, fixed, per_span)
    else:
        t, code, j = topk_rows_numpy(values, ids, rules.vocab_size, rules.exact, codec.has_logprobs, fixed, per_span)
    if code != TOPK_OK:
        _topk_fail(top, spans, rules, where, sample_ids, int(t), int(code), int(j))
    if top.targets is not None:
        _check_targets(top.targets, values, spans, rules, where, sample_ids)
    if top.tail_mass is not None:
        tail = top.tail_mass
        bad = np.flatnonzero(~((tail >= -1e-3) & (tail <= 1.0 + 1e-3)))
        if bad.size:
            t = int(bad[0])
            _fail(where, _row_of(spans.offsets, t), "tail_mass",
                  f"{float(tail[t])} at answer position {t - int(spans.offsets[_row_of(spans.offsets, t)])} is not "
                  "in [0, 1]", sample_ids)  # fmt: skip


def check_sampled(top: TopK, spans, rules: ContentRules, where: Where, sample_ids: list[str] | None = None) -> None:
    """A sampled block (``sampled`` codec; its decode already refused counts that do not add up to N per position):
    per position, the distinct draws fill the first slots (count in [1, N], id in [0, vocab) and not repeated,
    log-prob finite, at most 0, non-increasing, their probabilities summing to at most 1), padding after them (count
    0, id -1); targets finite log-probs."""
    values, ids, counts = top.values, top.ids, top.counts.astype(np.int64)
    n_draws = counts.sum(axis=1)
    present = counts > 0
    fixed, _ = rules.value_tolerance()
    with np.errstate(invalid="ignore", over="ignore"):
        mass = np.where(present, np.exp(values.astype(np.float64)), 0.0).sum(axis=1)
    checks = [
        ("sample_counts", n_draws != rules.k, lambda t: f"the counts sum to {int(n_draws[t])}, not N={rules.k}"),
        ("sample_counts", (present[:, 1:] & ~present[:, :-1]).any(axis=1), lambda t: "a draw follows an empty slot"),
        ("sample_counts", (counts > rules.k).any(axis=1), lambda t: f"a count is above N={rules.k}"),
        ("topk_ids", (present & ((ids < 0) | (ids >= rules.vocab_size))).any(axis=1),
         lambda t: f"an id is outside [0, {rules.vocab_size}) ({rules.vocab_source})"),
        ("topk_ids", (~present & (ids != -1)).any(axis=1), lambda t: "an empty slot holds an id"),
        ("topk_logprobs", (present & ~(np.isfinite(values) & (values <= EXACT_TOL))).any(axis=1),
         lambda t: "a log-prob is not finite or is above 0"),
        ("topk_logprobs", (present[:, 1:] & (values[:, 1:] > values[:, :-1])).any(axis=1),
         lambda t: "the log-probs are not sorted descending"),
        ("topk_logprobs", ~(mass <= np.exp(fixed) + 1e-3),
         lambda t: f"the distinct draws' probabilities sum to {float(mass[t]):.6g}, more than 1"),
    ]  # fmt: skip
    srt = np.sort(np.where(present, ids, -1 - np.arange(ids.shape[1])[None, :]), axis=1)
    checks.append(("topk_ids", (srt[:, 1:] == srt[:, :-1]).any(axis=1), lambda t: "an id appears twice"))
    if top.targets is not None:
        bad_t = ~(np.isfinite(top.targets) & (top.targets <= EXACT_TOL))
        checks.append(("target_logprobs", bad_t, lambda t: f"{float(top.targets[t])} is not a finite log-prob <= 0"))
    found = [(int(np.flatnonzero(bad)[0]), field, msg) for field, bad, msg in checks if bad.any()]
    if found:
        t, field, msg = min(found, key=lambda f: f[0])
        r = _row_of(spans.offsets, t)
        _fail(where, r, field, f"answer position {t - int(spans.offsets[r])}: {msg(t)}", sample_ids)


def _topk_fail(top: TopK, spans, rules: ContentRules, where: Where, sample_ids, t: int, code: int, j: int) -> None:
    r = _row_of(spans.offsets, t)
    at = f"answer position {t - int(spans.offsets[r])}"
    row = top.values[t]
    problems = {
        NOT_FINITE: ("topk_logprobs", f"{at}: value {float(row[j])} is not finite"),
        NOT_SORTED: (
            "topk_logprobs",
            f"{at}: values are not sorted descending ({float(row[j - 1])} then {float(row[j])} at column {j})",
        ),  # fmt: skip
        ABOVE_ZERO: ("topk_logprobs", f"{at}: top-1 log-prob {float(row[0])} is above 0"),
        LSE_ABOVE_ZERO: (
            "topk_logprobs",
            f"{at}: the top-K probabilities sum to {float(np.exp(row.astype(np.float64)).sum()):.6g}, more than 1",
        ),  # fmt: skip
        ID_RANGE: (
            "topk_ids",
            f"{at}: id {int(top.ids[t, j]) if top.ids is not None else '?'} outside "
            f"[0, {rules.vocab_size}) ({rules.vocab_source})",
        ),  # fmt: skip
        ID_REPEATED: ("topk_ids", f"{at}: id {int(top.ids[t, j]) if top.ids is not None else '?'} appears twice"),
    }
    field, problem = problems[code]
    _fail(where, r, field, problem, sample_ids)


def _check_targets(targets, values, spans, rules: ContentRules, where: Where, sample_ids) -> None:
    """Target log-probs: finite, at most 0 and at most the position's top-1 (within the codec's rounding)."""
    fixed, per_span = rules.value_tolerance()
    v0 = values[:, 0].astype(np.float64)
    tol = EXACT_TOL + per_span * (v0 - values[:, -1]) + np.abs(v0) * (2.0**-10 if per_span else 1e-6)
    ok = np.isfinite(targets) & (targets <= tol) & (targets <= v0 + tol)
    if not ok.all():
        t = int(np.flatnonzero(~ok)[0])
        r = _row_of(spans.offsets, t)
        _fail(where, r, "target_logprobs", f"{float(targets[t])} at answer position {t - int(spans.offsets[r])} is "
              f"not a finite log-prob at most the top-1 {float(v0[t])}", sample_ids)  # fmt: skip


def first_lse_over(values: np.ndarray, exact: bool, fixed: float, per_span: float) -> int:
    """The first answer position whose top-K probabilities sum to more than ``exp(tol)``, or -1, in one vectorised
    pass: float32 ``exp`` over the whole block (numpy's SIMD exp) and a row sum. Their rounding (a few 1e-7
    relative) is far inside the tolerance (``fixed`` = 1e-3 in log space); positions with a non-finite value are
    refused by the finiteness check before this one.

    Args:
        values: float32 [n, K] sorted descending.
        fixed, per_span: the slack (`ContentRules.value_tolerance`); quantized codecs (not ``exact``) also get
            ``|v_0| 2^-10`` for the fp16 rounding of the row's max.
    """
    v0 = values[:, 0].astype(np.float64)
    tol = fixed + per_span * (v0 - values[:, -1])
    if not exact:
        tol += np.abs(v0) * 2.0**-10
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.exp(values).sum(axis=1)  # float32 [n]
        over = np.flatnonzero(total > np.exp(tol))  # NaN sums (non-finite values) are not "over"
    return int(over[0]) if over.size else -1


def with_lse(values: np.ndarray, verdict: tuple[int, int, int], exact: bool, fixed: float, per_span: float):
    """Merge `first_lse_over` into the verdict of the per-value checks: the first position at fault; at one
    position, the verdicts in their order (finite, sorted, top-1, then logsumexp, then the ids)."""
    t = first_lse_over(values, exact, fixed, per_span)
    if t < 0:
        return verdict
    at, code, _ = verdict
    if code == TOPK_OK or t < at or (t == at and code > LSE_ABOVE_ZERO):
        return t, LSE_ABOVE_ZERO, 0
    return verdict


def topk_rows_numpy(
    values: np.ndarray,
    ids: np.ndarray | None,
    vocab: int,
    exact: bool,
    logprobs: bool,
    fixed: float,
    per_span: float,
) -> tuple[int, int, int]:
    """The numpy reference of the compiled ``topk_rows`` (fast_decode.py): the first bad answer position, its
    verdict (``TOPK_OK``, ``NOT_FINITE``, ...) and the column at fault, checking each position in order:

    - values: finite; sorted descending (``exact`` codecs; quantized ones decode sorted); with ``logprobs``, the
      top-1 at most ``EXACT_TOL`` and ``log(sum_j exp(v_j)) <= fixed + per_span * (v_0 - v_{K-1})`` (+ |v_0| 2^-10
      for quantized codecs; `first_lse_over`, shared with the compiled path);
    - ids (when given): in [0, vocab), distinct.

    Args:
        values: float32 [n, K] sorted descending. ids: int32 [n, K] or None.
    """
    n, k = values.shape
    found: list[tuple[int, int, int]] = []

    def first(mask: np.ndarray, code: int) -> None:
        rows = np.flatnonzero(mask.any(axis=1)) if mask.ndim == 2 else np.flatnonzero(mask)
        if rows.size:
            t = int(rows[0])
            found.append((t, code, int(np.flatnonzero(mask[t])[0]) if mask.ndim == 2 else 0))

    if exact:
        finite = np.isfinite(values)
        first(~finite, NOT_FINITE)
    else:  # quantized codecs decode finite, sorted values by construction: the ends are checked
        ends = np.zeros(values.shape, bool)
        ends[:, 0], ends[:, -1] = ~np.isfinite(values[:, 0]), ~np.isfinite(values[:, -1])
        first(ends, NOT_FINITE)
    if exact and k > 1:
        unsorted = np.zeros(values.shape, bool)
        unsorted[:, 1:] = (values[:, 1:] > values[:, :-1]) & finite[:, 1:] & finite[:, :-1]
        first(unsorted, NOT_SORTED)
    if logprobs:
        v0 = values[:, 0].astype(np.float64)
        first(np.isfinite(v0) & (v0 > EXACT_TOL), ABOVE_ZERO)
    if ids is not None:
        first((ids < 0) | (ids >= vocab), ID_RANGE)
        order = np.argsort(ids, axis=1, kind="stable")
        srt = np.take_along_axis(ids, order, axis=1)
        dup = np.zeros(ids.shape, bool)
        # the later of two equal ids (in column order) is the repeat
        later = np.maximum(order[:, 1:], order[:, :-1])
        rows, cols = np.nonzero(srt[:, 1:] == srt[:, :-1])
        dup[rows, later[rows, cols]] = True
        first(dup, ID_REPEATED)
    # the first position at fault; at one position, the first check in the order above
    verdict = min(found, key=lambda f: f[0]) if found else (-1, TOPK_OK, 0)
    return with_lse(values, verdict, exact, fixed, per_span) if logprobs else verdict


# ------------------------------------------------------------------------------------------------ across batches


class ScanTally:
    """What a read of the record batches in cache order must add up to: each shard's rows and answer tokens (its
    manifest entry), every row_index above the previous one, and over a whole pass the tokens (``stats.tokens``).

    Call `add` for every record batch in order and `end_shard` after the last one of each shard; a scan that started
    inside a shard (a resumed read) does not count that shard.
    """

    def __init__(self, manifest, first_shard: int = 0, first_batch: int = 0):
        self.manifest = manifest
        self.complete = first_batch == 0
        self.whole = first_shard == 0 and first_batch == 0
        self.shard: int | None = None
        self.rows = self.answer = self.tokens = self.total_tokens = 0
        self.last_row_index: int | None = None

    def add(self, shard: int, batch: pa.RecordBatch, where: Where) -> None:
        if self.shard != shard:
            self.shard, self.rows, self.answer, self.tokens = shard, 0, 0, 0
        off = batch.column("input_ids").offsets
        n_tokens = int(off[len(off) - 1].as_py() - off[0].as_py()) if len(off) else 0
        starts = batch.column("answer_start").to_numpy()
        index = batch.column("row_index").to_numpy()
        if index.size and self.last_row_index is not None and int(index[0]) <= self.last_row_index:
            raise ShardFormatError(
                f"{where.row(0)}: row_index: {int(index[0])} after {self.last_row_index}: rows must be in input "
                "order, each once (a shard listed or copied twice?)"
            )
        if index.size:
            self.last_row_index = int(index[-1])
        self.rows += batch.num_rows
        self.tokens += n_tokens
        self.total_tokens += n_tokens
        self.answer += n_tokens - int(starts.sum())

    def end_shard(self, shard: int) -> None:
        """Compare the finished shard's counts with its manifest entry (when the scan read it from its start)."""
        info = self.manifest.shards[shard]
        if self.shard != shard:  # a shard without record batches
            self.shard, self.rows, self.answer = shard, 0, 0
        if self.complete:
            for what, got, want in (("rows", self.rows, info.rows), ("answer tokens", self.answer, info.answer_tokens)):
                if got != want:
                    raise ShardFormatError(f"{info.path}: {got} {what}, the manifest says {want}")
        self.complete = True

    def end(self) -> None:
        """After the last shard of a pass from the start: the tokens against ``stats.tokens``."""
        if self.whole and self.total_tokens != self.manifest.stats.tokens:
            raise ShardFormatError(
                f"the shards hold {self.total_tokens} tokens, the manifest's stats.tokens says "
                f"{self.manifest.stats.tokens}"
            )
