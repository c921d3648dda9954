"""Join the caches of several teachers on ``sample_id`` while streaming them; memory stays bounded.

    join = CacheJoin([CacheReader("cache/a"), CacheReader("cache/b")])
    for rows in join:          # one list per sample: rows[i] is cache i's CacheRow, or None if cache i lacks it
        ...
    join.counts                # {"samples": .., "complete": .., "missing": {"a": .., "b": ..}, ...}

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
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field

from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import CacheRow


@dataclass
class _Pending:
    rows: list[CacheRow | None]
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


class CacheJoin:
    """Iterate lists of rows, one per sample, joined over ``readers`` on sample_id (see the module docstring).

    Args:
        readers: one open cache per teacher.
        names: one label per cache, for the counts (default: the manifests' teacher names, made unique).
        window: reads a sample may wait for its partners when the merge join does not apply.
    """

    def __init__(self, readers: list[CacheReader], names: list[str] | None = None, *, window: int = 1024):
        if not readers:
            raise ValueError("CacheJoin needs at least one cache")
        self.readers = readers
        self.names = names or unique_names([r.manifest.teacher.name for r in readers])
        self.window = window
        self.same_input = len({r.manifest.dataset.hash for r in readers}) == 1
        self.counts = JoinCounts(list(self.names))

    def __iter__(self) -> Iterator[list[CacheRow | None]]:
        n = len(self.readers)
        iters = [r.iter_rows() for r in self.readers]
        heads: list[CacheRow | None] = [next(it, None) for it in iters]
        last = [-1] * n  # row_index of the last row read from each cache
        ordered = [self.same_input] * n  # still in row_index order (merge join applies)
        pending: dict[str, _Pending] = {}
        reads = 0
        turn = 0
        while True:
            live = [i for i in range(n) if heads[i] is not None]
            if not live:
                break
            if all(ordered[i] for i in live):
                i = min(live, key=lambda j: heads[j].row_index)  # the reader furthest behind
            else:
                i = live[turn % len(live)]
                turn += 1
            row = heads[i]
            heads[i] = next(iters[i], None)
            reads += 1
            if row.row_index < last[i]:
                ordered[i] = False
            last[i] = row.row_index
            entry = pending.get(row.sample_id)
            if entry is not None and entry.rows[i] is not None:
                self.counts.duplicates += 1
                yield self._emit(pending.pop(row.sample_id))
                entry = None
            if entry is None:
                entry = pending[row.sample_id] = _Pending([None] * n, row.row_index, reads)
            entry.rows[i] = row
            if all(r is not None for r in entry.rows):
                yield self._emit(pending.pop(row.sample_id))
            # the oldest samples that can no longer be completed go out, in the order they were first seen
            while pending:
                sid, first = next(iter(pending.items()))
                if not self._hopeless(first, heads, ordered, reads):
                    break
                yield self._emit(pending.pop(sid))
        for entry in pending.values():
            yield self._emit(entry)

    def _hopeless(self, entry: _Pending, heads, ordered, reads: int) -> bool:
        """Whether every cache ``entry`` still lacks is exhausted or (merge join) already past it."""
        if reads - entry.tick > self.window:
            return True
        return all(
            heads[j] is None or (ordered[j] and heads[j].row_index > entry.row_index)
            for j, r in enumerate(entry.rows)
            if r is None
        )

    def _emit(self, entry: _Pending) -> list[CacheRow | None]:
        self.counts.samples += 1
        absent = [self.names[j] for j, r in enumerate(entry.rows) if r is None]
        if not absent:
            self.counts.complete += 1
        for name in absent:
            self.counts.missing[name] = self.counts.missing.get(name, 0) + 1
        return entry.rows


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
