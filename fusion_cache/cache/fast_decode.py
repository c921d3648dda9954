"""Compiled decoders of the `full` layout 3 ids and of the grouped value codes (layouts 2 and 3), through numba.

The numpy decoders in fusion_cache/cache/codecs/ (ids.py, quantize.py) are the reference: every numpy pass reads
and writes the whole chunk, so at K=128 a token costs ~20 passes over 256 symbols and the decode stalls near 0.9M
answer tokens/s on one core. Here one loop per token does each step once per symbol, with the same arithmetic
(float32, the same lookup tables), so the output is bit for bit the reference's
(tests/fusion_cache/cache/test_fast_decode.py).

numba is optional (installed with the vLLM CPU requirements, or ``pip install numba``) and imported lazily; without
it, or with ``FUSION_CACHE_DECODER=numpy``, the numpy decoders run. The kernels are compiled on first use (about a
second, cached on disk next to this file when the directory is writable).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

_KERNELS: dict | None = None
_TRIED = False


def decoder_name() -> str:
    """ "numba" when the compiled decoders are in use, else "numpy" (``FUSION_CACHE_DECODER`` = auto|numpy|numba)."""
    return "numba" if kernels() is not None else "numpy"


@contextlib.contextmanager
def use_decoder(name: str):
    """``FUSION_CACHE_DECODER=name`` (auto|numpy|numba) inside the block, restored after (benchmarks and tests that
    compare the decoders; a context manager rather than monkeypatch, which hypothesis tests cannot take)."""
    old = os.environ.get("FUSION_CACHE_DECODER")
    os.environ["FUSION_CACHE_DECODER"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["FUSION_CACHE_DECODER"]
        else:
            os.environ["FUSION_CACHE_DECODER"] = old


def kernels() -> dict | None:
    """The compiled kernels, or None when numba is missing or ``FUSION_CACHE_DECODER=numpy``."""
    global _KERNELS, _TRIED
    choice = os.environ.get("FUSION_CACHE_DECODER", "auto").lower()
    if choice not in ("auto", "numpy", "numba"):
        raise ValueError(f"FUSION_CACHE_DECODER must be auto, numpy or numba, got {choice!r}")
    if choice == "numpy":
        return None
    if not _TRIED:
        _TRIED = True
        try:
            _KERNELS = _compile()
        except ImportError:
            _KERNELS = None
    if _KERNELS is None and choice == "numba":
        raise ImportError("FUSION_CACHE_DECODER=numba needs numba: pip install numba")
    return _KERNELS


def _keep_llvmlite_scannable() -> None:
    """Let vLLM start after numba has been imported in the same process.

    vLLM 0.32 on CPU rebinds its Triton kernels by scanning the globals of every module in ``sys.modules`` and calling
    ``vars(value).get("kernel")`` on each value that has a ``__dict__``. llvmlite's ``ffi.lib`` (a ``__slots__``
    object with a ``__getattr__`` that wraps C symbols) answers ``__dict__`` with a wrapped symbol, so the scan raised
    AttributeError and every vLLM engine started after a decode in that process failed (seen in CI: the demo, the
    vLLM engine tests). An empty dict under ``__dict__`` in its symbol table answers the scan with nothing to rebind.
    """
    try:
        from llvmlite.binding import ffi
    except ImportError:
        return
    fntab = getattr(ffi.lib, "_fntab", None)
    if isinstance(fntab, dict):
        fntab.setdefault("__dict__", {})


def _compile() -> dict:
    import numba

    _keep_llvmlite_scannable()

    cache = os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)
    jit = numba.njit(cache=cache, nogil=True, boundscheck=False)

    @jit
    def rank_planes(p0, p1, p2, nbytes, starts, ends, n, table, use_table, out):  # pragma: no cover - compiled
        """out[t, a + j] = table[rank] (or the rank) for each column group [a, b) = (starts[g], ends[g]), the rank
        from its byte planes p0 (least significant), p1, p2: tuples of flat uint8 [n * (b - a)] arrays per group."""
        for t in range(n):  # token-major: each output row is written once, front to back
            for g in range(starts.shape[0]):
                a = starts[g]
                w = ends[g] - a
                b0 = p0[g]
                b1 = p1[g]
                b2 = p2[g]
                base = t * w
                for j in range(w):
                    r = np.int64(b0[base + j])
                    if nbytes > 1:
                        r |= np.int64(b1[base + j]) << 8
                    if nbytes > 2:
                        r |= np.int64(b2[base + j]) << 16
                    out[t, a + j] = table[r] if use_table else r

    @jit
    def value_groups(codes, starts, ends, vmax, span, n, k, m, table, out):  # pragma: no cover - compiled
        """out[t] = vmax + (-span) * table[Q] with Q the running sums of the codes (Q_0 = 0, Q_{K-1} = m); returns
        the first answer position whose codes sum past m or whose max/span is not finite or negative, else -1."""
        n_groups = starts.shape[0]
        gm = table[m]
        g0 = table[0]
        for t in range(n):
            vm = vmax[t]
            ns = -span[t]
            if not (np.isfinite(vm) and np.isfinite(ns)) or ns > 0:
                return t
            q = 0
            out[t, 0] = g0 * ns + vm
            for g in range(n_groups):
                a = starts[g]
                w = ends[g] - a
                c = codes[g]
                base = t * w
                for j in range(w):
                    q += np.int64(c[base + j])
                    if q > m:
                        return t
                    out[t, 1 + a + j] = table[q] * ns + vm
            out[t, k - 1] = gm * ns + vm
        return -1

    @jit
    def topk_rows(values, ids, use_ids, vocab, words, exact, logprobs, tols):  # pragma: no cover
        """The per-value content checks of a decoded top-K block, one pass per answer position: (position, verdict,
        column) of the first failure, or (-1, 0, 0); the same verdicts as `cache.validate.topk_rows_numpy` without
        ``logsumexp <= 0`` (one vectorised numpy pass over the block, `cache.validate.first_lse_over`, merged by the
        caller). ``words`` is a zeroed bitset over the ids (uint64 [ceil(V / 64)]), left zeroed; ``tols`` = (fixed,
        per span, top-1)."""
        exact_tol = tols[2]
        n, k = values.shape
        one = np.uint64(1)
        for t in range(n):
            v0 = values[t, 0]
            if exact:  # every value finite first, then sorted: the numpy reference's order of verdicts
                for j in range(k):
                    if not np.isfinite(values[t, j]):
                        return t, 1, j
                for j in range(1, k):
                    if values[t, j] > values[t, j - 1]:
                        return t, 2, j
            else:  # quantized: sorted and finite by construction; the ends are checked
                if not np.isfinite(v0):
                    return t, 1, 0
                if not np.isfinite(values[t, k - 1]):
                    return t, 1, k - 1
            if logprobs and v0 > exact_tol:
                return t, 3, 0
            if use_ids:
                for j in range(k):
                    x = ids[t, j]
                    if x < 0 or x >= vocab:
                        return t, 5, j
                for j in range(k):
                    x = np.uint64(ids[t, j])
                    w = x >> np.uint64(6)
                    b = one << (x & np.uint64(63))
                    if words[w] & b:
                        for i in range(j):
                            words[np.uint64(ids[t, i]) >> np.uint64(6)] = 0
                        return t, 6, j
                    words[w] |= b
                for j in range(k):
                    words[np.uint64(ids[t, j]) >> np.uint64(6)] = 0
        return -1, 0, 0

    return {"rank_planes": rank_planes, "value_groups": value_groups, "topk_rows": topk_rows}


_BITSETS: dict[int, np.ndarray] = {}


def id_bitset(size: int) -> np.ndarray:
    """A zeroed bitset over ids [0, size) for the compiled distinctness check (kept, and left zeroed, between
    calls)."""
    words = (size + 63) // 64
    if words not in _BITSETS:
        if len(_BITSETS) > 8:
            _BITSETS.clear()
        _BITSETS[words] = np.zeros(words, np.uint64)
    return _BITSETS[words]


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only flat view: numba compiles one kernel per array type, and arrays from Arrow buffers are read-only,
    so every input is made so (a tuple of planes must hold one type)."""
    v = a.reshape(-1)
    if v.flags.writeable:
        v = v.view()
        v.flags.writeable = False
    return v


def group_bounds(groups: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) int64 arrays of column groups."""
    return np.array([a for a, _ in groups], np.int64), np.array([b for _, b in groups], np.int64)
