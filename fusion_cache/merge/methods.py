"""Merge methods on one tensor: task arithmetic (TA), TIES, DARE, SCE and RSAF.

Every method sees the base tensor and the task vectors of the fine-tuned models for ONE tensor name, all fp32 and
the same shape, and returns the merged task vector; the caller adds it to the base:

    tau_s = theta_s - theta_o          # [S, *shape], one row per fine-tuned pivot
    theta = theta_o + method(tau, ...) # the merged tensor

They are plain functions of tensors (no I/O), so tests check each against its formula on small tensors and
`fusion_cache.merge.run` streams them over a whole model. Defaults follow docs/merge.md (FuseChat's configs where the
InfiFusion paper gives none).
"""

from __future__ import annotations

import hashlib
import math

import torch

# Skewness of |x| for x ~ N(0, s^2) (the half-normal): sqrt(2) (4 - pi) / (pi - 2)^1.5. RSAF's neutral point.
HALF_NORMAL_SKEW = math.sqrt(2.0) * (4.0 - math.pi) / (math.pi - 2.0) ** 1.5


# ---------------------------------------------------------------- building blocks
def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-D tensor ``x`` (1 <= k <= numel), exactly; faster than a full kthvalue.

    For large tensors a strided sample brackets the answer, then only the values inside the bracket are searched.
    If the bracket misses (it is 4 standard deviations wide, so rarely), a full kthvalue answers.
    """
    n = x.numel()
    if n <= 1 << 20:
        return torch.kthvalue(x, n - k + 1).values
    sample = x[:: n // (1 << 16)]
    m = sample.numel()
    q = k / n
    center = m * (1.0 - q)
    margin = 4.0 * math.sqrt(m * q * (1.0 - q)) + 8.0
    lo = torch.kthvalue(sample, int(min(max(math.floor(center - margin), 1), m))).values
    hi = torch.kthvalue(sample, int(min(max(math.ceil(center + margin), 1), m))).values
    need = k - int((x > hi).sum())  # rank of the answer, from the top, among values in [lo, hi]
    band = x[(x >= lo) & (x <= hi)]
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(x, n - k + 1).values


def magnitude_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top-``density`` fraction of ``tau``'s entries by magnitude.

    Args:
        tau: any shape.
        density: fraction kept, in (0, 1]; ``k = max(1, round(density * numel))`` entries.

    Returns:
        bool mask of ``tau``'s shape. Entries tied with the k-th largest magnitude are all kept (a threshold, not
        an argsort: O(n) and the same answer whatever the tie order).
    """
    n = tau.numel()
    if density >= 1.0 or n == 0:
        return torch.ones_like(tau, dtype=torch.bool)
    k = max(1, round(density * n))
    mag = tau.abs()
    return mag >= kth_largest(mag.reshape(-1), k)


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


def tensor_seed(seed: int, name: str, index: int) -> int:
    """A 63-bit seed for (run seed, tensor name, source index): the same drop mask whatever the tensor order."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_drop(tau: torch.Tensor, drop_rate: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on one task vector: zero each entry with probability ``drop_rate``, scale survivors by 1/(1-p).

    Unbiased: E[dare_drop(tau)] = tau.
    """
    if drop_rate <= 0.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) >= drop_rate
    return torch.where(keep, tau / (1.0 - drop_rate), 0.0)


# ---------------------------------------------------------------- the methods
def task_arithmetic(tau: torch.Tensor, *, alpha: float = 0.3) -> torch.Tensor:
    """TA: ``alpha * sum_s tau_s``. tau: [S, *shape] -> [*shape]."""
    return alpha * tau.sum(0)


def ties(tau: torch.Tensor, *, density: float = 0.6, sign_election: str = "sum", alpha: float = 1.0) -> torch.Tensor:
    """TIES: trim each tau_s to its top-``density`` magnitudes, elect a sign, average the agreeing entries.

    ``alpha`` scales the result (FuseChat's per-model weight 0.2 with ``normalize: true`` cancels out, so 1.0).
    tau: [S, *shape] -> [*shape].
    """
    trimmed = torch.stack([torch.where(magnitude_mask(t, density), t, 0.0) for t in tau])
    return alpha * disjoint_mean(trimmed, elect_sign(trimmed, sign_election))


def dare(
    tau: torch.Tensor, *, drop_rate: float = 0.9, alpha: float = 0.3, seed: int = 0, name: str = ""
) -> torch.Tensor:
    """DARE + task arithmetic: ``alpha * sum_s drop(tau_s)``, the drop mask seeded by (seed, name, s).

    tau: [S, *shape] -> [*shape].
    """
    out = torch.zeros_like(tau[0])
    for s, t in enumerate(tau):
        g = torch.Generator().manual_seed(tensor_seed(seed, name, s))
        out += dare_drop(t, drop_rate, g)
    return alpha * out


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
    return var >= kth_largest(var.reshape(-1), k)


def sce(tau: torch.Tensor, *, select_topk: float = 0.1) -> torch.Tensor:
    """SCE (FuseChat 2.0): select by variance, weight by squared selected mass, erase minority signs, weighted mean.

    tau: [S, *shape] -> [*shape]:
        m = select_mask(tau);  d_s = tau_s * m
        w_s = sum(d_s^2) / numel, normalized to sum 1 (uniform if all 0)
        e_s = [sign(d_s) = sign(sum_s d_s)]   (a zero sum elects +)
        result = sum_s w_s e_s d_s / sum_s w_s e_s   (0 / 0 -> 0)
    """
    d = tau * sce_select_mask(tau, select_topk)
    w = d.pow(2).reshape(d.shape[0], -1).sum(1) / max(d[0].numel(), 1)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(w))
    sign = elect_sign(d, "sum")
    we = w.view(-1, *([1] * (d.dim() - 1))) * (torch.sign(d) == sign)
    return (we * d).sum(0) / torch.where(we.sum(0) == 0, 1.0, we.sum(0))


# ---------------------------------------------------------------- RSAF (our reconstruction; docs/merge.md)
def skewness(x: torch.Tensor) -> float:
    """Population skewness E[((x - mu) / sigma)^3]; 0 for a constant tensor."""
    x = x.reshape(-1).double()
    sigma = x.std(unbiased=False)
    if float(sigma) == 0.0:
        return 0.0
    return float((((x - x.mean()) / sigma) ** 3).mean())


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

    Args:
        tau: [S, *shape]; base: [*shape] (for the change rate).
        rate_refs: per source, ||tau_s|| / ||theta_o|| over the whole model (a first pass computes it).
    """
    base_norm = float(base.norm())
    trimmed = []
    for s, t in enumerate(tau):
        rate = float(t.norm()) / base_norm if base_norm > 0 else 0.0
        k = rsaf_density(
            rate,
            skewness(t.abs()),
            rate_ref=rate_refs[s],
            density=density,
            rate_power=rate_power,
            skew_strength=skew_strength,
            min_density=min_density,
            max_density=max_density,
        )
        trimmed.append(torch.where(magnitude_mask(t, k), t, 0.0))
    trimmed = torch.stack(trimmed)
    return alpha * disjoint_mean(trimmed, elect_sign(trimmed, sign_election))
