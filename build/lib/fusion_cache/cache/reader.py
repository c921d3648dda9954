"""Reads a cache: validated manifest, memory-mapped shards, rows decoded to numpy with vectorized checks.

Everything read is treated as untrusted: shard schemas, K, list lengths and checksums are checked against the
manifest and the errors name the shard (and row) at fault. Nothing is ever unpickled: Arrow IPC only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs import DECODE_CHUNK
from fusion_cache.cache.codecs import ID_ORDER_KEY
from fusion_cache.cache.codecs import CodecSpec
from fusion_cache.cache.codecs import code_groups
from fusion_cache.cache.codecs import decode_bucket_ids
from fusion_cache.cache.codecs import decode_rank_planes
from fusion_cache.cache.codecs import decode_value_groups
from fusion_cache.cache.codecs import dequantize_values
from fusion_cache.cache.codecs import id_groups
from fusion_cache.cache.codecs import id_plane_columns
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.codecs import parse_id_order
from fusion_cache.cache.codecs import rank_table
from fusion_cache.cache.codecs import ranks_to_ids
from fusion_cache.cache.codecs import unpack_ids
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.row import MissingField
from fusion_cache.cache.schema import METADATA_KEY
from fusion_cache.cache.schema import shard_columns
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.errors import ShardFormatError


@dataclass(frozen=True)
class BatchPosition:
    """Where a record batch sits in the cache: enough to resume a read right after it."""

    shard: int
    batch: int


def _list_parts(col: pa.Array, shard: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [n+1] int64, values) of a list column, rebased so offsets[0] == 0 (batches may be slices)."""
    if not pa.types.is_list(col.type):
        raise ShardFormatError(f"{shard}: column {name!r} must be a list, got {col.type}")
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return offsets - offsets[0], values


def decode_record_batch(batch: pa.RecordBatch, codec: CodecSpec, k: int, shard: str = "<batch>") -> list[CacheRow]:
    """Decode one record batch of a ``codec`` shard to rows, checking every declared length against the data.

    The codec's columns are decoded for the whole batch at once (numpy), then sliced per row.
    """
    for col, typ in shard_columns(codec, k).items():
        idx = batch.schema.get_field_index(col)
        if idx < 0 or batch.schema.field(idx).type != typ:
            got = "missing" if idx < 0 else str(batch.schema.field(idx).type)
            raise ShardFormatError(f"{shard}: column {col!r} is {got}, expected {typ}")
    ids_off, ids = _list_parts(batch.column("input_ids"), shard, "input_ids")
    n_tokens = np.diff(ids_off)
    answer_start = batch.column("answer_start").to_numpy().astype(np.int64)
    n_answer = n_tokens - answer_start
    bad = np.flatnonzero((answer_start < 1) | (n_answer < 1))
    if bad.size:
        r = int(bad[0])
        raise ShardFormatError(
            f"{shard}: row {r}: answer_start={int(answer_start[r])} invalid for {int(n_tokens[r])} tokens"
        )
    expected = {"token_byte_start": n_tokens, "token_byte_end": n_tokens}
    grouped = codec.name == "full" and codec.layout is not None  # layouts 2 and 3: column groups, log companding
    layout2 = grouped and codec.layout == 2
    if codec.name == "raw":
        expected.update({"topk_ids": n_answer * k, "topk_logprobs": n_answer * k, "target_logprobs": n_answer})
    elif codec.name == "shape":
        expected["topk_codes"] = n_answer * (k - 2)
    elif grouped:
        if layout2:
            expected.update({f"topk_id_buckets_g{g}": n_answer * (b - a) for g, (a, b) in enumerate(id_groups(k))})
        else:
            widths = [b - a for a, b in id_groups(k)] * codec.id_bytes
            expected.update({c: n_answer * w for c, w in zip(id_plane_columns(codec.id_bytes, k), widths, strict=True)})
        expected.update({"topk_max": n_answer, "topk_span": n_answer, "tail_mass": n_answer})
        expected.update({f"topk_codes_g{g}": n_answer * (b - a) for g, (a, b) in enumerate(code_groups(k))})
    else:
        expected.update({"topk_max": n_answer, "topk_span": n_answer, "topk_codes": n_answer * (k - 2)})
    if codec.name == "full" and not grouped:
        expected.update({f"topk_ids_b{i}": n_answer * k for i in range(codec.id_bytes)})
        expected.update({"tail_mass": n_answer, "target_logprobs": n_answer})
    parts = {}
    for name, want in expected.items():
        off, vals = _list_parts(batch.column(name), shard, name)
        got = np.diff(off)
        bad = np.flatnonzero(got != want)
        if bad.size:
            r = int(bad[0])
            raise ShardFormatError(
                f"{shard}: row {r}: column {name!r} has {int(got[r])} values, expected {int(want[r])} (K={k})"
            )
        parts[name] = vals
    # answer-position offsets shared by every top-K array
    ans_off = np.zeros(batch.num_rows + 1, dtype=np.int64)
    np.cumsum(n_answer, out=ans_off[1:])
    total = int(ans_off[-1])
    tail = None
    targets = parts.get("target_logprobs")
    if codec.name == "raw":
        topk_ids = parts["topk_ids"].reshape(total, k)
        values = parts["topk_logprobs"].reshape(total, k)
    elif codec.name == "shape":
        codes = parts["topk_codes"].reshape(total, k - 2)
        values = dequantize_values(None, None, codes, codec.value_bits, shard, "linear")
        values[_flat_positions(batch, ans_off, n_answer, shard)] = 0.0
    elif grouped:
        codes = [parts[f"topk_codes_g{g}"].reshape(total, b - a) for g, (a, b) in enumerate(code_groups(k))]
        values = decode_value_groups(codes, parts["topk_max"], parts["topk_span"], k, codec.value_bits, shard)
    else:
        values = dequantize_values(
            parts["topk_max"], parts["topk_span"], parts["topk_codes"].reshape(total, k - 2), codec.value_bits, shard
        )
    if codec.name == "full":
        order = parse_id_order((batch.schema.metadata or {}).get(ID_ORDER_KEY), codec.id_bytes, shard)
        table = rank_table(order, 1 << (8 * codec.id_bytes)) if codec.id_bytes <= 2 else None
        if layout2:
            buckets = _gather_groups(parts, "topk_id_buckets_g", id_groups(k), total, k).reshape(-1)
            off_off, off_bytes = _list_parts(batch.column("topk_id_offsets"), shard, "topk_id_offsets")
            counts = n_answer * k
            ranks = decode_bucket_ids(buckets, off_bytes, np.diff(off_off), counts, codec.id_bytes, shard, table)
        elif grouped:
            n_groups = len(id_groups(k))
            names = id_plane_columns(codec.id_bytes, k)
            planes = [[parts[names[i * n_groups + g]] for g in range(n_groups)] for i in range(codec.id_bytes)]
            ranks = decode_rank_planes(planes, total, k, codec.id_bytes, table)
        else:
            ranks = unpack_ids([parts[f"topk_ids_b{i}"] for i in range(codec.id_bytes)])
            ranks = ranks if table is None else np.take(table, ranks)
        topk_ids = (ranks if table is not None else ranks_to_ids(ranks, order)).reshape(total, k)
        tail = parts["tail_mass"].astype(np.float32)
        if grouped:
            targets = _targets_layout2(batch, topk_ids, values, ids, ids_off, answer_start, n_answer, shard)
    if targets is not None:
        targets = targets.astype(np.float32, copy=False)
    sample_ids = batch.column("sample_id").to_pylist()
    row_index = batch.column("row_index").to_numpy().tolist()
    convs = batch.column("conversation").to_pylist()
    has_ids, has_targets = codec.has_ids, codec.has_targets
    if not has_ids:
        topk_ids = MissingField("topk_ids", codec.name)
    if not has_targets:
        targets = MissingField("target_logprobs", codec.name)
    byte_start, byte_end = parts["token_byte_start"], parts["token_byte_end"]
    # Python ints for the per-row slicing (numpy scalars make every slice several times slower)
    tok_at, ans_at, starts = ids_off.tolist(), ans_off.tolist(), answer_start.tolist()
    rows = []
    for r in range(batch.num_rows):
        s, e = tok_at[r], tok_at[r + 1]
        a0, a1 = ans_at[r], ans_at[r + 1]
        rows.append(
            CacheRow(
                sample_id=sample_ids[r],
                row_index=row_index[r],
                conversation=convs[r],
                input_ids=ids[s:e],
                answer_start=starts[r],
                token_byte_start=byte_start[s:e],
                token_byte_end=byte_end[s:e],
                topk_ids=topk_ids[a0:a1] if has_ids else topk_ids,
                topk_logprobs=values[a0:a1],
                target_logprobs=targets[a0:a1] if has_targets else targets,
                tail_mass=tail[a0:a1] if tail is not None else None,
            )
        )
    return rows


def _gather_groups(parts: dict, prefix: str, groups: list, total: int, width: int) -> np.ndarray:
    """Reassemble column groups (``prefix`` + g, each row-major [total, b - a]) into one [total, width] array."""
    if len(groups) == 1:
        return parts[f"{prefix}0"].reshape(total, width)
    dtype = parts[f"{prefix}0"].dtype if groups else np.uint8
    out = np.empty((total, width), dtype=dtype)
    for g, (a, b) in enumerate(groups):
        out[:, a:b] = parts[f"{prefix}{g}"].reshape(total, b - a)
    return out


def _flat_positions(batch, ans_off, n_answer, shard) -> np.ndarray:
    """Batch-wide indices of the answer positions a shape shard lists in ``topk_flat`` (rows of equal values),
    checked: ascending within the row and < n_answer."""
    off, local = _list_parts(batch.column("topk_flat"), shard, "topk_flat")
    counts = np.diff(off)
    row_of = np.repeat(np.arange(len(n_answer)), counts)
    local = local.astype(np.int64)
    first = np.zeros(local.size, bool)
    first[off[:-1][counts > 0]] = True  # a row's first entry need not exceed the previous row's last
    bad = np.flatnonzero((local < 0) | (local >= n_answer[row_of]) | (~first & (np.diff(local, prepend=-1) <= 0)))
    if bad.size:
        r = int(row_of[bad[0]])
        raise ShardFormatError(
            f"{shard}: row {r}: column 'topk_flat' holds {int(local[bad[0]])}, not an ascending "
            f"answer position below {int(n_answer[r])}"
        )
    return ans_off[row_of] + local


def _targets_layout2(batch, topk_ids, values, ids, ids_off, answer_start, n_answer, shard) -> np.ndarray:
    """Target log-probs of full layouts 2 and 3: the decoded value of the answer token's id where it is among the top-K,
    else the next entry of the row's ``target_logprobs_missing`` list (whose length must match)."""
    pos = np.repeat(ids_off[:-1] + answer_start, n_answer) + _ranges(n_answer)
    answer = ids[pos]
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
    off, missing = _list_parts(batch.column("target_logprobs_missing"), shard, "target_logprobs_missing")
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


class CacheReader:
    """Read access to one cache directory.

    Args:
        path: the cache directory (holding manifest.json and the shards): a local path or any fsspec URL.
        check_checksums: hash every shard when it is opened and refuse one whose sha256 differs from the
            manifest's (one extra sequential read; a cache from elsewhere is untrusted, and a flipped bit inside a
            value code would otherwise decode to a plausible wrong tensor).
    """

    def __init__(self, path: str | Path, *, check_checksums: bool = True):
        self.check_checksums = check_checksums
        self.location = CacheLocation(str(path))
        self.path = Path(path) if self.location.local else str(path)
        self.manifest: Manifest = load_manifest(self.location)
        self.k = self.manifest.k
        self.codec = parse_codec(self.manifest.codec, f"{self.path}/manifest.json", self.manifest.schema_version)
        self.columns = shard_columns(self.codec, self.k)

    # ---------------------------------------------------------------- shards
    def shard_path(self, i: int) -> str:
        return self.location.join(self.manifest.shards[i].path)

    def _open(self, i: int, *, checksum: bool | None = None) -> pa.ipc.RecordBatchStreamReader:
        name = self.manifest.shards[i].path
        if not self.location.exists(name):
            raise ShardFormatError(f"{name}: shard listed in the manifest is missing")
        if self.check_checksums if checksum is None else checksum:
            digest = self.location.sha256(name)
            if digest != self.manifest.shards[i].sha256:
                raise ShardFormatError(
                    f"{name}: sha256 {digest[:16]}... differs from the manifest's {self.manifest.shards[i].sha256[:16]}"
                    "...; the shard is corrupt or was replaced"
                )
        try:
            # decompress on the calling thread when Arrow has one CPU thread: the pool's single thread only adds a
            # hand-off per record batch (~10% of a full K=64 batch's read, benchmarks/results/codec.md)
            options = pa.ipc.IpcReadOptions(use_threads=pa.cpu_count() > 1)
            reader = pa.ipc.open_stream(self.location.open_arrow(name), options=options)
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardFormatError(f"{name}: not a readable Arrow IPC stream: {e}") from e
        self._check_schema(name, reader.schema)
        return reader

    def _check_schema(self, name: str, schema: pa.Schema) -> None:
        for col, typ in self.columns.items():
            idx = schema.get_field_index(col)
            if idx < 0:
                raise ShardFormatError(f"{name}: column {col!r} is missing")
            if schema.field(idx).type != typ:
                raise ShardFormatError(f"{name}: column {col!r} has type {schema.field(idx).type}, expected {typ}")
        meta = (schema.metadata or {}).get(METADATA_KEY)
        if meta is None:
            raise ShardFormatError(f"{name}: schema metadata key {METADATA_KEY.decode()!r} is missing")
        try:
            prov = json.loads(meta)
        except json.JSONDecodeError as e:
            raise ShardFormatError(f"{name}: schema metadata is not JSON: {e}") from e
        if not isinstance(prov, dict):
            raise ShardFormatError(f"{name}: schema metadata must be a JSON object")
        if prov.get("k") != self.k:
            raise ShardFormatError(f"{name}: K={prov.get('k')!r} in the shard but K={self.k} in the manifest")
        if prov.get("schema_version") != self.manifest.schema_version:
            raise ShardFormatError(
                f"{name}: schema_version {prov.get('schema_version')!r}, "
                f"the manifest says {self.manifest.schema_version}"
            )
        if prov.get("codec", {"name": "raw"}) != self.manifest.codec:
            raise ShardFormatError(
                f"{name}: codec {prov.get('codec')!r} in the shard but {self.manifest.codec} in the manifest"
            )
        if prov.get("config_fingerprint") != self.manifest.config_fingerprint:
            raise ShardFormatError(f"{name}: belongs to another build (config fingerprint differs from the manifest)")

    def _iter_shard(self, i: int, *, checksum: bool | None = None) -> Iterator[pa.RecordBatch]:
        """The record batches of shard i only (verify must not open the next shard while checking this one)."""
        reader = self._open(i, checksum=checksum)
        name = self.manifest.shards[i].path
        b = 0
        while True:
            try:
                batch = reader.read_next_batch()
                # buffer sizes against the declared lengths (O(columns)): a damaged shard read without its checksum
                # is refused here, not deep inside Arrow or numpy
                batch.validate()
            except StopIteration:
                return
            except (pa.ArrowInvalid, OSError) as e:
                raise ShardFormatError(f"{name}: truncated or corrupt at record batch {b}: {e}") from e
            yield batch
            b += 1

    def iter_batches(self, start: BatchPosition | None = None) -> Iterator[tuple[BatchPosition, pa.RecordBatch]]:
        """Record batches in cache order, each with its position; ``start`` skips everything before it."""
        first_shard = start.shard if start else 0
        for i in range(first_shard, len(self.manifest.shards)):
            for b, batch in enumerate(self._iter_shard(i)):
                if start is None or i > start.shard or b >= start.batch:
                    yield BatchPosition(i, b), batch

    # ---------------------------------------------------------------- rows
    def decode_batch(self, batch: pa.RecordBatch, shard: str = "<batch>") -> list[CacheRow]:
        """Decode one record batch to rows, checking every declared length against the data (vectorized)."""
        return decode_record_batch(batch, self.codec, self.k, shard)

    def iter_rows(self, start: BatchPosition | None = None) -> Iterator[CacheRow]:
        """Every row of the cache, decoded, in cache order."""
        for pos, batch in self.iter_batches(start):
            yield from self.decode_batch(batch, self.manifest.shards[pos.shard].path)

    # ---------------------------------------------------------------- checks
    def verify(self) -> list[str]:
        """Check every shard's checksum, size, schema, row count and per-row lengths.

        Returns:
            A list of problems, each naming its shard; empty when the cache is intact.
        """
        problems = []
        for i, info in enumerate(self.manifest.shards):
            if not self.location.exists(info.path):
                problems.append(f"{info.path}: missing")
                continue
            size = self.location.size(info.path)
            if size != info.bytes:
                problems.append(f"{info.path}: {size} bytes on disk, manifest says {info.bytes}")
            digest = self.location.sha256(info.path)
            if digest != info.sha256:
                problems.append(
                    f"{info.path}: sha256 {digest[:16]}... differs from the manifest's {info.sha256[:16]}..."
                )
                continue
            try:
                rows = tokens = 0
                for batch in self._iter_shard(i, checksum=False):  # its sha256 was checked just above
                    decoded = self.decode_batch(batch, info.path)
                    rows += len(decoded)
                    tokens += sum(r.n_answer for r in decoded)
                    self._deep_check(decoded, info.path)
                if rows != info.rows:
                    problems.append(f"{info.path}: {rows} rows, manifest says {info.rows}")
                if tokens != info.answer_tokens:
                    problems.append(f"{info.path}: {tokens} answer tokens, manifest says {info.answer_tokens}")
            except ShardFormatError as e:
                problems.append(str(e))
        if self.manifest.parts is not None:  # a combined cache: each part's manifest must still agree
            from fusion_cache.cache.parts import part_problems

            problems.extend(part_problems(self.location, self.manifest))
        return problems

    def _deep_check(self, rows: list[CacheRow], shard: str) -> None:
        """What decoding does not check on every read: ids in range and distinct per position, sorted values."""
        for r in rows:
            v = r.topk_logprobs
            if not np.isfinite(v).all() or (np.diff(v, axis=1) > 1e-6).any():
                raise ShardFormatError(f"{shard}: sample {r.sample_id}: top-K values are not finite and sorted")
            if self.codec.has_ids:
                ids = np.sort(r.topk_ids, axis=1)
                if (ids[:, 0] < 0).any() or (np.diff(ids, axis=1) == 0).any():
                    raise ShardFormatError(f"{shard}: sample {r.sample_id}: top-K ids are negative or repeated")
