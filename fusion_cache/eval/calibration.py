"""Calibration of a student's next-token probabilities: expected calibration error (ECE).

Standard ECE (Guo et al., 2017): the answer positions are put into 15 equal-width bins of top-1 confidence
(the student's largest next-token probability) over [0, 1]; ECE is the token-weighted mean over the bins of
|accuracy - mean confidence|, accuracy being the share of positions whose top-1 token is the gold token.
"""

from __future__ import annotations

import torch

ECE_BINS = 15  # the usual count (Guo et al.); equal-width bins on [0, 1]


def calibration_error(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width confidence bins.

    Args:
        confidence: [N] top-1 probabilities in [0, 1].
        correct: [N] bool, whether the top-1 token is the gold token.
        n_bins: number of equal-width bins; bin b holds (b/n, (b+1)/n], the first also holds 0.

    Returns:
        sum_b |B_b| / N * |acc(B_b) - conf(B_b)| (0.0 for N = 0).
    """
    return ece_from_bins(ece_bin_sums(confidence, correct, n_bins), confidence.numel())


def ece_bin_sums(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = ECE_BINS) -> torch.Tensor:
    """[n_bins] float64 sum of (confidence - correct) per bin: add them over batches, then `ece_from_bins`."""
    conf = confidence.detach().double().flatten()
    hit = correct.detach().double().flatten()
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1  # [N] in [0, n_bins)
    return torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf - hit)


def ece_from_bins(bin_sums: torch.Tensor, n: int) -> float:
    """ECE from the summed per-bin gaps of `ece_bin_sums` over ``n`` positions (0.0 for n = 0)."""
    return float(bin_sums.abs().sum() / n) if n else 0.0


def top1_calibration_inputs(logits: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence [N], correct [N]) from a student's logits [N, V] at answer positions and the gold ids [N]."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    conf, top = probs.max(dim=-1)
    return conf, top == gold


def tail_mass_outside(logits: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """[N] the student's probability outside the teacher's cached top-K ids [N, K] (-1: padding)."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    present = teacher_ids >= 0
    inside = torch.where(present, probs.gather(1, teacher_ids.clamp_min(0).long()), 0.0).sum(-1)
    return (1.0 - inside).clamp_min(0.0)
