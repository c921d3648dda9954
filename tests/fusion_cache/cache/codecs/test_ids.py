"""Token ids of the full codec (fusion_cache/cache/codecs/ids.py): byte planes, the id order, the rank decoder."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_cache.cache.codecs.base import id_groups
from fusion_cache.cache.codecs.ids import decode_rank_planes
from fusion_cache.cache.codecs.ids import id_order_metadata
from fusion_cache.cache.codecs.ids import ids_to_ranks
from fusion_cache.cache.codecs.ids import make_id_order
from fusion_cache.cache.codecs.ids import pack_ids
from fusion_cache.cache.codecs.ids import parse_id_order
from fusion_cache.cache.codecs.ids import rank_table
from fusion_cache.cache.codecs.ids import ranks_to_ids


@pytest.mark.parametrize("id_bytes", [1, 2, 3])
def test_rank_planes_decode_in_chunks(id_bytes, decoder, monkeypatch):
    """decode_rank_planes against the ranks, for every chunking (one row, a few rows, all rows) and K."""
    monkeypatch.setenv("FUSION_CACHE_DECODER", decoder)
    rng = np.random.default_rng(id_bytes)
    top = 1 << (8 * id_bytes)
    for k, n in ((1, 5), (7, 40), (64, 300), (128, 70)):
        ranks = np.minimum((rng.pareto(0.5, (n, k)) * 20).astype(np.int64), top - 1)
        ranks[0, 0] = top - 1
        planes = [[np.ascontiguousarray(p[:, a:b]).ravel() for a, b in id_groups(k)] for p in pack_ids(ranks, id_bytes)]
        table = rng.permutation(min(top, 1 << 16)).astype(np.int32) if id_bytes <= 2 else None
        for chunk in (1, 3 * k, 1 << 16):
            np.testing.assert_array_equal(decode_rank_planes(planes, n, k, id_bytes, chunk=chunk), ranks)
            if table is not None:
                got = decode_rank_planes(planes, n, k, id_bytes, table, chunk=chunk)
                np.testing.assert_array_equal(got, table[ranks])
    assert decode_rank_planes([[np.zeros(0, np.uint8)]] * id_bytes, 0, 1, id_bytes).shape == (0, 1)


def test_the_id_order_round_trips_through_its_metadata_and_ranks_are_a_bijection():
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, 4000) % 5000  # frequent small ids, a long tail
    order = make_id_order(ids)
    assert np.unique(order).size == order.size == np.unique(ids).size
    np.testing.assert_array_equal(parse_id_order(id_order_metadata(order), 2, "s"), order)
    everything = np.arange(1 << 16)
    ranks = ids_to_ranks(everything, order)
    np.testing.assert_array_equal(np.sort(ranks), everything)  # every id its own rank
    np.testing.assert_array_equal(ranks[order], np.arange(order.size))  # the order's ids come first
    np.testing.assert_array_equal(ranks_to_ids(ranks, order), everything)
    np.testing.assert_array_equal(rank_table(order, 1 << 16)[ranks], everything)
