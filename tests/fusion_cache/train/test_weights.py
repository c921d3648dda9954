"""Combine modes of unified fusion: per-row weights for mean, sum, uncertainty and min_ce, and their inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusion_cache.errors import ConfigError
from fusion_cache.train.weights import answer_nll_per_byte
from fusion_cache.train.weights import sample_row_weights
from fusion_cache.train.weights import topk_entropy
from fusion_cache.train.weights import uncertainty_weights


def test_topk_entropy_of_known_distributions():
    uniform4 = np.log(np.full((1, 4), 0.25))
    peaked = np.array([[0.0, -60.0, -60.0, -61.0]])
    half_tail = np.log(np.array([[0.25, 0.25, 1e-30, 1e-30]]))  # half the mass outside the top-K: one tail bucket
    assert topk_entropy(uniform4, 4)[0] == pytest.approx(math.log(4))
    assert topk_entropy(uniform4, 2)[0] == pytest.approx(-2 * 0.25 * math.log(0.25) - 0.5 * math.log(0.5))
    assert topk_entropy(peaked, 4)[0] == pytest.approx(0.0, abs=1e-12)
    assert topk_entropy(half_tail, 4)[0] == pytest.approx(-2 * 0.25 * math.log(0.25) - 0.5 * math.log(0.5))
    over = np.log(np.array([[0.7, 0.31]]))  # quantized values may sum over 1: no NaN
    assert np.isfinite(topk_entropy(over, 2)).all()


def test_uncertainty_weights_prefer_the_certain_teacher():
    neg_h = np.array([[-0.1, -1.0, -np.inf], [-2.0, -1.0, -0.5]])
    w = uncertainty_weights(neg_h, temperature=1.0)
    np.testing.assert_allclose(w.sum(0), 1.0)
    assert w[0, 0] > 0.8 and w[0, 1] == pytest.approx(0.5) and w[0, 2] == 0.0 and w[1, 2] == 1.0
    hot = uncertainty_weights(neg_h, temperature=100.0)
    assert abs(hot[0, 0] - 0.5) < 0.01  # a high temperature goes to the plain mean


def test_row_weights_per_mode():
    rows = [np.array([0, 1, 2, 3]), np.array([0, 2]), None]
    ent = [np.array([0.1, 0.1, 0.1, 0.1]), np.array([2.0, 2.0]), None]
    mean = sample_row_weights(rows, ent, "mean", batch_size=2)
    np.testing.assert_allclose(mean[0], 1 / 16)  # 1 / (B * |S_b| * n_bs)
    np.testing.assert_allclose(mean[1], 1 / 8)
    assert mean[2] is None and sum(w.sum() for w in mean[:2]) == pytest.approx(0.5)  # this sample's 1/B
    total = sample_row_weights(rows, ent, "sum", batch_size=2)
    assert sum(w.sum() for w in total[:2]) == pytest.approx(1.0)  # |S_b| / B
    unc = sample_row_weights(rows, ent, "uncertainty", batch_size=2)
    assert sum(w.sum() for w in unc[:2]) == pytest.approx(0.5)
    # rows 1 and 3 have teacher 0 only: its full share; rows 0 and 2: shared, the certain teacher 0 gets more
    np.testing.assert_allclose(unc[0][[1, 3]], 1 / 8)
    assert (unc[0][[0, 2]] > 4 * unc[1]).all()
    np.testing.assert_allclose(unc[0][[0, 2]] + unc[1], 1 / 8)
    # equal entropies and the same rows: uncertainty is exactly the mean
    same = [np.array([0, 1]), np.array([0, 1])]
    flat = [np.ones(2), np.ones(2)]
    np.testing.assert_allclose(
        sample_row_weights(same, flat, "uncertainty", 3)[0], sample_row_weights(same, flat, "mean", 3)[0]
    )
    assert sample_row_weights([None, None], [None, None], "mean", 1) == [None, None]
    with pytest.raises(ConfigError, match="combine: unknown value 'max'"):
        sample_row_weights(rows, ent, "max", 1)


def test_min_ce_gives_each_sample_to_the_teacher_that_predicts_its_answer_best():
    rows = [np.array([0, 1, 2, 3]), np.array([0, 2]), None]
    ent = [None, None, None]  # min_ce reads no entropy
    # teacher 1 predicts the answer better (0.2 nats/byte against 0.9): all of this sample's 1/B goes to it
    w = sample_row_weights(rows, ent, "min_ce", batch_size=2, scores=[0.9, 0.2, None])
    np.testing.assert_array_equal(w[0], 0.0)  # aligned (its own term is still logged) but not distilled from
    np.testing.assert_allclose(w[1], 1 / 4)  # 1 / (B * n_bs)
    assert w[2] is None and w[1].sum() == pytest.approx(0.5)
    # a tie shares the sample as mean does
    tie = sample_row_weights(rows, ent, "min_ce", batch_size=2, scores=[0.5, 0.5, None])
    mean = sample_row_weights(rows, ent, "mean", batch_size=2)
    for a, b in zip(tie[:2], mean[:2], strict=True):
        np.testing.assert_allclose(a, b)
    # a teacher alone in the sample takes it whatever its score
    alone = sample_row_weights([None, np.array([1, 2])], [None, None], "min_ce", 4, scores=[None, 7.0])
    np.testing.assert_allclose(alone[1], 1 / 8)
    with pytest.raises(ValueError, match="teacher 1: min_ce weighting needs its cross-entropy"):
        sample_row_weights(rows, ent, "min_ce", 2, scores=[0.9, None, None])


def test_answer_nll_per_byte_by_hand():
    lp = np.log(np.array([0.5, 0.25, 1.0]))  # 3 answer tokens over 6 bytes
    assert answer_nll_per_byte(lp, 6) == pytest.approx((math.log(2) + math.log(4)) / 6)
    assert answer_nll_per_byte(lp, 0) == pytest.approx(math.log(8))  # no bytes: per token-sum, never a division by 0
