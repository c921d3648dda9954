"""Joining teacher caches on sample_id while streaming: merge join for one input, a bounded window otherwise."""

from __future__ import annotations

from fusion_cache.cache.reader import CacheReader
from fusion_cache.train.join import CacheJoin
from fusion_cache.train.join import unique_names


def _ids(cache):
    return [r.sample_id for r in CacheReader(cache).iter_rows()]


def _check(groups, caches):
    """Each group holds one sample's rows; every row of every cache is yielded exactly once."""
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
    assert len(groups) == 8 and [g[0].row_index for g in groups] == list(range(8))  # cache order kept
    assert [g[1] is not None for g in groups] == [True] * 5 + [False] * 3
    assert join.counts.as_dict() == {"samples": 8, "complete": 5, "missing": {"a": 0, "b": 3}, "duplicates": 0}
    assert list(join) and join.counts.samples == 16  # a second pass; counts accumulate


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
    assert [g[0].row_index for g in join] == list(range(5)) and join.counts.complete == 5
    assert join.names == ["tiny-llama"]  # a model directory's name, not its path
    assert unique_names(["x", "/m/x", "smollm2-135m", "x"]) == ["x", "x#2", "smollm2-135m", "x#3"]
