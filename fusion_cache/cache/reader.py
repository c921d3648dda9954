"""Reads a cache: validated manifest, memory-mapped shards, rows decoded to numpy with vectorized checks.

Everything read is treated as untrusted: a shard must be a regular file inside the cache with the manifest's size and
sha256; its schema, K, list lengths, the decoded sizes its record batches declare (before they are decompressed) and
the content of every decoded row are checked (cache/validate.py), and as the shards stream past, each one's rows and
answer tokens against the manifest. Errors name the shard, the record batch and the row at fault; no Arrow or numpy
error escapes as anything but a ShardFormatError. Nothing is ever unpickled: Arrow IPC only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_cache.cache.codecs import Codec
from fusion_cache.cache.codecs import parse_codec
from fusion_cache.cache.codecs.base import AnswerSpans
from fusion_cache.cache.codecs.base import checked_lists
from fusion_cache.cache.codecs.base import list_parts
from fusion_cache.cache.codecs.ids import id_order_key
from fusion_cache.cache.codecs.ids import parse_id_order
from fusion_cache.cache.manifest import Manifest
from fusion_cache.cache.manifest import load_manifest
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.row import MissingField
from fusion_cache.cache.schema import METADATA_KEY
from fusion_cache.cache.schema import shard_columns
from fusion_cache.cache.storage import CacheLocation
from fusion_cache.cache.validate import ContentRules
from fusion_cache.cache.validate import DecodeLimits
from fusion_cache.cache.validate import ScanTally
from fusion_cache.cache.validate import Where
from fusion_cache.cache.validate import check_common
from fusion_cache.cache.validate import check_message
from fusion_cache.cache.validate import check_strings
from fusion_cache.cache.validate import check_topk
from fusion_cache.errors import FusionCacheError
from fusion_cache.errors import ShardFormatError

# what decoding untrusted bytes can raise besides our own errors: all become a one-line ShardFormatError
DECODE_ERRORS = (pa.ArrowException, ValueError, TypeError, IndexError, KeyError, OverflowError, MemoryError,
                 UnicodeDecodeError, OSError)  # fmt: skip


@dataclass(frozen=True)
class BatchPosition:
    """Where a record batch sits in the cache: enough to resume a read right after it."""

    shard: int
    batch: int


def decode_record_batch(
    batch: pa.RecordBatch,
    codec: Codec,
    k: int,
    shard: str = "<batch>",
    *,
    rules: ContentRules | None = None,
    batch_index: int | None = None,
    row_numbers: list[int] | None = None,
    id_orders: Mapping[str, np.ndarray] | None = None,
) -> list[CacheRow]:
    """Decode one record batch of a ``codec`` shard to rows, checking every declared length against the data and,
    with ``rules``, the content of every row (cache/validate.py).

    The common columns are checked here, the codec's by its decode, which decodes its columns for the whole batch
    at once (numpy); the rows are then slices of the batch-wide arrays.

    Args:
        rules: the cache's `ContentRules`; None decodes without the content checks (benchmarks, tests).
        batch_index, row_numbers: where the batch is, for messages: its index in the shard, and its rows' numbers
            when it is a subset of a record batch (`RecordBatch.take`).
        id_orders: the id orders the rows may name, by key (`manifest_id_orders`; ``full`` layout 4 needs them).

    Raises:
        ShardFormatError: naming the shard, the record batch and the row, for anything wrong with the data (also
            what Arrow or numpy would raise on it).
    """
    where = Where(shard, batch_index, row_numbers)
    try:
        return _decode(batch, codec, k, where, rules, id_orders or {})
    except FusionCacheError:
        raise
    except DECODE_ERRORS as e:
        raise ShardFormatError(f"{where}: cannot be decoded: {type(e).__name__}: {e}") from None


def _decode(
    batch: pa.RecordBatch, codec: Codec, k: int, where: Where, rules: ContentRules | None, id_orders: Mapping
) -> list[CacheRow]:
    shard = str(where)
    for col, typ in shard_columns(codec, k).items():
        idx = batch.schema.get_field_index(col)
        if idx < 0 or batch.schema.field(idx).type != typ:
            got = "missing" if idx < 0 else str(batch.schema.field(idx).type)
            raise ShardFormatError(f"{shard}: column {col!r} is {got}, expected {typ}")
    if rules is not None:
        check_strings(batch, where)
    ids_off, ids = list_parts(batch.column("input_ids"), shard, "input_ids")
    n_tokens = np.diff(ids_off)
    answer_start = batch.column("answer_start").to_numpy().astype(np.int64)
    n_answer = n_tokens - answer_start
    bad = np.flatnonzero((answer_start < 1) | (n_answer < 1))
    if bad.size:
        r = int(bad[0])
        raise ShardFormatError(
            f"{where.row(r)}: answer_start={int(answer_start[r])} invalid for {int(n_tokens[r])} tokens"
        )
    parts = checked_lists(batch, {"token_byte_start": n_tokens, "token_byte_end": n_tokens}, k, shard)
    byte_start, byte_end = parts["token_byte_start"], parts["token_byte_end"]
    sample_ids = None
    if rules is not None:
        sample_ids = check_common(batch, ids_off, ids, byte_start, byte_end, rules, where)
    # answer-position offsets shared by every top-K array
    ans_off = np.zeros(batch.num_rows + 1, dtype=np.int64)
    np.cumsum(n_answer, out=ans_off[1:])
    spans = AnswerSpans(k, shard, n_answer, ans_off, ids, ids_off, answer_start, id_orders)
    top = codec.decode(batch, spans)
    if rules is not None:
        check_topk(top, spans, rules, where, sample_ids)
    if sample_ids is None:
        sample_ids = batch.column("sample_id").to_pylist()
    row_index = batch.column("row_index").to_numpy().tolist()
    convs = batch.column("conversation").to_pylist()
    topk_ids = MissingField("topk_ids", codec.name) if top.ids is None else top.ids
    targets = MissingField("target_logprobs", codec.name) if top.targets is None else top.targets
    values, tail, has_ids, has_targets = top.values, top.tail_mass, top.ids is not None, top.targets is not None
    counts = top.counts
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
                sample_counts=counts[a0:a1] if counts is not None else None,
            )
        )
    return rows


def manifest_id_orders(manifest: Manifest, codec: Codec, shards=None) -> dict[str, np.ndarray]:
    """The id orders of ``shards`` (default: all) of a ``full`` layout 4 or ``sampled`` cache, by the key its rows
    name them by (`id_order_key`, computed here from the order itself: an edited order gets a key no row names);
    empty for every other codec.

    Raises:
        ShardFormatError: an id order is corrupt, naming the shard.
    """
    out = {}
    for info in manifest.shards if shards is None else shards:
        if info.id_order is not None:
            order = parse_id_order(info.id_order, codec.id_bytes, f"manifest.json: shards: {info.path}: id_order")
            out[id_order_key(order)] = order
    return out


class CacheReader:
    """Read access to one cache directory.

    Args:
        path: the cache directory (holding manifest.json and the shards): a local path or any fsspec URL.
        check_checksums: hash every shard when it is opened and refuse one whose sha256 differs from the
            manifest's (one extra sequential read; a cache from elsewhere is untrusted, and a flipped bit inside a
            value code would otherwise decode to a plausible wrong tensor).
        limits: bounds on what decoding a record batch may allocate (`DecodeLimits`).
        check_content: run the content checks of cache/validate.py on every decoded row (on by default; off only
            for measuring what they cost).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        check_checksums: bool = True,
        limits: DecodeLimits | None = None,
        check_content: bool = True,
    ):
        self.check_checksums = check_checksums
        self.limits = limits or DecodeLimits()
        self.location = CacheLocation(str(path))
        self.path = Path(path) if self.location.local else str(path)
        self.manifest: Manifest = load_manifest(self.location)
        self.k = self.manifest.k
        self.codec = parse_codec(self.manifest.codec, f"{self.path}/manifest.json", self.manifest.schema_version)
        self.columns = shard_columns(self.codec, self.k)
        self.rules = ContentRules.from_manifest(self.manifest, self.codec) if check_content else None
        self._shard_info = {s.path: s for s in self.manifest.shards}
        self._orders: dict[str, dict[str, np.ndarray]] = {}  # shard path -> its id orders (full layout 4)

    # ---------------------------------------------------------------- shards
    def shard_path(self, i: int) -> str:
        return self.location.join(self.manifest.shards[i].path)

    def _open(self, i: int, *, checksum: bool | None = None):
        """The shard's messages (`pyarrow.ipc.MessageReader`) and its schema, after checking that it is a regular
        file inside the cache with the manifest's size (and sha256)."""
        info = self.manifest.shards[i]
        name = info.path
        if not self.location.local:
            # a remote shard is fetched and hashed once into the local shard cache (cache/storage.py), whatever
            # check_checksums says (its sha256 names the copy), and memory-mapped from there every later epoch and run
            source = self.location.cached_copy(name, info.sha256, info.bytes)
        else:
            self.location.check_regular(name)
            size = self.location.size(name)
            if size != info.bytes:  # before hashing: a size is one stat, and a huge file is not read for nothing
                raise ShardFormatError(f"{name}: {size} bytes on disk, the manifest says {info.bytes}")
            if self.check_checksums if checksum is None else checksum:
                digest = self.location.sha256(name)
                if digest != info.sha256:
                    raise ShardFormatError(
                        f"{name}: sha256 {digest[:16]}... differs from the manifest's {info.sha256[:16]}"
                        "...; the shard is corrupt or was replaced"
                    )
            source = self.location.join(name)
        try:
            messages = pa.ipc.MessageReader.open_stream(pa.memory_map(source, "r"))
            first = messages.read_next_message()
            if first.type != "schema":
                raise ShardFormatError(f"{name}: does not start with an Arrow IPC schema message")
            schema = pa.ipc.read_schema(first)
        except FusionCacheError:
            raise
        except (StopIteration, *DECODE_ERRORS) as e:
            raise ShardFormatError(f"{name}: not a readable Arrow IPC stream: {type(e).__name__}: {e}") from None
        self._check_schema(name, schema)
        return messages, schema

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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
        """The record batches of shard i only (verify must not open the next shard while checking this one).

        Each message's declared decoded size is checked against ``limits`` before it is decompressed
        (`check_message`), and each batch is ``validate()``d after (buffer sizes against the declared lengths,
        O(columns)): a damaged shard read without its checksum is refused here, not deep inside Arrow or numpy.
        """
        messages, schema = self._open(i, checksum=checksum)
        name = self.manifest.shards[i].path
        b = 0
        while True:
            where = str(Where(name, b))
            try:
                message = messages.read_next_message()
            except StopIteration:
                return
            except DECODE_ERRORS as e:
                raise ShardFormatError(f"{where}: truncated or corrupt: {type(e).__name__}: {e}") from None
            check_message(message, self.limits, where)
            try:
                batch = pa.ipc.read_record_batch(message, schema)
                batch.validate()
            except DECODE_ERRORS as e:
                raise ShardFormatError(f"{where}: truncated or corrupt: {type(e).__name__}: {e}") from None
            yield batch
            b += 1

    def iter_batches(self, start: BatchPosition | None = None) -> Iterator[tuple[BatchPosition, pa.RecordBatch]]:
        """Record batches in cache order, each with its position; ``start`` skips everything before it.

        As they stream past, each shard's rows and answer tokens are checked against its manifest entry (at the
        shard's end), row indices against the previous ones, and after a whole pass the tokens against
        ``stats.tokens`` (`ScanTally`): a reader that streams the cache checks what `verify` checks.
        """
        first_shard = start.shard if start else 0
        tally = ScanTally(self.manifest, first_shard, start.batch if start else 0)
        for i in range(first_shard, len(self.manifest.shards)):
            name = self.manifest.shards[i].path
            for b, batch in enumerate(self._iter_shard(i)):
                if start is None or i > start.shard or b >= start.batch:
                    tally.add(i, batch, Where(name, b))
                    yield BatchPosition(i, b), batch
            tally.end_shard(i)
        tally.end()

    # ---------------------------------------------------------------- rows
    def decode_batch(
        self,
        batch: pa.RecordBatch,
        shard: str = "<batch>",
        *,
        batch_index: int | None = None,
        row_numbers: list[int] | None = None,
    ) -> list[CacheRow]:
        """Decode one record batch to rows, checking every declared length against the data and the content of
        every row (`decode_record_batch` with the cache's `ContentRules`). ``shard`` is the path of the shard the
        batch comes from (its manifest entry holds the id order of a ``full`` layout 4 cache)."""
        return decode_record_batch(
            batch,
            self.codec,
            self.k,
            shard,
            rules=self.rules,
            batch_index=batch_index,
            row_numbers=row_numbers,
            id_orders=self.shard_id_orders(shard),
        )

    def shard_id_orders(self, shard: str) -> dict[str, np.ndarray]:
        """The id order a row of shard ``shard`` (its path) may name: its own manifest entry's (full layout 4)."""
        if shard not in self._orders:
            info = self._shard_info.get(shard)
            self._orders[shard] = {} if info is None else manifest_id_orders(self.manifest, self.codec, [info])
        return self._orders[shard]

    def iter_rows(self, start: BatchPosition | None = None) -> Iterator[CacheRow]:
        """Every row of the cache, decoded and checked, in cache order."""
        for pos, batch in self.iter_batches(start):
            yield from self.decode_batch(batch, self.manifest.shards[pos.shard].path, batch_index=pos.batch)

    # ---------------------------------------------------------------- checks
    def _local_shard_ok(self, info, problems: list[str]) -> bool:
        """Whether a local shard is a regular file inside the cache with the manifest's size and sha256 (else the
        problem is appended to ``problems``)."""
        try:
            self.location.check_regular(info.path)
        except ShardFormatError as e:
            problems.append(str(e))
            return False
        size = self.location.size(info.path)
        if size != info.bytes:
            problems.append(f"{info.path}: {size} bytes on disk, manifest says {info.bytes}")
            return False
        digest = self.location.sha256(info.path)
        if digest != info.sha256:
            problems.append(f"{info.path}: sha256 {digest[:16]}... differs from the manifest's {info.sha256[:16]}...")
            return False
        return True

    def verify(self, *, progress: bool = False) -> list[str]:
        """Check every shard (a regular file inside the cache, its size, sha256, schema, decoded sizes, row count,
        answer tokens and the content of every row) and the cache's total tokens.

        Args:
            progress: show a progress bar over the shards.

        Returns:
            A list of problems, each naming its shard; empty when the cache is intact.
        """
        from tqdm.auto import tqdm

        problems = []
        tally = ScanTally(self.manifest)
        whole = True
        shards = tqdm(self.manifest.shards, desc="verify", unit="shard", disable=not progress, dynamic_ncols=True)
        for i, info in enumerate(shards):
            if not self.location.local:  # what the URL holds now: downloaded and hashed again into the shard cache
                try:
                    self.location.cached_copy(info.path, info.sha256, info.bytes, refresh=True)
                except ShardFormatError as e:
                    problems.append(str(e))
                    whole = False
                    continue
            elif not self._local_shard_ok(info, problems):
                whole = False
                continue
            try:
                for b, batch in enumerate(self._iter_shard(i, checksum=False)):  # its sha256 was checked above
                    tally.add(i, batch, Where(info.path, b))
                    self.decode_batch(batch, info.path, batch_index=b)
                tally.end_shard(i)
            except ShardFormatError as e:
                problems.append(str(e))
                whole = False
                tally = ScanTally(self.manifest, i + 1)  # the next shard's counts start afresh
        if whole:
            try:
                tally.end()
            except ShardFormatError as e:
                problems.append(str(e))
        if self.manifest.parts is not None:  # a combined cache: each part's manifest must still agree
            from fusion_cache.cache.parts import part_problems

            problems.extend(part_problems(self.location, self.manifest))
        return problems
