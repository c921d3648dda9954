"""Sampled capture (RS-KD): N tokens per answer position drawn from the teacher's full softmax, seeded per position.

    fusion-cache build --teacher smollm2-135m --data rows.jsonl --out ./cache/rs --sampling rs --samples 12

Per answer position t of a sample, N tokens are drawn with replacement from the teacher's next-token distribution at
T=1 (the RS-KD proposal q = p, Anshumann et al., ACL 2025). A cache keeps the distinct draws, each with its count
and its teacher log-prob (the `sampled` codec, fusion_cache/cache/codecs/sampled.py), which is what the importance-
weighted loss needs to re-temper the target and to carry it onto another tokenizer (`train.losses.SampledKL`).

Reproducibility: the draws are inverse-CDF samples of uniforms that depend only on (build seed, sample id, answer
position, draw index), through a counter-based hash (`uniforms`). So the same build twice, a resumed build, a part
of a distributed build and either engine (vLLM or transformers) draw the same uniforms for a position whatever the
batch or worker that captures it; the two engines draw the same ids wherever their logits agree (a uniform that
falls within rounding of a CDF boundary is the only place they may differ). The CDF is accumulated in fp64 from the
fp32 logits, so the draw does not depend on how an engine's fp32 log-softmax rounds.
"""

from __future__ import annotations

import hashlib

import numpy as np

TOPK = "topk"
RS = "rs"
SAMPLINGS = (TOPK, RS)  # the values of BuildConfig.sampling (capture/config.py)
DEFAULT_SAMPLES = 12  # the RS-KD paper's N: "comparable to full KD with only 12 tokens"
# draws per position: at least 2 (a loss over 1 draw is CE on a random token), at most 255 (a count is one byte)
SAMPLES_RANGE = (2, 255)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def sample_key(seed: int, sample_id: str) -> int:
    """The 63-bit key of one sample's draws: blake2b of the build seed and the sample id (a Python int that any
    engine's request options carry unchanged)."""
    digest = hashlib.blake2b(f"{int(seed)}:{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 (wrapping arithmetic): a bijection whose outputs pass BigCrush."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(key: int, positions: np.ndarray, n: int) -> np.ndarray:
    """Uniforms in [0, 1) for draws 0..n-1 at the answer positions ``positions`` of the sample with ``key``.

    Args:
        key: `sample_key` of the sample.
        positions: int [P] answer positions (0 = the first answer token).
        n: draws per position.

    Returns:
        float64 [P, n], each the top 53 bits of splitmix64(splitmix64(key) + position * 2^32 + draw).
    """
    pos = np.asarray(positions, dtype=np.uint64)[:, None]
    j = np.arange(n, dtype=np.uint64)[None, :]
    base = _splitmix64(np.array([key], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        counter = base + (pos << np.uint64(32)) + j
    bits = _splitmix64(counter) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def draw(logits, u):
    """Inverse-CDF draws from softmax(logits) (torch, on the logits' device).

    Args:
        logits: float [R, V] the teacher's logits (any float dtype; taken in fp64).
        u: float64 [R, n] uniforms in [0, 1) (`uniforms`), on any device.

    Returns:
        (ids int64 [R, n], logprobs float32 [R, n]): the drawn ids and the teacher's log-prob of each (full-vocabulary
        log-softmax).
    """
    import torch

    x = logits.double()
    log_norm = torch.logsumexp(x, dim=-1, keepdim=True)
    cdf = torch.cumsum(torch.exp(x - log_norm), dim=-1)  # [R, V]; cdf[-1] is 1 up to rounding
    target = u.to(device=x.device, dtype=torch.float64) * cdf[:, -1:]
    # right=True: the first id whose cdf exceeds the target, so a token of zero probability is never drawn
    ids = torch.searchsorted(cdf, target, right=True).clamp_(max=x.shape[1] - 1)
    logprobs = (x.gather(1, ids) - log_norm).float()
    return ids, logprobs


def compact(ids: np.ndarray, logprobs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct draws of each position with their counts, most likely first (ties by id), padded to ``n``.

    Args:
        ids: int [P, n] drawn ids; logprobs: float32 [P, n] the teacher's log-prob of each.
        n: draws per position.

    Returns:
        (ids int32 [P, n], logprobs float32 [P, n], counts uint8 [P, n]): the U distinct ids of a position in its first
        U slots, then padding (id -1, log-prob -inf, count 0); the counts of a position sum to n.
    """
    ids = np.asarray(ids, dtype=np.int64)
    lp = np.asarray(logprobs, dtype=np.float32)
    p = ids.shape[0]
    out_ids = np.full((p, n), -1, np.int32)
    out_lp = np.full((p, n), -np.inf, np.float32)
    out_counts = np.zeros((p, n), np.uint8)
    if p == 0:
        return out_ids, out_lp, out_counts
    srt = np.sort(ids, axis=1)
    first = np.ones_like(srt, dtype=bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    rows, cols = np.nonzero(first)
    # run lengths of equal ids: the distance to the next run start (or the row's end)
    nxt = np.append(cols[1:], n)
    nxt[np.append(rows[1:] != rows[:-1], True)] = n
    counts = nxt - cols
    uid = srt[rows, cols]
    # each distinct id's log-prob: that of any of its draws (an id's log-prob is one number)
    order = np.argsort(ids, axis=1, kind="stable")
    ulp = np.take_along_axis(lp, order, axis=1)[rows, cols]
    # slot of each distinct id: by log-prob descending, then id ascending, within its row
    rank = np.lexsort((uid, -ulp.astype(np.float64), rows))
    rows, uid, ulp, counts = rows[rank], uid[rank], ulp[rank], counts[rank]
    starts = np.searchsorted(rows, np.arange(p))
    slot = np.arange(rows.size) - starts[rows]
    out_ids[rows, slot] = uid
    out_lp[rows, slot] = ulp
    out_counts[rows, slot] = counts
    return out_ids, out_lp, out_counts
