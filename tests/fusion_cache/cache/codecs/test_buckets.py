"""Full layout 2's id buckets (fusion_cache/cache/codecs/buckets.py): round trips across chunks and widths."""

from __future__ import annotations

import numpy as np

from fusion_cache.cache.codecs.base import DECODE_CHUNK
from fusion_cache.cache.codecs.buckets import bucket_tables
from fusion_cache.cache.codecs.buckets import bucket_widths
from fusion_cache.cache.codecs.buckets import decode_bucket_ids
from fusion_cache.cache.codecs.buckets import encode_bucket_ids


def test_bucket_ids_round_trip_across_decode_chunks_and_every_width():
    rng = np.random.default_rng(0)
    for id_bytes in (1, 2, 3):
        top = 1 << (8 * id_bytes)
        counts = rng.integers(0, 5000, 60)  # rows of 0..5k ids, ~150k in all: past two decode chunks
        counts[3] = 0
        ranks = np.minimum((rng.pareto(0.5, counts.sum()) * 20).astype(np.int64), top - 1)
        ranks[:50] = np.arange(top - 50, top)  # the widest offsets
        buckets, offsets, nbytes = encode_bucket_ids(ranks, counts, id_bytes)
        assert counts.sum() > 2 * DECODE_CHUNK and nbytes[3] == 0
        np.testing.assert_array_equal(decode_bucket_ids(buckets, offsets, nbytes, counts, id_bytes, "s"), ranks)
        table = rng.permutation(top).astype(np.int32)
        got = decode_bucket_ids(buckets, offsets, nbytes, counts, id_bytes, "s", table)
        np.testing.assert_array_equal(got, table[ranks])


def test_bucket_widths_match_the_bucket_tables():
    for id_bytes in (1, 2, 3):
        w_tab = bucket_tables(id_bytes)[0]
        np.testing.assert_array_equal(bucket_widths(np.arange(w_tab.size, dtype=np.uint8)), w_tab)


def test_bucket_ids_decode_in_chunks_of_whole_rows():
    """Rows longer than a chunk, many one-id rows, empty rows: every chunking decodes the same ranks."""
    rng = np.random.default_rng(1)
    counts = np.concatenate([rng.integers(0, 4, 200), [3000], rng.integers(1, 3, 50), [0]])
    ranks = np.minimum((rng.pareto(0.6, counts.sum()) * 30).astype(np.int64), (1 << 16) - 1)
    buckets, offsets, nbytes = encode_bucket_ids(ranks, counts, 2)
    table = rng.permutation(1 << 16).astype(np.int32)
    for chunk in (1, 7, 64, 1000, 1 << 16):
        got = decode_bucket_ids(buckets, offsets, nbytes, counts, 2, "s", chunk=chunk)
        np.testing.assert_array_equal(got, ranks)
        got = decode_bucket_ids(buckets, offsets, nbytes, counts, 2, "s", table, chunk=chunk)
        np.testing.assert_array_equal(got, table[ranks])
    empty = np.zeros(0, np.uint8)
    assert decode_bucket_ids(empty, empty, np.zeros(2, np.int64), np.zeros(2, np.int64), 2, "s").size == 0
