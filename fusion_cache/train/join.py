"""Join the caches of S >= 1 teachers on ``sample_id`` while streaming them; memory stays bounded.

    join = CacheJoin([CacheReader("cache/a"), CacheReader("cache/b")])
    for sample in join:        # sample.rows[i] is cache i's CacheRow, or None if cache i lacks the sample
        ...
    join.counts                # {"samples": .., "complete": .., "missing": {"a": .., "b": ..}, ...}

With one cache the join is the cache itself, row by row: single-teacher training is its S = 1 case.

A sample that is missing from some caches is still yielded, with the teachers it has (None for the others). How
the join knows that a sample will not come:

- Caches built from the same input (equal dataset hash in their manifests) share ``row_index`` and are written in
  ``row_index`` order, so the reader that is furthest behind is always advanced (a merge join). A sample is
  complete, or known to be missing from a cache as soon as that cache has moved past its ``row_index``: nothing is
  held for long. This order is checked while reading; a cache that is not in order falls back to the window below.
- Otherwise (different inputs, or out of order) the caches are read round robin and a sample waits at most
  ``window`` reads for its partners before it is yielded with the teachers it has. Caches whose common samples are
  further apart than that are joined only partly; the counts show it.
- A sample_id repeated within one cache (a duplicated conversation) starts a new sample.

The join is resumable at any sample: ``state_dict()`` is small JSON (each cache's read position, the samples still
waiting for partners as row positions, the counters), and a join made with that state continues exactly where the
first one was, decoding only the rows it holds again. Every row is located by a `RowRef` (shard, record batch, row).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field

import pyarrow as pa

from fusion_cache.cache.reader import BatchPosition
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import CacheRow
from fusion_cache.errors import ConfigError


@dataclass(frozen=True, order=True)
class RowRef:
    """Where one row sits in its cache: shard, record batch inside the shard, row inside the batch."""

    shard: int
    batch: int
    row: int

    def to_json(self) -> list[int]:
        return [self.shard, self.batch, self.row]

    @classmethod
    def from_json(cls, value) -> RowRef:
        return cls(*(int(v) for v in value))


@dataclass
class _Entry:
    """One row read from one cache: its position, its join keys, and the decoded row (None when not wanted)."""

    ref: RowRef
    sample_id: str
    row_index: int
    row: CacheRow | None


@dataclass
class Sample:
    """One joined sample: per cache, its row (None: the cache lacks it, or it was not decoded) and where it is.

    Attributes:
        ordinal: the sample's position in join order, counted from 0 in every pass.
        rows: [S] decoded rows or None.
        refs: [S] row positions or None (absent).
    """

    ordinal: int
    rows: list[CacheRow | None]
    refs: list[RowRef | None]


@dataclass
class _Pending:
    entries: list[_Entry | None]
    row_index: int
    tick: int  # reads done when the sample was first seen


@dataclass
class JoinCounts:
    """What the join has yielded so far (cumulative over passes)."""

    names: list[str]
    samples: int = 0
    complete: int = 0
    missing: dict[str, int] = field(default_factory=dict)  # cache name -> samples yielded without it
    duplicates: int = 0  # a sample_id seen again in one cache before its sample was yielded

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "complete": self.complete,
            "missing": {n: self.missing.get(n, 0) for n in self.names},
            "duplicates": self.duplicates,
        }

    def load(self, d: dict) -> None:
        self.samples, self.complete, self.duplicates = int(d["samples"]), int(d["complete"]), int(d["duplicates"])
        self.missing = {n: int(v) for n, v in d["missing"].items()}


class _Cursor:
    """Reads one cache row by row from a position, decoding one record batch at a time.

    ``wanted(ordinal)`` (optional) says which rows, by their position in cache order, need decoding; the others
    are read for their join keys only (a single-teacher rank decodes only its own rows).
    """

    def __init__(self, reader: CacheReader, start: RowRef, ordinal: int, wanted: Callable[[int], bool] | None):
        self.reader = reader
        self.wanted = wanted
        self.ordinal = ordinal - start.row  # ordinal of row 0 of the first batch
        self._batches = reader.iter_batches(BatchPosition(start.shard, start.batch))
        self._entries: list[_Entry] = []
        self._load()
        self._next = start.row

    def _load(self) -> None:
        self._entries, self._next = [], 0
        for pos, batch in self._batches:
            if batch.num_rows == 0:
                continue
            name = self.reader.manifest.shards[pos.shard].path
            ids = batch.column("sample_id").to_pylist()
            index = batch.column("row_index").to_numpy()
            keep = [i for i in range(batch.num_rows) if self.wanted is None or self.wanted(self.ordinal + i)]
            rows = decode_rows(self.reader, batch, keep, name, pos.batch) if keep else []
            decoded: list[CacheRow | None] = [None] * batch.num_rows
            for i, row in zip(keep, rows, strict=True):
                decoded[i] = row
            self._entries = [
                _Entry(RowRef(pos.shard, pos.batch, i), ids[i], int(index[i]), row) for i, row in enumerate(decoded)
            ]
            return

    def next(self) -> _Entry | None:
        if self._next >= len(self._entries):
            if not self._entries:
                return None
            self.ordinal += len(self._entries)
            self._load()
            if not self._entries:
                return None
        entry = self._entries[self._next]
        self._next += 1
        return entry


def decode_rows(
    reader: CacheReader, batch: pa.RecordBatch, rows: list[int], shard: str, batch_index: int | None = None
) -> list[CacheRow]:
    """Decode only ``rows`` of a record batch (all of it when that is every row: no copy); errors name the shard,
    the record batch ``batch_index`` and the row."""
    if len(rows) == batch.num_rows:
        return reader.decode_batch(batch, shard, batch_index=batch_index)
    taken = batch.take(pa.array(rows, type=pa.int64()))
    return reader.decode_batch(taken, shard, batch_index=batch_index, row_numbers=rows)


def fetch_rows(reader: CacheReader, refs: list[RowRef]) -> dict[RowRef, CacheRow]:
    """Decode the rows at ``refs`` of one cache, reading each record batch that holds any of them once."""
    wanted: dict[tuple[int, int], list[int]] = {}
    for r in refs:
        wanted.setdefault((r.shard, r.batch), []).append(r.row)
    if not wanted:
        return {}
    last = max(wanted)
    found: dict[RowRef, CacheRow] = {}
    for pos, batch in reader.iter_batches(BatchPosition(*min(wanted))):
        key = (pos.shard, pos.batch)
        if key in wanted:
            rows = sorted(set(wanted[key]))
            if rows[-1] >= batch.num_rows:
                break
            name = reader.manifest.shards[pos.shard].path
            for i, row in zip(rows, decode_rows(reader, batch, rows, name, pos.batch), strict=True):
                found[RowRef(*key, i)] = row
        if key >= last:
            break
    missing = [r for r in refs if r not in found]
    if missing:
        raise ConfigError(f"stream state: row {missing[0].to_json()} is not in {reader.path}")
    return found


class CacheJoin:
    """One pass over ``readers`` joined on sample_id (see the module docstring); an iterator of `Sample`.

    Args:
        readers: one open cache per teacher.
        names: one label per cache, for the counts (default: the manifests' teacher names, made unique).
        window: reads a sample may wait for its partners when the merge join does not apply.
        counts: where to count (shared by the passes of a stream); a new one by default.
        wanted: with one cache, which samples (by ordinal) to decode; the others come with ``rows == [None]``.
        state: a `state_dict` to continue from.
    """

    def __init__(
        self,
        readers: list[CacheReader],
        names: list[str] | None = None,
        *,
        window: int = 1024,
        counts: JoinCounts | None = None,
        wanted: Callable[[int], bool] | None = None,
        state: dict | None = None,
    ):
        if not readers:
            raise ValueError("CacheJoin needs at least one cache")
        if wanted is not None and len(readers) != 1:
            raise ValueError("CacheJoin: `wanted` applies to a single cache (a join must decode every row)")
        self.readers = readers
        self.names = names or unique_names([r.manifest.teacher.name for r in readers])
        self.window = window
        self.same_input = len({r.manifest.dataset.hash for r in readers}) == 1
        self.counts = counts if counts is not None else JoinCounts(list(self.names))
        n = len(readers)
        self._last = [-1] * n  # row_index of the last row read from each cache
        self._ordered = [self.same_input] * n  # still in row_index order (merge join applies)
        self._pending: dict[str, _Pending] = {}
        self._queue: deque[Sample] = deque()  # samples decided but not yet returned
        self._reads = 0
        self._turn = 0
        self._ordinal = 0
        starts: list[RowRef | None] = [RowRef(0, 0, 0)] * n
        cursor_ordinal = 0
        if state is not None:
            starts = self._restore(state)
            cursor_ordinal = self._ordinal
        self._cursors = [
            None if s is None else _Cursor(r, s, cursor_ordinal, wanted) for r, s in zip(readers, starts, strict=True)
        ]
        self._heads = [c.next() if c is not None else None for c in self._cursors]

    def __iter__(self) -> Iterator[Sample]:
        return self

    def __next__(self) -> Sample:
        while not self._queue:
            if not self._step():
                raise StopIteration
        return self._queue.popleft()

    # ------------------------------------------------------------------ the merge / windowed join
    def _step(self) -> bool:
        """Read one row (or flush what is left); False once nothing is left at all."""
        n = len(self.readers)
        live = [i for i in range(n) if self._heads[i] is not None]
        if not live:
            if not self._pending:
                return False
            for p in list(self._pending.values()):
                self._emit(p)
            self._pending.clear()
            return True
        if all(self._ordered[i] for i in live):
            i = min(live, key=lambda j: self._heads[j].row_index)  # the reader furthest behind
        else:
            i = live[self._turn % len(live)]
            self._turn += 1
        entry = self._heads[i]
        self._heads[i] = self._cursors[i].next()
        self._reads += 1
        if entry.row_index < self._last[i]:
            self._ordered[i] = False
        self._last[i] = entry.row_index
        p = self._pending.get(entry.sample_id)
        if p is not None and p.entries[i] is not None:
            self.counts.duplicates += 1
            self._emit(self._pending.pop(entry.sample_id))
            p = None
        if p is None:
            p = self._pending[entry.sample_id] = _Pending([None] * n, entry.row_index, self._reads)
        p.entries[i] = entry
        if all(e is not None for e in p.entries):
            self._emit(self._pending.pop(entry.sample_id))
        # the oldest samples that can no longer be completed go out, in the order they were first seen
        while self._pending:
            sid, first = next(iter(self._pending.items()))
            if not self._hopeless(first):
                break
            self._emit(self._pending.pop(sid))
        return True

    def _hopeless(self, p: _Pending) -> bool:
        """Whether every cache ``p`` still lacks is exhausted or (merge join) already past it."""
        if self._reads - p.tick > self.window:
            return True
        return all(
            self._heads[j] is None or (self._ordered[j] and self._heads[j].row_index > p.row_index)
            for j, e in enumerate(p.entries)
            if e is None
        )

    def _emit(self, p: _Pending) -> None:
        self.counts.samples += 1
        absent = [self.names[j] for j, e in enumerate(p.entries) if e is None]
        if not absent:
            self.counts.complete += 1
        for name in absent:
            self.counts.missing[name] = self.counts.missing.get(name, 0) + 1
        rows = [e.row if e is not None else None for e in p.entries]
        refs = [e.ref if e is not None else None for e in p.entries]
        self._queue.append(Sample(self._ordinal, rows, refs))
        self._ordinal += 1

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """JSON-serializable position after the last sample returned (see the module docstring)."""

        def refs(entries):
            return [e.ref.to_json() if e is not None else None for e in entries]

        return {
            "heads": refs(self._heads),
            "last": list(self._last),
            "ordered": list(self._ordered),
            "pending": [[sid, p.row_index, p.tick, refs(p.entries)] for sid, p in self._pending.items()],
            "queue": [[s.ordinal, [r.to_json() if r is not None else None for r in s.refs]] for s in self._queue],
            "reads": self._reads,
            "turn": self._turn,
            "ordinal": self._ordinal,
        }

    def _restore(self, state: dict) -> list[RowRef | None]:
        """Load ``state``; returns where each cache's cursor starts (its saved head; None when exhausted)."""
        n = len(self.readers)
        self._last = [int(v) for v in state["last"]]
        self._ordered = [bool(v) for v in state["ordered"]]
        self._reads, self._turn, self._ordinal = int(state["reads"]), int(state["turn"]), int(state["ordinal"])
        if len(self._last) != n or len(state["heads"]) != n:
            raise ConfigError(f"stream state: saved for {len(self._last)} caches, the run has {n}")
        heads = [RowRef.from_json(h) if h is not None else None for h in state["heads"]]
        pending = [(sid, int(ri), int(tick), _refs(r)) for sid, ri, tick, r in state["pending"]]
        queue = [(int(o), _refs(r)) for o, r in state["queue"]]
        needed: list[list[RowRef]] = [[] for _ in range(n)]
        for refs in [r for *_, r in pending] + [r for _, r in queue]:
            for i, ref in enumerate(refs):
                if ref is not None:
                    needed[i].append(ref)
        rows = [fetch_rows(reader, needed[i]) for i, reader in enumerate(self.readers)]

        def entries(refs):
            return [
                _Entry(ref, rows[i][ref].sample_id, rows[i][ref].row_index, rows[i][ref]) if ref is not None else None
                for i, ref in enumerate(refs)
            ]

        self._pending = {sid: _Pending(entries(r), ri, tick) for sid, ri, tick, r in pending}
        self._queue = deque(
            Sample(o, [e.row if e is not None else None for e in entries(r)], list(r)) for o, r in queue
        )
        return heads


def _refs(values) -> list[RowRef | None]:
    return [RowRef.from_json(v) if v is not None else None for v in values]


def unique_names(names: list[str]) -> list[str]:
    """Short labels for teachers: a model directory's name instead of its path, repeats numbered (``smollm2-135m``,
    ``smollm2-135m#2``), so metrics keys stay short and distinct."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        if name.startswith(("/", ".", "~")):
            name = os.path.basename(os.path.normpath(name)) or name
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out
