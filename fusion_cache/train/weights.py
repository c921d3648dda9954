"""How unified fusion combines the teachers' terms: per-row loss weights for `mean`, `sum`, `uncertainty` and `min_ce`.

    L = (1 - lambda) * CE + lambda * combine_s(L_pair,s)          (docs/fusion.md, "Loss and combine modes")

Every mode comes down to one weight per (teacher, aligned row), so the loss is ``sum_s sum_r w[s, r] * d[s, r]`` with
``d`` the per-row ULD distance. With B samples in the batch, S_b the teachers sample b has (a sample missing from a
cache, or with no aligned row for a teacher, uses the teachers it has) and n_bs the rows of sample b aligned to s:

- ``mean`` (default): ``1 / (B * |S_b| * n_bs)``: per sample, the mean over its teachers of each teacher's mean over
  its aligned rows; then the mean over the batch. With every teacher present this is ``mean_s L_pair,s``.
- ``sum``: ``1 / (B * n_bs)``: the same without dividing by the number of teachers (InfiFusion v3's figure).
- ``uncertainty``: per student row t of sample b, the teachers aligned to it are weighted
  ``w_s,t = softmax_s(-H_s,t / T)`` (the more certain teacher counts more; method.md section 5), and the row's
  combined distance is averaged over the sample's rows that have any teacher: ``w_s,t / (B * n_b)``. With equal
  entropies this is exactly ``mean`` when all teachers align to the same rows.
- ``min_ce``: per sample, only the teacher that predicts the sample's gold answer best distills: the one of lowest
  ``C_s,b``, the teacher's cross-entropy on the answer in nats per answer byte (its cached log-probs of the answer's
  own tokens, ``target_logprobs``; bytes compare teachers of different tokenizers), weighted ``1 / (B * n_bs)``;
  teachers tied at the minimum share it. This is FuseLLM's MinCE fusion (Wan et al., 2024) applied to the loss
  terms instead of to the distributions. A teacher that does not know a domain has a high entropy *and* a high
  ``C`` there, but a confidently wrong one only has the high ``C``: ``min_ce`` reads the gold answer, which the
  cache already holds, where ``uncertainty`` can only read the teacher's own confidence.

``H_s,t`` is the entropy of the teacher's **cached** distribution at that row, in nats: its top-k probabilities
``exp(logprob)`` (k = the loss's K, at most the cache's K) plus one bucket for the mass outside them,
``1 - sum exp(logprob)``. This is the teacher's true uncertainty; the z-scored softmax over the K values that the ULD
loss compares would throw away the scale that tells a confident teacher from a hesitant one (z-scoring makes every
row's K values unit-variance). Defined for log-prob caches, which is what `fusion-cache build` stores.

``COMBINES`` (at the end) maps each mode's name to its function; `TrainConfig.combine` takes its names.

The per-teacher term that is logged, ``L_pair,s``, is each teacher's own mean over its rows, then over the samples
of the batch that have it (``1 / (B_s * n_bs)``), whatever the combine mode.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fusion_cache.config import lookup


def topk_entropy(logprobs: np.ndarray, k: int) -> np.ndarray:
    """Entropy in nats of each row's top-k probabilities plus the leftover tail bucket.

    Args:
        logprobs: [N, Kt] cached top-K log-probs, sorted descending (-inf: an empty slot, as in a carried target).
        k: how many of them to use (capped at Kt).

    Returns:
        float64 [N], between 0 and ln(k + 1).
    """
    lp = np.asarray(logprobs[:, :k], dtype=np.float64)
    p = np.exp(lp)
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)  # quantized values may sum a hair over 1
    with np.errstate(divide="ignore", invalid="ignore"):
        tail_term = np.where(tail > 0, tail * np.log(tail), 0.0)
        plogp = np.where(p > 0, p * lp, 0.0)
    return -plogp.sum(axis=1) - tail_term


def uncertainty_weights(neg_entropy: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax_s(-H / T)`` over teachers, per row; -inf marks a teacher with no row there.

    Args:
        neg_entropy: [S, R] ``-H`` per teacher and row, -inf where the teacher is absent (each row has >= 1).

    Returns:
        [S, R] weights, each column summing to 1 over the teachers present, 0 for the absent.
    """
    x = neg_entropy / temperature
    x = x - x.max(axis=0, keepdims=True)
    e = np.exp(x)  # exp(-inf) = 0
    return e / e.sum(axis=0, keepdims=True)


def answer_nll_per_byte(target_logprobs: np.ndarray, answer_bytes: int) -> float:
    """A teacher's cross-entropy on one gold answer, in nats per answer byte (the ``min_ce`` score ``C``).

    Args:
        target_logprobs: [n_answer] the teacher's log-probs of the answer's own tokens (as cached).
        answer_bytes: the bytes those tokens cover (at least 1 is used).
    """
    return float(-np.asarray(target_logprobs, dtype=np.float64).sum() / max(int(answer_bytes), 1))


def sample_row_weights(
    rows: list[np.ndarray | None],
    entropies: list[np.ndarray | None],
    mode: str,
    batch_size: int,
    *,
    temperature: float = 1.0,
    scores: list[float | None] | None = None,
) -> list[np.ndarray | None]:
    """Loss weights of one sample's aligned rows, per teacher (see the module docstring).

    Args:
        rows: per teacher, the student answer rows it is aligned to (int [n_s], increasing), or None if absent.
        entropies: per teacher, ``H`` at those rows ([n_s]); needed for ``uncertainty`` only.
        mode: a name of `COMBINES`.
        batch_size: B, the samples in the batch.
        temperature: T of the uncertainty softmax.
        scores: per teacher, its answer cross-entropy ``C`` (`answer_nll_per_byte`); needed for ``min_ce`` only.

    Returns:
        per teacher, float32 [n_s] weights (None where absent).
    """
    combine = lookup(COMBINES, mode, "combine")
    present = [s for s, r in enumerate(rows) if r is not None and len(r)]
    if not present:
        return [None] * len(rows)
    scores = [None] * len(rows) if scores is None else scores
    return combine(rows, entropies, present, batch_size, temperature, scores)


def _uniform(rows: list, present: list[int], batch_size: int, per_teacher: int) -> list[np.ndarray | None]:
    """``1 / (B * per_teacher * n_bs)`` on each present teacher's rows."""
    out: list[np.ndarray | None] = [None] * len(rows)
    for s in present:
        out[s] = np.full(len(rows[s]), 1.0 / (batch_size * per_teacher * len(rows[s])), dtype=np.float32)
    return out


def _mean(rows, entropies, present, batch_size, temperature, scores):
    """``mean``: per sample, the mean over its teachers of each one's mean over its rows."""
    return _uniform(rows, present, batch_size, len(present))


def _sum(rows, entropies, present, batch_size, temperature, scores):
    """``sum``: ``mean`` without dividing by the number of teachers."""
    return _uniform(rows, present, batch_size, 1)


def _uncertainty(rows, entropies, present, batch_size, temperature, scores):
    """``uncertainty``: per student row, the teachers aligned to it weighted by ``softmax_s(-H_s,t / T)``."""
    out: list[np.ndarray | None] = [None] * len(rows)
    union = np.unique(np.concatenate([rows[s] for s in present]))
    neg_h = np.full((len(present), len(union)), -np.inf)
    cols = []
    for i, s in enumerate(present):
        if entropies[s] is None:
            raise ValueError(f"teacher {s}: uncertainty weighting needs the entropy of each aligned row")
        c = np.searchsorted(union, rows[s])
        neg_h[i, c] = -np.asarray(entropies[s], dtype=np.float64)
        cols.append(c)
    w = uncertainty_weights(neg_h, temperature) / (batch_size * len(union))
    for i, s in enumerate(present):
        out[s] = w[i, cols[i]].astype(np.float32)
    return out


def _min_ce(rows, entropies, present, batch_size, temperature, scores):
    """``min_ce``: per sample, the present teachers of lowest answer cross-entropy share ``1 / (B * n_bs)``."""
    c = []
    for s in present:
        if scores[s] is None or not np.isfinite(scores[s]):
            raise ValueError(f"teacher {s}: min_ce weighting needs its cross-entropy on the answer, got {scores[s]}")
        c.append(scores[s])
    lowest = min(c)
    best = [s for s, x in zip(present, c, strict=True) if x <= lowest + 1e-12]
    out = _uniform(rows, best, batch_size, len(best))
    for s in present:
        if out[s] is None:
            out[s] = np.zeros(len(rows[s]), dtype=np.float32)  # aligned, logged, but not distilled from
    return out


# ``TrainConfig.kd_gate``: "student" keeps a teacher's weights on a sample only while the teacher's answer
# cross-entropy ``C_s,b`` is below the student's own at that step (`train.objective.gate_weights`); "none" keeps them
# all.
KD_GATES: tuple[str, ...] = ("none", "student")


# The combine modes (the module docstring defines them): name -> the weights of one sample's aligned rows, from
# (rows, entropies, present teachers, B, T, answer scores). `TrainConfig.combine` takes these names.
COMBINES: dict[str, Callable[..., list[np.ndarray | None]]] = {
    "mean": _mean, "sum": _sum, "uncertainty": _uncertainty, "min_ce": _min_ce
}  # fmt: skip
COMBINE_MODES: tuple[str, ...] = tuple(COMBINES)
