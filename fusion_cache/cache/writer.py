"""Writes cache shards: Arrow IPC stream files in ``<out>.incomplete/``, renamed into place when the build ends.

Modelled on datasets' ArrowWriter and builder: rows are buffered into record batches, a new shard starts past
``shard_rows`` rows or ``shard_bytes`` bytes, each shard is written as ``part-NNNNN.arrow.tmp`` and renamed to its
final ``shard-NNNNN-of-MMMMM.arrow`` name only once the number of shards is known, the manifest is written last,
and the whole directory is moved to ``<out>`` in one rename. A killed build therefore never leaves a directory that
looks like a cache.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_cache.cache.fingerprint import file_sha256
from fusion_cache.cache.schema import COLUMNS
from fusion_cache.cache.schema import shard_name
from fusion_cache.cache.schema import shard_schema


@dataclass
class CacheRow:
    """One (sample, teacher) row, as numpy arrays.

    Attributes:
        sample_id: 32 hex chars.
        row_index: index of the sample in the input dataset.
        conversation: canonical JSON of the messages.
        input_ids: int32 [n_tokens].
        answer_start: index of the first answer token.
        token_byte_start, token_byte_end: int32 [n_tokens] byte offsets into the rendered text.
        topk_ids: int32 [n_answer, K].
        topk_logprobs: float32 [n_answer, K].
        target_logprobs: float32 [n_answer].
    """

    sample_id: str
    row_index: int
    conversation: str
    input_ids: np.ndarray
    answer_start: int
    token_byte_start: np.ndarray
    token_byte_end: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray


def _list_column(arrays: list[np.ndarray], dtype: np.dtype, arrow_type: pa.DataType) -> pa.Array:
    """Build a list<T> column from per-row arrays without a per-element Python loop."""
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype, copy=False) if arrays else np.array([], dtype)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, arrow_type.value_type))


def rows_to_batch(rows: list[CacheRow], schema: pa.Schema) -> pa.RecordBatch:
    """Convert rows to one record batch of the v1 schema."""
    cols = {
        "sample_id": pa.array([r.sample_id for r in rows], pa.string()),
        "row_index": pa.array([r.row_index for r in rows], pa.int64()),
        "conversation": pa.array([r.conversation for r in rows], pa.string()),
        "input_ids": _list_column([r.input_ids for r in rows], np.int32, COLUMNS["input_ids"]),
        "answer_start": pa.array([r.answer_start for r in rows], pa.int32()),
        "token_byte_start": _list_column([r.token_byte_start for r in rows], np.int32, COLUMNS["token_byte_start"]),
        "token_byte_end": _list_column([r.token_byte_end for r in rows], np.int32, COLUMNS["token_byte_end"]),
        "topk_ids": _list_column([r.topk_ids for r in rows], np.int32, COLUMNS["topk_ids"]),
        "topk_logprobs": _list_column([r.topk_logprobs for r in rows], np.float32, COLUMNS["topk_logprobs"]),
        "target_logprobs": _list_column([r.target_logprobs for r in rows], np.float32, COLUMNS["target_logprobs"]),
    }
    return pa.RecordBatch.from_arrays([cols[name] for name in schema.names], schema=schema)


class ShardWriter:
    """Context manager that writes rows into shards under a work directory.

    Example:
        with ShardWriter(work_dir, provenance, shard_rows=1000) as w:
            w.write_rows(rows)
        shards = w.shards  # [{"path", "rows", "answer_tokens", "bytes", "sha256"}], files renamed into place
    """

    def __init__(self, work_dir: str | Path, provenance: dict, *, shard_rows: int = 1000, shard_bytes: int = 1 << 30):
        self.work_dir = Path(work_dir)
        self.schema = shard_schema(provenance)
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self._parts: list[dict] = []  # finished part files, before their final names
        self._sink = None
        self._writer = None
        self._cur: dict | None = None
        self.shards: list[dict] = []

    def __enter__(self) -> ShardWriter:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._close_current()

    def _open_part(self) -> None:
        path = self.work_dir / f"part-{len(self._parts):05d}.arrow.tmp"
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._cur = {"tmp": path, "rows": 0, "answer_tokens": 0}

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._parts.append(self._cur)
            self._writer = self._sink = self._cur = None

    def write_rows(self, rows: list[CacheRow]) -> None:
        """Append rows; a shard is closed once it holds ``shard_rows`` rows or ``shard_bytes`` bytes."""
        while rows:
            if self._writer is None:
                self._open_part()
            take = rows[: self.shard_rows - self._cur["rows"]]
            rows = rows[len(take) :]
            self._writer.write_batch(rows_to_batch(take, self.schema))
            self._cur["rows"] += len(take)
            self._cur["answer_tokens"] += sum(int(r.target_logprobs.size) for r in take)
            if self._cur["rows"] >= self.shard_rows or self._sink.tell() >= self.shard_bytes:
                self._close_current()

    def finalize(self) -> list[dict]:
        """Close the last shard and rename every part to its final name. Returns the shard records."""
        self._close_current()
        count = len(self._parts)
        self.shards = []
        for i, part in enumerate(self._parts):
            final = self.work_dir / shard_name(i, count)
            os.replace(part["tmp"], final)
            self.shards.append(
                {
                    "path": final.name,
                    "rows": part["rows"],
                    "answer_tokens": part["answer_tokens"],
                    "bytes": final.stat().st_size,
                    "sha256": file_sha256(final),
                }
            )
        return self.shards


def publish_directory(work_dir: Path, out: Path, *, overwrite: bool) -> None:
    """Move a finished ``work_dir`` to ``out``. An existing ``out`` is replaced only with ``overwrite`` and only
    after the new cache is complete, so a failure never loses the old one."""
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty")
        trash = out.with_name(out.name + ".old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(out, trash)
        os.replace(work_dir, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work_dir, out)
