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

from fusion_cache.cache.codecs import Codec
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.codecs.base import AnswerSpans
from fusion_cache.cache.codecs.base import checked_lists
from fusion_cache.cache.codecs.base import list_parts
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


def decode_record_batch(batch: pa.RecordBatch, codec: Codec, k: int, shard: str = "<batch>") -> list[CacheRow]:
    """Decode one record batch of a ``codec`` shard to rows, checking every declared length against the data.

    The common columns are checked here, the codec's by its decode, which decodes its columns for the whole batch
    at once (numpy); the rows are then slices of the batch-wide arrays.
    """
    for col, typ in shard_columns(codec, k).items():
        idx = batch.schema.get_field_index(col)
        if idx < 0 or batch.schema.field(idx).type != typ:
            got = "missing" if idx < 0 else str(batch.schema.field(idx).type)
            raise ShardFormatError(f"{shard}: column {col!r} is {got}, expected {typ}")
    ids_off, ids = list_parts(batch.column("input_ids"), shard, "input_ids")
    n_tokens = np.diff(ids_off)
    answer_start = batch.column("answer_start").to_numpy().astype(np.int64)
    n_answer = n_tokens - answer_start
    bad = np.flatnonzero((answer_start < 1) | (n_answer < 1))
    if bad.size:
        r = int(bad[0])
        raise ShardFormatError(
            f"{shard}: row {r}: answer_start={int(answer_start[r])} invalid for {int(n_tokens[r])} tokens"
        )
    parts = checked_lists(batch, {"token_byte_start": n_tokens, "token_byte_end": n_tokens}, k, shard)
    # answer-position offsets shared by every top-K array
    ans_off = np.zeros(batch.num_rows + 1, dtype=np.int64)
    np.cumsum(n_answer, out=ans_off[1:])
    spans = AnswerSpans(k, shard, n_answer, ans_off, ids, ids_off, answer_start)
    top = codec.decode(batch, spans)
    sample_ids = batch.column("sample_id").to_pylist()
    row_index = batch.column("row_index").to_numpy().tolist()
    convs = batch.column("conversation").to_pylist()
    topk_ids = MissingField("topk_ids", codec.name) if top.ids is None else top.ids
    targets = MissingField("target_logprobs", codec.name) if top.targets is None else top.targets
    values, tail, has_ids, has_targets = top.values, top.tail_mass, top.ids is not None, top.targets is not None
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
    def verify(self, *, progress: bool = False) -> list[str]:
        """Check every shard's checksum, size, schema, row count and per-row lengths.

        Args:
            progress: show a progress bar over the shards.

        Returns:
            A list of problems, each naming its shard; empty when the cache is intact.
        """
        from tqdm.auto import tqdm

        problems = []
        shards = tqdm(self.manifest.shards, desc="verify", unit="shard", disable=not progress, dynamic_ncols=True)
        for i, info in enumerate(shards):
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
