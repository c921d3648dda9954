"""`capture.sampling`: seeded uniforms, inverse-CDF draws that follow the softmax, and the distinct-draw block."""

from __future__ import annotations

import numpy as np
import torch

from fusion_cache.capture.sampling import compact
from fusion_cache.capture.sampling import draw
from fusion_cache.capture.sampling import sample_key
from fusion_cache.capture.sampling import uniforms


def test_uniforms_depend_on_the_key_and_position_only():
    key = sample_key(7, "ab" * 16)
    assert key == sample_key(7, "ab" * 16) and key != sample_key(8, "ab" * 16) and 0 <= key < 1 << 63
    u = uniforms(key, np.arange(10), 12)
    assert u.shape == (10, 12) and u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
    # any subset of positions, in any chunking, gets the same numbers (a chunked prefill, another batch)
    np.testing.assert_array_equal(uniforms(key, np.array([7, 3]), 12), u[[7, 3]])
    assert not np.array_equal(uniforms(key + 1, np.arange(10), 12), u)
    assert len(np.unique(u)) == u.size


def test_uniforms_are_uniform():
    u = uniforms(sample_key(0, "x"), np.arange(2000), 50).reshape(-1)
    hist = np.bincount((u * 20).astype(int), minlength=20)
    expected = u.size / 20
    assert ((hist - expected) ** 2 / expected).sum() < 45.3  # chi-square, 19 dof, p = 0.999


def test_draws_follow_the_softmax():
    """Count frequencies of many draws against softmax(logits): a chi-square test per row."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40) * 2.0
    p = torch.softmax(logits.double(), -1).numpy()
    n = 20000
    u = torch.from_numpy(uniforms(sample_key(1, "rows"), np.arange(3 * n), 1).reshape(3, n))
    ids, lp = draw(logits, u)
    np.testing.assert_allclose(lp.numpy(), torch.log_softmax(logits.double(), -1).gather(1, ids).numpy(), atol=1e-6)
    for r in range(3):
        counts = np.bincount(ids[r].numpy(), minlength=40)
        expected = n * p[r]
        keep = expected >= 5  # the chi-square approximation's rule; the rare rest pooled
        obs = np.append(counts[keep], counts[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum())
        chi2 = (((obs - exp) ** 2) / np.maximum(exp, 1e-9)).sum()
        assert chi2 < 80.0, (r, chi2)  # < 40 classes: p ~ 1e-4 under the null


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([[0.0, -torch.inf, 1.0, -torch.inf]])
    u = torch.tensor([[0.0, 0.2689, 0.26894142, 0.5, 0.999999]], dtype=torch.float64)
    ids, _ = draw(logits, u)
    assert set(ids[0].tolist()) <= {0, 2}


def test_compact_keeps_distinct_draws_with_counts_most_likely_first():
    ids = np.array([[5, 3, 5, 5, 9, 3], [1, 1, 1, 1, 1, 1]])
    lp = np.array([[-0.5, -2.0, -0.5, -0.5, -2.0, -2.0], [-0.1] * 6], np.float32)
    out_ids, out_lp, counts = compact(ids, lp, 6)
    np.testing.assert_array_equal(out_ids, [[5, 3, 9, -1, -1, -1], [1, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(counts, [[3, 2, 1, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out_lp[0, :3], [-0.5, -2.0, -2.0])  # ties by id: 3 before 9
    assert np.isneginf(out_lp[0, 3:]).all() and counts.dtype == np.uint8 and out_ids.dtype == np.int32
    assert compact(np.zeros((0, 4)), np.zeros((0, 4)), 4)[0].shape == (0, 4)
