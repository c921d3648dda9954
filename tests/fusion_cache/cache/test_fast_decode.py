"""The decoder switch of fusion_cache/cache/fast_decode.py (the numba kernels' results are checked against the numpy
reference in test_codecs.py, under both decoders)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from fusion_cache.cache import fast_decode

HAS_NUMBA = importlib.util.find_spec("numba") is not None


def test_the_switch_picks_numpy_on_request_and_refuses_unknown_names(monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DECODER", "numpy")
    assert fast_decode.kernels() is None and fast_decode.decoder_name() == "numpy"
    monkeypatch.setenv("FUSION_CACHE_DECODER", "cython")
    with pytest.raises(ValueError, match="FUSION_CACHE_DECODER must be auto, numpy or numba, got 'cython'"):
        fast_decode.kernels()


def test_auto_falls_back_to_numpy_without_numba_and_forcing_it_says_how_to_install(monkeypatch):
    def no_numba():
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(fast_decode, "_compile", no_numba)
    monkeypatch.setattr(fast_decode, "_TRIED", False)
    monkeypatch.setattr(fast_decode, "_KERNELS", None)
    monkeypatch.setenv("FUSION_CACHE_DECODER", "auto")
    assert fast_decode.kernels() is None and fast_decode.decoder_name() == "numpy"
    monkeypatch.setenv("FUSION_CACHE_DECODER", "numba")
    with pytest.raises(ImportError, match="pip install numba"):
        fast_decode.kernels()


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_auto_uses_numba_when_installed(monkeypatch):
    monkeypatch.setenv("FUSION_CACHE_DECODER", "auto")
    assert fast_decode.decoder_name() == "numba"


def test_readonly_views_share_memory_and_flatten():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    v = fast_decode.readonly(a)
    assert v.shape == (6,) and not v.flags.writeable and np.shares_memory(v, a) and a.flags.writeable
    starts, ends = fast_decode.group_bounds([(0, 1), (1, 3)])
    assert starts.tolist() == [0, 1] and ends.tolist() == [1, 3] and starts.dtype == np.int64


def test_use_decoder_sets_and_restores_the_switch(monkeypatch):
    monkeypatch.delenv("FUSION_CACHE_DECODER", raising=False)
    with fast_decode.use_decoder("numpy"):
        assert fast_decode.decoder_name() == "numpy"
    assert "FUSION_CACHE_DECODER" not in os.environ
    monkeypatch.setenv("FUSION_CACHE_DECODER", "auto")
    with fast_decode.use_decoder("numpy"):
        pass
    assert os.environ["FUSION_CACHE_DECODER"] == "auto"


@pytest.mark.skipif(not HAS_NUMBA, reason="numba is not installed")
def test_after_numba_every_module_global_survives_vllms_kernel_rebinding_scan(monkeypatch):
    """vLLM (CPU) scans every module's globals with vars(value).get("kernel") when an engine starts; llvmlite's
    ffi.lib broke that scan once numba was imported (fast_decode._keep_llvmlite_scannable)."""
    import sys

    monkeypatch.setenv("FUSION_CACHE_DECODER", "numba")
    assert fast_decode.kernels() is not None
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        for value in list((namespace or {}).values()):
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")  # what vLLM's triton_utils.dispatcher._rebind_kernels does
