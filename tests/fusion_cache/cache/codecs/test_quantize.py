"""Value quantization (fusion_cache/cache/codecs/quantize.py): the chunked and compiled decoders of the grouped codes
against the whole-array reference, and corrupt codes named."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_cache.cache.codecs.base import code_groups
from fusion_cache.cache.codecs.quantize import code_sums
from fusion_cache.cache.codecs.quantize import decode_value_groups
from fusion_cache.cache.codecs.quantize import dequantize_values
from fusion_cache.cache.codecs.quantize import quantize_values
from fusion_cache.errors import ShardFormatError


@pytest.mark.parametrize("k,bits", [(2, 6), (3, 6), (17, 5), (64, 6), (130, 8), (40, 12)])
def test_value_groups_decode_like_the_reference(k, bits, decoder, monkeypatch):
    """decode_value_groups (chunked) against code_sums + dequantize_values (whole arrays), bit for bit."""
    monkeypatch.setenv("FUSION_CACHE_DECODER", decoder)
    rng = np.random.default_rng(k)
    n = 300
    values = -np.sort(rng.exponential(3.0, (n, k)), axis=1).astype(np.float32)
    values[5] = -1.0  # a row of equal values: span 0
    vmax, span, codes = quantize_values(values, bits, np.float16, "log")
    groups = code_groups(k)
    cols = [np.ascontiguousarray(codes[:, a:b]) for a, b in groups]
    want = dequantize_values(vmax, span, None, bits, "s", "log", code_sums(cols, bits, groups, n))
    for chunk in (1, 100, 1 << 16):  # one row, a few rows and all rows per chunk
        got = decode_value_groups(cols, vmax, span, k, bits, "s", chunk=chunk)
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))  # bit for bit, -0.0 included


def test_corrupt_layout2_value_codes_are_named(decoder, monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DECODER", decoder)
    k, n, bits = 16, 50, 6
    cols = [np.zeros((n, b - a), np.uint8) for a, b in code_groups(k)]
    vmax, span = np.zeros(n, np.float16), np.ones(n, np.float16)
    cols[-1][37, 0] = 64  # the deltas of position 37 sum past 63
    with pytest.raises(ShardFormatError, match="shard-v: answer position 37: corrupt value codes \\(sum 64 > 63"):
        decode_value_groups(cols, vmax, span, k, bits, "shard-v", chunk=3 * k)
    cols[-1][37, 0] = 0
    span[41] = np.inf
    with pytest.raises(ShardFormatError, match="shard-v: answer position 41: corrupt value codes .*span inf"):
        decode_value_groups(cols, vmax, span, k, bits, "shard-v", chunk=3 * k)
    span[41] = -1.0
    with pytest.raises(ShardFormatError, match="shard-v: answer position 41: corrupt value codes .*span -1.0"):
        decode_value_groups(cols, vmax, span, k, bits, "shard-v", chunk=3 * k)
    span[41], vmax[3] = 1.0, np.nan
    with pytest.raises(ShardFormatError, match="shard-v: answer position 3: corrupt value codes .*max nan"):
        decode_value_groups(cols, vmax, span, k, bits, "shard-v", chunk=3 * k)
