"""Merge methods on one tensor: task arithmetic (TA), TIES, DARE, SCE and RSAF.

Every method sees the task vectors of the fine-tuned models for ONE tensor name (RSAF also the base tensor), all
fp32 and the same shape, and returns the merged task vector; the caller adds it to the base:

    tau_s = theta_s - theta_o          # [S, *shape], one row per fine-tuned pivot
    theta = theta_o + method(tau, ...) # the merged tensor

Each method comes twice: ``ties(tau, ...)`` leaves ``tau`` alone (tests check it against its formula on small
tensors), ``ties_(tau, ...)`` overwrites ``tau`` and returns the result as a view of ``tau[0]`` (what
`fusion_cache.merge.run` streams over a whole model, reusing its buffers). Both compute the same numbers.

Why the in-place kernels look the way they do (measured on SmolLM2-135M's 49152 x 576 embedding, docs/merge.md):
- No full-size temporaries: a fresh 100 MB tensor costs more in page faults than the arithmetic on it. The
  elementwise parts run over chunks of ``CHUNK`` elements with a few chunk-size scratch buffers (cache resident).
- Masks are float 0/1 tensors multiplied in, not bool masks: torch's where/masked_fill/bool reductions are 10-20x
  slower than float arithmetic on CPU. ``t * 0`` may give -0.0 where the formula has +0.0; the values are equal.
- The k-th largest magnitude (or variance) is an exact selection, not a sort (`_select`: a sorted sample brackets
  it, one chunked pass counts and collects the values in the bracket, numpy's introselect runs on those).
- TIES, RSAF and SCE share one sign-election step (`_agreeing`).
- Sums over sources accumulate in source order, as ``tau.sum(0)`` does, so results are the same floats as the
  direct formula; SCE's variance reproduces torch's Welford-in-double ``tau.var(0)`` bit for bit, and float64
  scalar sums are added in one fixed grouping of fixed blocks (`block_sums`, `grouped_total`) whatever the pass.

Defaults follow docs/merge.md (FuseChat's configs where the InfiFusion paper gives none).
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numpy as np
import torch

# Skewness of |x| for x ~ N(0, s^2) (the half-normal): sqrt(2) (4 - pi) / (pi - 2)^1.5. RSAF's neutral point.
HALF_NORMAL_SKEW = math.sqrt(2.0) * (4.0 - math.pi) / (math.pi - 2.0) ** 1.5
# Elements per chunk of the elementwise passes: S rows of a chunk plus a few scratch buffers stay in L2/L3.
CHUNK = 1 << 16
# Entries per chunk of a float64 reduction: under torch's parallel grain size (32768), so one thread, fixed order.
REDUCE_CHUNK = 1 << 15
# Entries per chunk of the float64 statistics (a multiple of REDUCE_CHUNK).
STAT_CHUNK = 4 * REDUCE_CHUNK
# Entries per chunk of `skewness`'s float64 passes (any multiple of REDUCE_CHUNK gives the same bits).
SKEW_CHUNK = 2 * STAT_CHUNK
# Below this size `kth_largest` just copies and selects; above it, a sample brackets the answer first.
SMALL = 1 << 18
# `skewness` uses the power sums while mean^2 <= SKEW_CONDITION * variance: their cancellation then costs at most
# ~1e3 float64 ulps of the third moment, an absolute skewness error under ~1e-12; otherwise the two-pass definition.
SKEW_CONDITION = 100.0


def block_sums(v: torch.Tensor) -> list[float]:
    """Per-block sums of a [rows, m] (or 1-D) float64 tensor: for each row, its consecutive ``REDUCE_CHUNK``-entry
    blocks (the last may be shorter) summed by torch on one thread in one fixed order, as a flat list (row by row).

    Rows whose length is a multiple of ``REDUCE_CHUNK`` are reduced in a single torch call.
    """
    if v.numel() == 0:
        return []
    rows = v.reshape(-1, v.shape[-1]) if v.dim() else v.reshape(1, 1)
    m = rows.shape[1]
    full = m - m % REDUCE_CHUNK
    if full == m and m:
        return rows.view(rows.shape[0], -1, REDUCE_CHUNK).sum(2).reshape(-1).tolist()
    out: list[float] = []
    for r in rows:
        if full:
            out += r[:full].view(-1, REDUCE_CHUNK).sum(1).tolist()
        if full < m:
            out.append(float(r[full:].sum()))
    return out


def grouped_total(blocks: list[float], total: float = 0.0) -> float:
    """``total`` plus the block sums of one row (`block_sums`) added as `sum_sq` adds them: in order, the blocks of
    each ``STAT_CHUNK`` span into a partial sum starting at 0.0, the partials into the total. The fused passes
    (SCE's weights, the rate pass) use it to give `sum_sq`'s exact float whatever chunk size they run at."""
    per = STAT_CHUNK // REDUCE_CHUNK
    for i in range(0, len(blocks), per):
        part = 0.0
        for b in blocks[i : i + per]:
            part += b
        total += part
    return total


def ordered_sum(v: torch.Tensor) -> float:
    """The sum of the 1-D float64 tensor ``v``, the same bits whatever torch's thread count.

    ``v`` is cut into blocks of ``REDUCE_CHUNK`` entries (under torch's parallel grain size, so torch reduces each
    block on one thread, in one fixed order; a test pins this) and the block sums are added in order. Callers pass
    chunks that start at multiples of ``REDUCE_CHUNK``, so the blocks do not depend on the chunking either.
    """
    total = 0.0
    for part in block_sums(v.reshape(-1)):
        total += part
    return total


def sum_sq(x: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """``sum((x - minus)^2)`` over all entries, in float64 (`ordered_sum`: thread-count independent).

    A whole-tensor torch reduction would split differently with 1 and 2 threads. Squares of fp32 values are exact
    in float64.
    """
    x = x.reshape(-1)
    minus = None if minus is None else minus.reshape(-1)
    n = x.numel()
    buf = torch.empty(min(STAT_CHUNK, max(n, 1)), dtype=torch.float64)
    sub = None if minus is None else torch.empty_like(buf)
    total = 0.0
    for sl in _chunks(n, STAT_CHUNK):
        b = buf[: sl.stop - sl.start].copy_(x[sl])
        if minus is not None:
            b.sub_(sub[: b.numel()].copy_(minus[sl]))
        total += ordered_sum(b.mul_(b))
    return total


def _chunks(n: int, size: int = CHUNK):
    """Slices covering range(n) in steps of ``size``."""
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _owned(tau: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tau`` for the in-place kernels to overwrite."""
    return tau.clone(memory_format=torch.contiguous_format)


def _rows(tau: torch.Tensor) -> torch.Tensor:
    """tau [S, *shape] as a [S, numel] view (tau must be contiguous: the kernels write through it)."""
    if not tau.is_contiguous():
        raise ValueError("tau must be contiguous")
    return tau.view(tau.shape[0], -1)


# ---------------------------------------------------------------- building blocks
def _bracket(a: np.ndarray, k: int) -> tuple[float, float]:
    """[lo, hi] that holds the k-th largest of 1-D ``a`` with high probability, from a strided sample of ~65536.

    The bounds are the sample's order statistics 4 standard deviations of the sample quantile either side of the
    k-th largest's expected position (-inf / +inf at the ends). On quantized data (task vectors of bf16 models have
    a few thousand distinct values) they are often equal: the sample has already found the answer. The sample is
    sorted, not partitioned: numpy's sort is 2-7x faster than its introselect on duplicate-heavy samples.
    """
    n = a.size
    sample = np.sort(a[:: max(1, n // (1 << 16))])
    m = sample.size
    q = k / n
    center = m * (1.0 - q)  # ascending position of the k-th largest in the sample
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo_i = int(min(max(math.floor(center - margin), 0), m - 1))
    hi_i = int(min(max(math.ceil(center + margin), 0), m - 1))
    lo = -math.inf if lo_i == 0 else float(sample[lo_i])
    hi = math.inf if hi_i == m - 1 else float(sample[hi_i])
    return lo, hi


def _scan(xs: np.ndarray, lo: float, hi: float, band: bool) -> tuple[int, int, np.ndarray | None]:
    """One chunked pass over ``xs``: (#values > hi, #values >= lo, the values in [lo, hi] if ``band``)."""
    above = at_least = 0
    parts = []
    mask, inside = np.empty(min(CHUNK, xs.size), dtype=bool), np.empty(min(CHUNK, xs.size), dtype=bool)
    for sl in _chunks(xs.size):
        c = xs[sl]
        m, b = mask[: c.size], inside[: c.size]
        above += int(np.count_nonzero(np.greater(c, hi, out=b)))
        at_least += int(np.count_nonzero(np.greater_equal(c, lo, out=m)))
        if band:  # lo <= c <= hi: (c >= lo) and not (c > hi); lo <= hi, so xor, without fresh bool arrays
            parts.append(c[np.logical_xor(m, b, out=b)])
    return above, at_least, (np.concatenate(parts) if band else None)


def _select(a: np.ndarray, k: int, reorder: bool) -> float:
    """The k-th largest of the 1-D array ``a`` (1 <= k <= a.size), exactly; `kth_largest` and `kth_largest_`.

    Small arrays: numpy's introselect (``partition``). Large ones: the sample's bracket [lo, hi] (`_bracket`) and one
    chunked pass counting the values above ``hi`` and at least ``lo`` (and, unless lo == hi, collecting the values
    in between: ~1% of them); the answer is in the bracket iff #(> hi) < k <= #(>= lo), and is then ``lo`` (a
    collapsed bracket, common on quantized data) or found by selecting in the collected values. If the bracket
    misses (rare: structured data), a full selection answers, in place when ``reorder`` allows it.
    """
    n = a.size
    if n > SMALL:
        lo, hi = _bracket(a, k)
        above, at_least, band = _scan(a, lo, hi, band=lo != hi)
        if above < k <= at_least:  # the answer is in [lo, hi]
            if lo == hi:
                return lo
            need = k - above  # its rank, from the top, among the values in [lo, hi]
            band.partition(band.size - need)
            return float(band[band.size - need])
    if not reorder:
        a = a.copy()
    a.partition(n - k)
    return float(a[n - k])


def kth_largest_(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the contiguous 1-D fp32/fp64 tensor ``x`` (1 <= k <= numel), exactly.

    May reorder ``x`` in place (numpy's introselect: O(n), about 15x faster than torch.kthvalue on CPU); large
    tensors first try the sampled bracket of `_select`, which reads ``x`` once and leaves it alone. NaN counts as
    the largest value. Returns a 0-d tensor of ``x``'s dtype.
    """
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return torch.tensor(_select(x.numpy(), k, reorder=True), dtype=x.dtype)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of ``x`` (any shape, fp32/fp64; 1 <= k <= numel), exactly; ``x`` is not modified.

    As `kth_largest_` (`_select`), selecting on a copy where it must reorder.
    """
    x = x.reshape(-1)
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return torch.tensor(_select(x.contiguous().numpy(), k, reorder=False), dtype=x.dtype)


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-``density`` fraction of ``tau``'s entries by magnitude.

    Args:
        tau: any shape.
        density: fraction kept, in (0, 1]; ``k = max(1, round(density * numel))`` entries.

    Returns:
        bool mask of ``tau``'s shape. Entries tied with the k-th largest magnitude are all kept (a threshold, not
        an argsort: O(n) and the same answer whatever the tie order).
    """
    threshold = _magnitude_threshold(tau.abs().reshape(-1), density)
    if threshold is None:
        return torch.ones_like(tau, dtype=torch.bool)
    return tau.abs() >= threshold


def _magnitude_threshold(mag: torch.Tensor, density: float) -> torch.Tensor | None:
    """The k-th largest of ``mag`` (1-D |tau|, reordered in place) for `magnitude_mask`; None keeps everything."""
    n = mag.numel()
    if density >= 1.0 or n == 0:
        return None
    return kth_largest_(mag, max(1, round(density * n)))


def elect_sign(tau: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election per entry: the sign of the summed mass ("sum") or of the majority count ("count").

    Args:
        tau: [S, *shape] (already trimmed) task vectors.

    Returns:
        [*shape] of +1/-1; a tie (including all zero) elects +1.
    """
    if method == "sum":
        votes = tau.sum(0)
    elif method == "count":
        votes = torch.sign(tau).sum(0)
    else:
        raise ValueError(f"sign_election must be 'sum' or 'count', got {method!r}")
    return torch.where(votes >= 0, 1.0, -1.0).to(tau.dtype)


def disjoint_mean(tau: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Mean over the sources whose entry is non-zero and has the elected sign; 0 where none does.

    Args:
        tau: [S, *shape]; sign: [*shape] of +1/-1.
    """
    agree = torch.sign(tau) == sign  # zero entries have sign 0, so they never count
    count = agree.sum(0)
    total = torch.where(agree, tau, 0.0).sum(0)
    return total / count.clamp(min=1)


def _elect_(blk: torch.Tensor, method: str, e: torch.Tensor, scratch: torch.Tensor, ones: torch.Tensor) -> None:
    """`elect_sign` on one chunk ``blk`` [S, m]: +1/-1 into ``e`` [m].

    Votes are summed over sources as tau.sum(0) sums them. copysign(1, votes) is the formula's
    ``where(votes >= 0, 1, -1)`` except at votes = -0.0, which only a chunk of all-zero entries produces (x + -x is
    +0.0), where no source agrees with either sign.
    """
    if method == "sum":
        torch.sum(blk, 0, out=e)
    elif method == "count":
        torch.sum(torch.sign(blk, out=scratch), 0, out=e)
    else:
        raise ValueError(f"sign_election must be 'sum' or 'count', got {method!r}")
    torch.copysign(ones, e, out=e)


def _below(threshold: torch.Tensor) -> float:
    """The largest float32 below ``threshold``: hardshrink(x, that) keeps exactly the x with |x| >= threshold."""
    t = threshold.to(torch.float32)
    return float(torch.nextafter(t, torch.tensor(-math.inf)))


def _agreeing(flat: torch.Tensor, sign_election: str, lambdas: list | None = None):
    """TIES and SCE's shared step, chunk by chunk: elect a sign per entry and mark the sources that agree with it.

    Args:
        flat: [S, n] task vectors; with ``lambdas``, trimmed here in place first: ``hardshrink(tau_s, lambdas[s])``
            zeroes |tau_s| <= lambdas[s] (None: no trim).

    Yields:
        (blk [S, m] the chunk of ``flat``, e [m] the elected sign +1/-1 (`_elect_`), agree [S, m] float 1 where the
        entry is non-zero with the elected sign, else 0). ``e`` and ``agree`` are scratch reused for the next chunk:
        the caller consumes them (and may overwrite ``agree`` and ``blk[0]``) before asking for it.
    """
    s_count, n = flat.shape
    c = min(CHUNK, max(n, 1))
    agree = torch.empty(s_count, c, dtype=flat.dtype)
    e = torch.empty(c, dtype=flat.dtype)
    ones = torch.ones(c, dtype=flat.dtype)
    for sl in _chunks(n):
        m = sl.stop - sl.start
        blk, e_, a_ = flat[:, sl], e[:m], agree[:, :m]
        for s, lam in enumerate(lambdas or ()):
            if lam is not None:
                torch.hardshrink(blk[s], lam, out=blk[s])  # zero where |x| < threshold
        _elect_(blk, sign_election, e_, a_, ones[:m])
        yield blk, e_, torch.mul(blk, e_, out=a_).gt_(0.0)  # > 0 exactly where non-zero with the elected sign


def _trim_elect_mean_(tau: torch.Tensor, thresholds: list, sign_election: str, alpha: float) -> torch.Tensor:
    """TIES after the thresholds: trim, elect a sign, disjoint mean, times alpha; in place, into tau[0].

    ``thresholds[s]`` keeps |tau_s| >= it (None keeps all). One chunked pass (`_agreeing`):
        trimmed_s = tau_s * (|tau_s| >= thr_s); e = elect_sign(trimmed); agree_s = trimmed_s * e > 0
        result = alpha * (sum_s agree_s trimmed_s) / max(sum_s agree_s, 1)
    summed over sources in order, so the same floats as the formula (``agree_s trimmed_s`` is trimmed_s or +-0).
    """
    flat = _rows(tau)
    c = min(CHUNK, max(flat.shape[1], 1))
    count = torch.empty(c, dtype=tau.dtype)
    lambdas = [None if thr is None else _below(thr) for thr in thresholds]
    for blk, _e, agree in _agreeing(flat, sign_election, lambdas):
        count_ = torch.sum(agree, 0, out=count[: blk.shape[1]]).clamp_min_(1.0)
        torch.sum(agree.mul_(blk), 0, out=blk[0]).div_(count_)
        if alpha != 1.0:  # x * 1.0 is x
            blk[0].mul_(alpha)
    return tau[0]


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for (run seed, tensor name, source index): the same drop mask whatever the tensor order."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_drop(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on one task vector: zero each entry with probability ``drop_rate``, scale survivors by 1/(1-p).

    The uniform draws are ``torch.rand(tau.shape, generator=generator)``. Unbiased: E[dare_drop(tau)] = tau.
    """
    if drop_rate <= 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return torch.where(keep, tau / (1.0 - drop_rate), 0.0)


# ---------------------------------------------------------------- the methods (in place)
def task_arithmetic_(tau: torch.Tensor, *, alpha: float = 0.3) -> torch.Tensor:
    """`task_arithmetic`, overwriting ``tau``; returns a view of tau[0]. Sums in source order, as tau.sum(0)."""
    flat = _rows(tau)
    for sl in _chunks(flat.shape[1]):
        _sum_rows_(flat[:, sl], alpha)
    return tau[0]


def _sum_rows_(blk: torch.Tensor, alpha: float) -> None:
    """``alpha * sum_s blk[s]`` into blk[0] for one chunk [S, m], adding in source order as tau.sum(0) does."""
    for r in blk[1:]:
        blk[0].add_(r)
    blk[0].mul_(alpha)


def ties_(
    tau: torch.Tensor,
    *,
    density: float = 0.6,
    sign_election: str = "sum",
    alpha: float = 1.0,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """`ties`, overwriting ``tau``; returns a view of tau[0]. ``work``: fp32 scratch of >= tau[0].numel()."""
    flat = _rows(tau)
    n = flat.shape[1]
    work = torch.empty(n, dtype=tau.dtype) if work is None else work
    thresholds = []
    for r in flat:
        thresholds.append(_magnitude_threshold(torch.abs(r, out=work[:n]), density) if density < 1.0 else None)
    return _trim_elect_mean_(tau, thresholds, sign_election, alpha)


def dare_(
    tau: torch.Tensor, *, drop_rate: float = 0.9, alpha: float = 0.3, seed: int = 0, name: str = ""
) -> torch.Tensor:
    """`dare`, overwriting ``tau``; returns a view of tau[0].

    The uniforms are drawn chunk by chunk from each source's generator, which yields the same stream as one
    ``torch.rand(shape)`` (tests/fusion_cache/merge/test_methods.py checks it), so the drop masks are `dare_drop`'s.
    The drop and the sum run in the same pass over each chunk.
    """
    flat = _rows(tau)
    s_count, n = flat.shape
    if drop_rate <= 0.0:
        return task_arithmetic_(tau, alpha=alpha)
    gens = [torch.Generator().manual_seed(tensor_seed(seed, name, s)) for s in range(s_count)]
    keep = torch.empty(s_count, min(CHUNK, max(n, 1)), dtype=torch.float32)
    for sl in _chunks(n):
        k, blk = keep[:, : sl.stop - sl.start], flat[:, sl]
        for s in range(s_count):
            k[s].uniform_(0.0, 1.0, generator=gens[s])
        blk.div_(1.0 - drop_rate).mul_(k.ge_(drop_rate))
        _sum_rows_(blk, alpha)
    return tau[0]


def _population_var_(flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``flat.var(0, unbiased=False)`` into ``out`` [numel], chunked, bit for bit.

    torch's CPU kernel runs Welford's update in double per entry and is slow on this layout (6 s on the 135M
    model's embedding); this is the same recurrence with vectorized double ops. ``addcdiv_``/``addcmul_`` round
    the quotient/product before adding, as the recurrence's separate ops do (a test pins it against torch.var).
    """
    s_count, n = flat.shape
    c = min(CHUNK, max(n, 1))
    mean, m2, x, delta = (torch.empty(c, dtype=torch.float64) for _ in range(4))
    counts = [torch.tensor(float(s + 1), dtype=torch.float64) for s in range(s_count)]
    for sl in _chunks(n):
        m = sl.stop - sl.start
        mean_, m2_, x_, delta_ = mean[:m], m2[:m], x[:m], delta[:m]
        mean_.copy_(flat[0, sl])  # the first update from (0, 0) gives mean = x_0, m2 = 0 exactly
        m2_.zero_()
        for s in range(1, s_count):  # torch's WelfordOps.reduce: delta, mean += delta / n, m2 += delta * (x - mean)
            x_.copy_(flat[s, sl])
            torch.sub(x_, mean_, out=delta_)
            mean_.addcdiv_(delta_, counts[s])
            m2_.addcmul_(delta_, x_.sub_(mean_))
        out[sl].copy_(m2_.div_(float(s_count)))
    return out


def _mask_and_weigh_(flat: torch.Tensor, keep: torch.Tensor | None, threshold: float) -> list[float]:
    """SCE's masking and weights in one chunked pass: ``d_s = tau_s * (keep >= threshold)`` in place (no mask
    when ``keep`` is None) and ``sum(d_s^2)`` per source, in float64, the same floats as `sum_sq` (`grouped_total`).
    """
    s_count, n = flat.shape
    c = min(CHUNK, max(n, 1))
    mask = torch.empty(c, dtype=flat.dtype)
    sq = torch.empty(s_count, c, dtype=torch.float64)
    blocks: list[list[float]] = [[] for _ in range(s_count)]
    for sl in _chunks(n):
        m = sl.stop - sl.start
        blk, sq_ = flat[:, sl], sq[:, :m]
        if keep is not None:
            blk.mul_(torch.ge(keep[sl], threshold, out=mask[:m]))
        sums = block_sums(sq_.copy_(blk).square_())
        per = len(sums) // s_count
        for s in range(s_count):
            blocks[s] += sums[s * per : (s + 1) * per]
    return [grouped_total(b) for b in blocks]


def sce_(tau: torch.Tensor, *, select_topk: float = 0.1, work: torch.Tensor | None = None) -> torch.Tensor:
    """`sce`, overwriting ``tau``; returns a view of tau[0]. ``work``: fp32 scratch of >= tau[0].numel()."""
    flat = _rows(tau)
    s_count, n = flat.shape
    work = torch.empty(n, dtype=tau.dtype) if work is None else work
    keep, threshold = None, 0.0
    if select_topk < 1.0:  # d = tau * select_mask(tau)
        keep = _population_var_(flat, work[:n])
        k = int(int(np.count_nonzero(keep.numpy())) * select_topk)  # numpy's count: 5x torch's on CPU
        if k == 0:  # nothing selected: every d_s is 0, and so is the result
            return tau[0].zero_()
        threshold = float(kth_largest(keep, k))
    # w_s = sum(d_s^2) / numel, summed in float64 (as `sum_sq`) and rounded to fp32 once
    w = torch.tensor([sq / max(n, 1) for sq in _mask_and_weigh_(flat, keep, threshold)], dtype=tau.dtype)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))
    c = min(CHUNK, max(n, 1))
    den = torch.empty(c, dtype=tau.dtype)
    w_col = w.view(s_count, 1)
    for blk, _e, agree in _agreeing(flat, "sum"):
        den_ = torch.sum(agree.mul_(w_col), 0, out=den[: blk.shape[1]])  # w_s where the sign agrees, else 0
        torch.sum(agree.mul_(blk), 0, out=blk[0])
        den_.add_(torch.eq(den_, 0.0, out=_e))  # 0 / 0 -> 0
        blk[0].div_(den_)
    return tau[0]


class TensorStats(NamedTuple):
    """What RSAF's ratio needs from one tensor: ``base_sq`` = sum(theta_o^2) and, per source, the power sums
    (sum |tau_s|, sum tau_s^2, sum |tau_s|^3) (`power_sums`), all float64 in `block_sums`' fixed blocks."""

    base_sq: float
    sums: list[tuple[float, float, float]]


def rsaf_(
    tau: torch.Tensor,
    base: torch.Tensor,
    *,
    rate_refs: list[float],
    density: float = 0.6,
    rate_power: float = 0.5,
    skew_strength: float = 0.5,
    min_density: float = 0.1,
    max_density: float = 1.0,
    sign_election: str = "sum",
    alpha: float = 1.0,
    stats: TensorStats | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """`rsaf`, overwriting ``tau``; returns a view of tau[0]. ``work``: fp32 scratch of >= tau[0].numel().

    ``stats``: this tensor's sums, as `fusion_cache.merge.run.model_stats` computes them in its pass over the
    models (the same floats as computed here from ``tau`` and ``base``, which None does); with them the kernel is
    TIES plus a few scalar operations per source.
    """
    flat = _rows(tau)
    n = flat.shape[1]
    work = torch.empty(n, dtype=tau.dtype) if work is None else work
    base_sq = sum_sq(base) if stats is None else stats.base_sq
    thresholds = []
    for s in range(flat.shape[0]):
        mag = torch.abs(flat[s], out=work[:n])
        sums = power_sums(mag) if stats is None else stats.sums[s]
        skew = skew_from_sums(n, *sums)
        if skew is None:  # ill-conditioned power sums (or a constant |tau|): the two-pass definition
            skew = _skewness_two_pass(mag)
        k = rsaf_density(
            (sums[1] / base_sq) ** 0.5 if base_sq > 0 else 0.0,  # ||tau_s|| / ||theta_o||
            skew,
            rate_ref=rate_refs[s],
            density=density,
            rate_power=rate_power,
            skew_strength=skew_strength,
            min_density=min_density,
            max_density=max_density,
        )
        thresholds.append(_magnitude_threshold(mag, k))  # reorders mag: after the sums
    return _trim_elect_mean_(tau, thresholds, sign_election, alpha)


# ---------------------------------------------------------------- the methods (formulas; tau is left alone)
def task_arithmetic(tau: torch.Tensor, *, alpha: float = 0.3) -> torch.Tensor:
    """TA: ``alpha * sum_s tau_s``. tau: [S, *shape] -> [*shape]."""
    return task_arithmetic_(_owned(tau), alpha=alpha)


def ties(tau: torch.Tensor, *, density: float = 0.6, sign_election: str = "sum", alpha: float = 1.0) -> torch.Tensor:
    """TIES: trim each tau_s to its top-``density`` magnitudes, elect a sign, average the agreeing entries.

        trimmed_s = tau_s * magnitude_mask(tau_s, density)
        result = alpha * disjoint_mean(trimmed, elect_sign(trimmed, sign_election))

    ``alpha`` scales the result (FuseChat's per-model weight 0.2 with ``normalize: true`` cancels out, so 1.0).
    tau: [S, *shape] -> [*shape].
    """
    return ties_(_owned(tau), density=density, sign_election=sign_election, alpha=alpha)


def dare(
    tau: torch.Tensor, *, drop_rate: float = 0.9, alpha: float = 0.3, seed: int = 0, name: str = ""
) -> torch.Tensor:
    """DARE + task arithmetic: ``alpha * sum_s dare_drop(tau_s)``, the drop mask seeded by (seed, name, s).

    tau: [S, *shape] -> [*shape].
    """
    return dare_(_owned(tau), drop_rate=drop_rate, alpha=alpha, seed=seed, name=name)


def sce_select_mask(tau: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE "select": keep the top ``select_topk`` fraction (of the positions with non-zero variance) by the
    population variance across sources. tau: [S, *shape] -> bool [*shape]."""
    if select_topk >= 1.0:
        return torch.ones_like(tau[0], dtype=torch.bool)
    var = tau.var(0, unbiased=False)
    nonzero = int(torch.count_nonzero(var))
    k = int(nonzero * select_topk)
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    return var >= kth_largest(var, k)


def sce(tau: torch.Tensor, *, select_topk: float = 0.1) -> torch.Tensor:
    """SCE (FuseChat 2.0): select by variance, weight by squared selected mass, erase minority signs, weighted mean.

    tau: [S, *shape] -> [*shape]:
        m = sce_select_mask(tau);  d_s = tau_s * m
        w_s = sum(d_s^2) / numel, normalized to sum 1 (uniform if all 0)
        e_s = [sign(d_s) = sign(sum_s d_s)]   (a zero sum elects +)
        result = sum_s w_s e_s d_s / sum_s w_s e_s   (0 / 0 -> 0)
    """
    return sce_(_owned(tau), select_topk=select_topk)


# ---------------------------------------------------------------- RSAF (our reconstruction; docs/merge.md)
def power_sums(x: torch.Tensor) -> tuple[float, float, float]:
    """(sum x, sum x^2, sum x^3) over all of ``x``'s entries (fp32/fp64, any shape), in float64.

    One pass over chunks; the powers are float64 products (x^2 = x * x, x^3 = x^2 * x), summed in `block_sums`'
    fixed blocks and added by `grouped_total`: the same floats whatever the chunk size or torch's thread count, and
    the same as `fusion_cache.merge.run.model_stats` gets from its fused pass.
    """
    x = x.reshape(-1)
    n = x.numel()
    p = torch.empty(3, min(SKEW_CHUNK, max(n, 1)), dtype=torch.float64)
    blocks: list[list[float]] = [[], [], []]
    for sl in _chunks(n, SKEW_CHUNK):
        p_ = p[:, : sl.stop - sl.start]
        p_[0].copy_(x[sl])
        torch.mul(torch.mul(p_[0], p_[0], out=p_[1]), p_[0], out=p_[2])
        sums = block_sums(p_)  # the three rows in one call
        per = len(sums) // 3
        for j in range(3):
            blocks[j] += sums[j * per : (j + 1) * per]
    return grouped_total(blocks[0]), grouped_total(blocks[1]), grouped_total(blocks[2])


def skew_from_sums(n: int, s1: float, s2: float, s3: float) -> float | None:
    """Population skewness from the power sums of ``n`` values (`power_sums`); None where they are ill-conditioned.

        mu = s1 / n;  m2 = s2 / n - mu^2;  m3 = s3 / n - 3 mu s2 / n + 2 mu^3;  skew = m3 / m2^1.5

    The central moments come from raw ones by subtraction, which loses digits when the mean is large against the
    spread: used only while mu^2 <= SKEW_CONDITION * m2 (|tau| of a task vector: mu^2 ~ 1.75 m2 for a Gaussian
    tau). None (the caller falls back to the two-pass definition) otherwise, which includes a constant tensor.
    """
    if n == 0:
        return 0.0
    mu = s1 / n
    e2 = s2 / n
    m2 = e2 - mu * mu
    if not m2 > 0.0 or mu * mu > SKEW_CONDITION * m2:
        return None
    m3 = s3 / n - 3.0 * mu * e2 + 2.0 * mu**3
    return m3 / m2**1.5


def skewness(x: torch.Tensor) -> float:
    """Population skewness E[((x - mu) / sigma)^3] of all of ``x``'s entries; 0 for a constant tensor.

    From the float64 power sums (`power_sums`, `skew_from_sums`: one pass) where they are well conditioned, which
    for |tau| they are; else in two float64 passes (`_skewness_two_pass`). Either way the same bits whatever the
    chunking and torch's thread count.
    """
    n = x.numel()
    if n == 0:
        return 0.0
    skew = skew_from_sums(n, *power_sums(x))
    return _skewness_two_pass(x) if skew is None else skew


def _skewness_two_pass(x: torch.Tensor) -> float:
    """`skewness` by its definition: the mean, then the second and third central moments (two float64 passes
    over chunks, both moments summed by one torch call per chunk; `block_sums`, `grouped_total`)."""
    x = x.reshape(-1)
    n = x.numel()
    if n == 0:
        return 0.0
    c = min(SKEW_CHUNK, n)
    d = torch.empty(c, dtype=torch.float64)
    powers = torch.empty(2, c, dtype=torch.float64)
    firsts: list[float] = []
    for sl in _chunks(n, SKEW_CHUNK):
        firsts += block_sums(d[: sl.stop - sl.start].copy_(x[sl]))
    mu = grouped_total(firsts) / n
    seconds: list[float] = []
    thirds: list[float] = []
    for sl in _chunks(n, SKEW_CHUNK):
        m = sl.stop - sl.start
        d_, p_ = d[:m], powers[:, :m]
        d_.copy_(x[sl]).sub_(mu)
        torch.mul(torch.mul(d_, d_, out=p_[0]), d_, out=p_[1])
        sums = block_sums(p_)
        seconds += sums[: len(sums) // 2]
        thirds += sums[len(sums) // 2 :]
    sigma = math.sqrt(grouped_total(seconds) / n)
    if sigma == 0.0:
        return 0.0
    return grouped_total(thirds) / n / sigma**3


def rsaf_density(
    rate: float,
    skew: float,
    *,
    rate_ref: float,
    density: float = 0.6,
    rate_power: float = 0.5,
    skew_strength: float = 0.5,
    min_density: float = 0.1,
    max_density: float = 1.0,
) -> float:
    """The top-k ratio RSAF keeps for one task vector of one tensor. Swap this function to change RSAF.

        k = clip(density * (rate / rate_ref) ** rate_power * exp(-skew_strength * (skew - HALF_NORMAL_SKEW)),
                 min_density, max_density)

    A tensor that moved more than the model as a whole (rate > rate_ref) carries more of the fine-tune and keeps
    more; a heavy-tailed |tau| (skew above the half-normal's, i.e. a few dominant entries) keeps fewer, since a
    few entries already hold its mass. With rate = rate_ref and Gaussian-like tau it is plain TIES at ``density``.

    Args:
        rate: ||tau|| / ||theta_o|| of this tensor.
        skew: skewness of |tau| (`skewness`).
        rate_ref: the same ratio over the whole model (so the rule does not depend on learning rate or steps).
    """
    if rate <= 0.0 or rate_ref <= 0.0:
        return min_density
    k = density * (rate / rate_ref) ** rate_power * math.exp(-skew_strength * (skew - HALF_NORMAL_SKEW))
    return float(min(max(k, min_density), max_density))


def rsaf(
    tau: torch.Tensor,
    base: torch.Tensor,
    *,
    rate_refs: list[float],
    density: float = 0.6,
    rate_power: float = 0.5,
    skew_strength: float = 0.5,
    min_density: float = 0.1,
    max_density: float = 1.0,
    sign_election: str = "sum",
    alpha: float = 1.0,
) -> torch.Tensor:
    """RSAF: TIES whose top-k ratio is chosen per source and tensor by `rsaf_density` from rate and skewness.

        k_s = rsaf_density(||tau_s|| / ||base||, skewness(|tau_s|), rate_ref=rate_refs[s], ...)
        trimmed_s = tau_s * magnitude_mask(tau_s, k_s);  result = alpha * disjoint_mean(trimmed, elect_sign(...))

    The norms are square roots of float64 sums of squares (`sum_sq`, `power_sums`), the same bits whatever torch's
    thread count.

    Args:
        tau: [S, *shape]; base: [*shape] (for the change rate).
        rate_refs: per source, ||tau_s|| / ||theta_o|| over the whole model (a first pass computes it).
    """
    return rsaf_(
        _owned(tau),
        base,
        rate_refs=rate_refs,
        density=density,
        rate_power=rate_power,
        skew_strength=skew_strength,
        min_density=min_density,
        max_density=max_density,
        sign_election=sign_election,
        alpha=alpha,
    )
