"""Joining teacher caches on sample_id while streaming: merge join for one input, a bounded window otherwise."""

from __future__ import annotations

import json

import pytest

from fusion_cache.cache.reader import CacheReader
from fusion_cache.train.join import CacheJoin
from fusion_cache.train.join import unique_names


def _ids(cache):
    return [r.sample_id for r in CacheReader(cache).iter_rows()]


def _check(samples, caches):
    """Each group holds one sample's rows; every row of every cache is yielded exactly once."""
    groups = [s.rows for s in samples]
    assert [s.ordinal for s in samples] == list(range(len(samples)))
    for rows in groups:
        assert len({r.sample_id for r in rows if r is not None}) == 1
    for i, cache in enumerate(caches):
        assert sorted(r[i].sample_id for r in groups if r[i] is not None) == sorted(_ids(cache))


def test_same_input_is_merge_joined_and_missing_rows_are_counted(multi_caches):
    a, b = multi_caches["a"], multi_caches["b"]
    join = CacheJoin([CacheReader(a), CacheReader(b)], ["a", "b"], window=1)  # the window never matters here
    assert join.same_input
    groups = list(join)
    _check(groups, [a, b])
    groups = [s.rows for s in groups]
    assert len(groups) == 8 and [g[0].row_index for g in groups] == list(range(8))  # cache order kept
    assert [g[1] is not None for g in groups] == [True] * 5 + [False] * 3
    assert join.counts.as_dict() == {"samples": 8, "complete": 5, "missing": {"a": 0, "b": 3}, "duplicates": 0}
    again = CacheJoin([CacheReader(a), CacheReader(b)], ["a", "b"], counts=join.counts)  # a second pass
    assert list(again) and join.counts.samples == 16  # counts shared by the passes accumulate


def test_other_input_is_window_joined(multi_caches):
    a, c = multi_caches["a"], multi_caches["c"]
    join = CacheJoin([CacheReader(a), CacheReader(c)], ["a", "c"], window=64)
    assert not join.same_input
    groups = list(join)
    _check(groups, [a, c])
    assert join.counts.as_dict() == {"samples": 8, "complete": 7, "missing": {"a": 0, "c": 1}, "duplicates": 0}
    # a window too small for c's reversed order leaves samples unjoined, but never loses or repeats a row
    small = CacheJoin([CacheReader(a), CacheReader(c)], ["a", "c"], window=1)
    groups = list(small)
    _check(groups, [a, c])
    assert small.counts.complete < 7 and small.counts.samples > 8


def test_one_cache_and_names(multi_caches):
    join = CacheJoin([CacheReader(multi_caches["b"])])
    assert [s.rows[0].row_index for s in join] == list(range(5)) and join.counts.complete == 5
    assert join.names == ["tiny-llama"]  # a model directory's name, not its path
    assert unique_names(["x", "/m/x", "smollm2-135m", "x"]) == ["x", "x#2", "smollm2-135m", "x#3"]


def _keys(samples):
    return [(s.ordinal, [None if r is None else (r.sample_id, r.row_index) for r in s.rows]) for s in samples]


@pytest.mark.parametrize(("pair", "window"), [(("a", "b"), 1024), (("a", "c"), 64), (("a", "c"), 1), (("c",), 8)])
def test_the_join_resumes_exactly_after_every_sample(multi_caches, pair, window):
    """A state taken after any sample (saved as JSON) continues with exactly the remaining samples and counts."""

    def join(state=None):
        return CacheJoin([CacheReader(multi_caches[n]) for n in pair], list(pair), window=window, state=state)

    full = list(join())
    ref = join()
    list(ref)
    for cut in range(len(full) + 1):
        first = join()
        head = [next(first) for _ in range(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        resumed = join(state)
        resumed.counts.load(first.counts.as_dict())  # the stream saves the counts beside the join's state
        assert _keys(head + list(resumed)) == _keys(full), cut
        assert resumed.counts.as_dict() == ref.counts.as_dict()


def test_one_cache_decodes_only_the_wanted_rows(multi_caches):
    samples = list(CacheJoin([CacheReader(multi_caches["a"])], wanted=lambda o: o % 2 == 1))
    assert [s.rows[0] is not None for s in samples] == [False, True] * 4
    assert all(s.refs[0] is not None for s in samples)
