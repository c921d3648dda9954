"""Fixtures of the cache tests: the decoders to run (the numpy reference, and the compiled ones where numba is)."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(
    scope="module",  # module scope: hypothesis tests cannot take function-scoped fixtures
    params=[
        "numpy",
        pytest.param("numba", marks=pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="no numba")),
    ],
)
def decoder(request) -> str:
    """A ``FUSION_CACHE_DECODER`` value: the numpy decoders are the reference, the compiled ones
    (fusion_cache/cache/fast_decode.py) must match them bit for bit."""
    return request.param
