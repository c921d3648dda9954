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

from fusion_cache.cache.fingerprint import file_sha256
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.schema import COLUMNS
from fusion_cache.cache.schema import METADATA_KEY
from fusion_cache.cache.schema import SCHEMA_VERSION
from fusion_cache.cache.writer import CacheRow
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


class CacheReader:
    """Read access to one cache directory.

    Args:
        path: the cache directory (holding manifest.json and the shards).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest: Manifest = load_manifest(self.path)
        self.k = self.manifest.k

    # ---------------------------------------------------------------- shards
    def shard_path(self, i: int) -> Path:
        return self.path / self.manifest.shards[i].path

    def _open(self, i: int) -> pa.ipc.RecordBatchStreamReader:
        name = self.manifest.shards[i].path
        path = self.path / name
        if not path.is_file():
            raise ShardFormatError(f"{name}: shard listed in the manifest is missing")
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path), "r"))
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardFormatError(f"{name}: not a readable Arrow IPC stream: {e}") from e
        self._check_schema(name, reader.schema)
        return reader

    def _check_schema(self, name: str, schema: pa.Schema) -> None:
        for col, typ in COLUMNS.items():
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
        if prov.get("schema_version") != SCHEMA_VERSION:
            raise ShardFormatError(f"{name}: schema_version {prov.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        if prov.get("k") != self.k:
            raise ShardFormatError(f"{name}: K={prov.get('k')!r} in the shard but K={self.k} in the manifest")
        if prov.get("config_fingerprint") != self.manifest.config_fingerprint:
            raise ShardFormatError(f"{name}: belongs to another build (config fingerprint differs from the manifest)")

    def iter_batches(self, start: BatchPosition | None = None) -> Iterator[tuple[BatchPosition, pa.RecordBatch]]:
        """Record batches in cache order, each with its position; ``start`` skips everything before it."""
        first_shard = start.shard if start else 0
        for i in range(first_shard, len(self.manifest.shards)):
            reader = self._open(i)
            name = self.manifest.shards[i].path
            b = 0
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError) as e:
                    raise ShardFormatError(f"{name}: truncated or corrupt at record batch {b}: {e}") from e
                if start is None or i > start.shard or b >= start.batch:
                    yield BatchPosition(i, b), batch
                b += 1

    # ---------------------------------------------------------------- rows
    def decode_batch(self, batch: pa.RecordBatch, shard: str = "<batch>") -> list[CacheRow]:
        """Decode one record batch to rows, checking every declared length against the data (vectorized)."""
        k = self.k
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
        parts = {}
        expected = {
            "token_byte_start": n_tokens,
            "token_byte_end": n_tokens,
            "topk_ids": n_answer * k,
            "topk_logprobs": n_answer * k,
            "target_logprobs": n_answer,
        }
        for name, want in expected.items():
            off, vals = _list_parts(batch.column(name), shard, name)
            got = np.diff(off)
            bad = np.flatnonzero(got != want)
            if bad.size:
                r = int(bad[0])
                raise ShardFormatError(
                    f"{shard}: row {r}: column {name!r} has {int(got[r])} values, expected {int(want[r])} (K={k})"
                )
            parts[name] = (off, vals)
        sample_ids = batch.column("sample_id").to_pylist()
        row_index = batch.column("row_index").to_numpy()
        convs = batch.column("conversation").to_pylist()
        rows = []
        for r in range(batch.num_rows):
            s, e = ids_off[r], ids_off[r + 1]
            a0, a1 = parts["target_logprobs"][0][r], parts["target_logprobs"][0][r + 1]
            t0, t1 = parts["topk_ids"][0][r], parts["topk_ids"][0][r + 1]
            rows.append(
                CacheRow(
                    sample_id=sample_ids[r],
                    row_index=int(row_index[r]),
                    conversation=convs[r],
                    input_ids=ids[s:e],
                    answer_start=int(answer_start[r]),
                    token_byte_start=parts["token_byte_start"][1][s:e],
                    token_byte_end=parts["token_byte_end"][1][s:e],
                    topk_ids=parts["topk_ids"][1][t0:t1].reshape(-1, k),
                    topk_logprobs=parts["topk_logprobs"][1][t0:t1].reshape(-1, k),
                    target_logprobs=parts["target_logprobs"][1][a0:a1],
                )
            )
        return rows

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
            path = self.path / info.path
            if not path.is_file():
                problems.append(f"{info.path}: missing")
                continue
            size = path.stat().st_size
            if size != info.bytes:
                problems.append(f"{info.path}: {size} bytes on disk, manifest says {info.bytes}")
            digest = file_sha256(path)
            if digest != info.sha256:
                problems.append(
                    f"{info.path}: sha256 {digest[:16]}... differs from the manifest's {info.sha256[:16]}..."
                )
                continue
            try:
                rows = tokens = 0
                for _, batch in self.iter_batches(BatchPosition(i, 0)):
                    if _.shard != i:
                        break
                    decoded = self.decode_batch(batch, info.path)
                    rows += len(decoded)
                    tokens += sum(int(r.target_logprobs.size) for r in decoded)
                if rows != info.rows:
                    problems.append(f"{info.path}: {rows} rows, manifest says {info.rows}")
                if tokens != info.answer_tokens:
                    problems.append(f"{info.path}: {tokens} answer tokens, manifest says {info.answer_tokens}")
            except ShardFormatError as e:
                problems.append(str(e))
        return problems
