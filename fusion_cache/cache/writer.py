"""Writes cache shards: Arrow IPC stream files in ``<out>.incomplete/``, renamed into place when the build ends.

Modelled on datasets' ArrowWriter and builder: rows are buffered into record batches, a new shard starts past
``shard_rows`` rows or ``shard_bytes`` bytes, each shard is written as ``part-NNNNN.arrow.tmp``, and renamed to its
final ``shard-NNNNN-of-MMMMM.arrow`` name only once the number of shards is known; the manifest is written last,
and the whole directory is moved to ``<out>`` in one rename. A killed build therefore never leaves a directory that
looks like a cache.

Crash safety (``fusion-cache build --resume``): a part is *complete* once its bytes are fsynced, the temp file is
renamed to ``part-NNNNN.arrow`` and its record ``part-NNNNN.json`` (rows, answer tokens, bytes, sha256) is written
atomically (cache/durable.py). `load_completed_parts` (cache/resume.py) returns the complete parts of an
interrupted build after checking each one's size and sha256, and deletes what cannot be trusted (temp files, a part
without a record, everything after the first bad part). Parts are written in input order, so the complete parts
hold exactly the first ``sum(rows)`` rows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs import LATEST_SCHEMA_VERSION
from fusion_cache.cache.codecs import Codec
from fusion_cache.cache.codecs import RawCodec
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.codecs.base import list_column
from fusion_cache.cache.durable import fsync_dir
from fusion_cache.cache.durable import fsync_file
from fusion_cache.cache.fingerprint import file_sha256
from fusion_cache.cache.resume import part_name
from fusion_cache.cache.resume import write_part_record
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.schema import COMMON_COLUMNS
from fusion_cache.cache.schema import shard_name
from fusion_cache.cache.schema import shard_schema


def encode_topk(rows: list[CacheRow], codec: Codec, k: int, id_order: np.ndarray | None = None) -> dict[str, pa.Array]:
    """The codec's top-K columns for ``rows``, after checking that every row's top-K block is [n_answer, K].

    ``id_order`` is the shard's id order (the full codec's; from `shard_schema_with_order`), stored in the shard's
    schema metadata (full layouts 1-3) or its manifest entry (layout 4, `Codec.shard_entry`).
    """
    for r in rows:
        if r.topk_logprobs.ndim != 2 or r.topk_logprobs.shape[1] != k:
            raise ValueError(f"row {r.sample_id}: top-K block has shape {r.topk_logprobs.shape}, expected [n, {k}]")
    return codec.encode(rows, k, id_order)


def rows_to_batch(
    rows: list[CacheRow],
    schema: pa.Schema,
    codec: Codec | None = None,
    k: int | None = None,
    id_order: np.ndarray | None = None,
):
    """Convert rows to one record batch of ``schema`` (common columns + the codec's top-K columns)."""
    codec = codec or RawCodec()
    k = k if k is not None else (rows[0].topk_logprobs.shape[1] if rows else 1)
    cols = {
        "sample_id": pa.array([r.sample_id for r in rows], pa.string()),
        "row_index": pa.array([r.row_index for r in rows], pa.int64()),
        "conversation": pa.array([r.conversation for r in rows], pa.string()),
        "input_ids": list_column([r.input_ids for r in rows], np.int32, COMMON_COLUMNS["input_ids"]),
        "answer_start": pa.array([r.answer_start for r in rows], pa.int32()),
        "token_byte_start": list_column(
            [r.token_byte_start for r in rows], np.int32, COMMON_COLUMNS["token_byte_start"]
        ),
        "token_byte_end": list_column([r.token_byte_end for r in rows], np.int32, COMMON_COLUMNS["token_byte_end"]),
        **encode_topk(rows, codec, k, id_order),
    }
    return pa.RecordBatch.from_arrays([cols[name] for name in schema.names], schema=schema)


def shard_schema_with_order(schema: pa.Schema, codec: Codec, first_rows: list[CacheRow]):
    """(schema, id order): the codec's per-shard metadata from ``first_rows`` (full layouts 1-3: the id order) added
    to the schema metadata, and the id order its encode takes (None for the codecs without one)."""
    meta, order = codec.shard_metadata(first_rows)
    if not meta:
        return schema, order
    return schema.with_metadata({**schema.metadata, **meta}), order


class ShardWriter:
    """Context manager that writes rows into shards under a work directory.

    Example:
        with ShardWriter(work_dir, provenance, shard_rows=1000) as w:
            w.write_rows(rows)
        shards = w.shards  # [{"path", "rows", "answer_tokens", "bytes", "sha256"}], files renamed into place
        # (plus the codec's `shard_entry` fields: full layout 4's "id_order"), ready for the manifest

    Args:
        work_dir: the ``<out>.incomplete`` directory.
        provenance: the shard schema metadata (schema_version, k, codec, config_fingerprint, ...).
        shard_rows, shard_bytes: a part is closed once it holds this many rows or bytes.
        completed: the complete parts of an interrupted build (`load_completed_parts`); new parts follow them.
    """

    def __init__(
        self,
        work_dir: str | Path,
        provenance: dict,
        *,
        shard_rows: int = 1000,
        shard_bytes: int = 1 << 30,
        completed: list[dict] | None = None,
    ):
        self.work_dir = Path(work_dir)
        self.codec = parse_codec(
            provenance.get("codec", {"name": "raw"}),
            "provenance codec",
            provenance.get("schema_version", LATEST_SCHEMA_VERSION),
        )
        self.k = provenance.get("k")
        self.schema = shard_schema(provenance, self.codec, self.k)
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self._parts: list[dict] = [dict(p) for p in completed or []]  # complete parts, before their final names
        for p in self._parts:
            lacking = [f for f in self.codec.shard_entry_fields() if f not in p]
            if lacking:
                raise ValueError(f"part record {p.get('file')!r} lacks {lacking}, which codec {self.codec.name} needs")
        self._sink = None
        self._writer = None
        self._cur: dict | None = None
        self.shards: list[dict] = []

    @property
    def rows_completed(self) -> int:
        """Rows held by complete parts: an interrupted build resumes after this many rows."""
        return sum(p["rows"] for p in self._parts)

    def __enter__(self) -> ShardWriter:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self._abandon_current()

    def _open_part(self, first_rows: list[CacheRow]) -> None:
        path = self.work_dir / f"{part_name(len(self._parts))}.arrow.tmp"
        # the codec's per-shard state (full: the id order) comes from its first record batch, stored in its schema
        self._schema, self._id_order = shard_schema_with_order(self.schema, self.codec, first_rows)
        self._entry = self.codec.shard_entry(self._id_order)  # full layout 4: the id order, for the manifest
        schema = self._schema
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema, options=self.codec.ipc_options())
        self._cur = {"tmp": path, "rows": 0, "answer_tokens": 0}

    def _close_current(self) -> None:
        """Close the open part and make it complete: fsync, rename to ``part-NNNNN.arrow``, write its record."""
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        tmp = self._cur["tmp"]
        fsync_file(tmp)
        index = len(self._parts)
        final = self.work_dir / f"{part_name(index)}.arrow"
        os.replace(tmp, final)
        record = {
            "index": index,
            "file": final.name,
            "rows": self._cur["rows"],
            "answer_tokens": self._cur["answer_tokens"],
            "bytes": final.stat().st_size,
            "sha256": file_sha256(final),
            **self._entry,
        }
        # the record is written after the rename: a part without a record is never trusted
        write_part_record(self.work_dir, record)
        self._parts.append(record)
        self._writer = self._sink = self._cur = None

    def _abandon_current(self) -> None:
        """After an error: close the open part and delete it (it is not complete; a resume rewrites its rows)."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._cur["tmp"].unlink(missing_ok=True)
            self._writer = self._sink = self._cur = None

    def write_rows(self, rows: list[CacheRow]) -> None:
        """Append rows; a shard is closed once it holds ``shard_rows`` rows or ``shard_bytes`` bytes."""
        while rows:
            if self._writer is None:
                self._open_part(rows[: self.shard_rows])
            take = rows[: self.shard_rows - self._cur["rows"]]
            rows = rows[len(take) :]
            self._writer.write_batch(rows_to_batch(take, self._schema, self.codec, self.k, self._id_order))
            self._cur["rows"] += len(take)
            self._cur["answer_tokens"] += sum(r.n_answer for r in take)
            if self._cur["rows"] >= self.shard_rows or self._sink.tell() >= self.shard_bytes:
                self._close_current()

    def finalize(self) -> list[dict]:
        """Close the last shard and rename every part to its final name. Returns the shard records.

        The part records stay until `remove_part_records` (after the manifest is written), so a build killed here
        still resumes: `load_completed_parts` also finds a part under its final shard name.
        """
        self._close_current()
        count = len(self._parts)
        self.shards = []
        for i, part in enumerate(self._parts):
            final = self.work_dir / shard_name(i, count)
            if not final.exists():
                os.replace(self.work_dir / part["file"], final)
            self.shards.append(
                {
                    "path": final.name,
                    "rows": part["rows"],
                    "answer_tokens": part["answer_tokens"],
                    "bytes": part["bytes"],
                    "sha256": part["sha256"],
                    **{name: part[name] for name in self.codec.shard_entry_fields()},
                }
            )
        fsync_dir(self.work_dir)
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
