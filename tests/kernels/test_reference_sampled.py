"""The sampled (RS-KD) KL reference: exact on the full support, gradcheck, and unbiased in expectation over draws.

The expectation tests draw N=12 tokens per row from a fixed teacher many times (the capture's own sampler,
`capture.sampling`), average the estimator's gradient over the draws, and compare it with the full-vocabulary KL
gradient within 5 standard errors of that mean, entry by entry, plus the mass that no draw can be expected to
see (`_unseen`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion_cache.capture.sampling import compact
from fusion_cache.capture.sampling import draw
from fusion_cache.capture.sampling import sample_key
from fusion_cache.capture.sampling import uniforms
from fusion_cache.kernels.reference import carried_sampled_kl_rows_reference
from fusion_cache.kernels.reference import sampled_kl_rows_reference
from fusion_cache.kernels.reference import sampled_weights_reference
from fusion_cache.kernels.reference import topk_kl_rows_reference

R, V, N = 3, 30, 12


def _logits(seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(R, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _dense_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """[R] KL(softmax(teacher_lp / T) || softmax(student / T)), teacher_lp the teacher's T=1 log-probs."""
    log_p = torch.log_softmax(torch.log_softmax(teacher, -1) / t, -1)
    return (log_p.exp() * (log_p - torch.log_softmax(student / t, -1))).sum(-1)


def _draws(teacher: torch.Tensor, m: int, n: int = N):
    """m independent sets of n draws per row, compacted as a cache stores them: ids, log-probs, counts [m * R, n]."""
    u = torch.from_numpy(uniforms(sample_key(0, "expectation"), np.arange(m * R), n))
    ids, lp = draw(teacher.repeat(m, 1), u)  # row r of set j is row j * R + r
    ids, lp, counts = compact(ids.numpy(), lp.numpy(), n)
    return torch.from_numpy(ids).long(), torch.from_numpy(lp).double(), torch.from_numpy(counts).double()


@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
def test_equals_the_dense_kl_on_the_full_support(t):
    """With every id drawn and counts proportional to p, the weights are p_T exactly: the dense formula."""
    teacher, student = _logits(0), _logits(1)
    lp = torch.log_softmax(teacher, -1)
    ids = torch.arange(V).expand(R, V)
    got = sampled_kl_rows_reference(student, ids, lp, lp.exp() * 1000.0, temperature=t)
    torch.testing.assert_close(got, _dense_kl(student, teacher, t))


def test_padding_slots_are_ignored_and_gradcheck_passes():
    teacher, student = _logits(2), _logits(3).requires_grad_(True)
    ids, lp, counts = _draws(teacher, 1, n=6)
    assert (counts == 0).any()  # padding present
    for t in (1.0, 2.0):
        torch.autograd.gradcheck(
            lambda z, t=t: sampled_kl_rows_reference(z, ids, lp, counts, temperature=t), (student,)
        )
    garbage = torch.where(counts > 0, lp, torch.full_like(lp, 7.0))
    torch.testing.assert_close(sampled_kl_rows_reference(student, ids, garbage, counts),
                               sampled_kl_rows_reference(student, ids, lp, counts))  # fmt: skip


def test_a_draw_without_a_student_id_is_refused():
    ids = torch.tensor([[3, -1]])
    with pytest.raises(ValueError, match="carried form"):
        sampled_kl_rows_reference(torch.zeros(1, 5), ids, torch.tensor([[-0.1, -2.0]]), torch.tensor([[3.0, 1.0]]))


def _mean_and_se(per_draw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the first axis and its standard error."""
    return per_draw.mean(0), per_draw.std(0) / per_draw.shape[0] ** 0.5


def _unseen(m: int, n: int = N) -> float:
    """How far a mean over m sets of n draws may sit from its expectation where the sample standard error says 0:
    a token of probability q is never drawn in m n draws with probability (1 - q)^(m n), so tokens below about
    5 / (m n) can be missed by every set (then every set agrees, and the sample se is 0, though the mean misses their
    mass); each unit of missed mass moves a gradient entry by at most 2."""
    return 2 * 5 / (m * n)


def _grad_per_draw(fn, student: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [m, R], gradients [m, R, V]) of ``fn(logits [m * R, V])`` summed per row, one set of draws each."""
    z = student.repeat(m, 1).requires_grad_(True)
    d = fn(z)
    d.sum().backward()
    return d.detach().view(m, R), z.grad.view(m, R, V)


def test_t1_estimate_and_gradient_are_unbiased():
    """At T=1 the expectation of the value is KL(p || s) and of the gradient s - p (the full-vocabulary KL's)."""
    teacher, student = _logits(4), _logits(5, 1.0)
    m = 4000
    ids, lp, counts = _draws(teacher, m)
    values, grads = _grad_per_draw(lambda z: sampled_kl_rows_reference(z, ids, lp, counts), student, m)
    s = student.requires_grad_(True)
    dense = _dense_kl(s, teacher, 1.0)
    (dense_grad,) = torch.autograd.grad(dense.sum(), s)
    mean, se = _mean_and_se(grads)
    assert ((mean - dense_grad).abs() <= 5 * se + _unseen(m)).all(), float(((mean - dense_grad).abs() / se).max())
    vmean, vse = _mean_and_se(values)
    assert ((vmean - dense.detach()).abs() <= 5 * vse).all()


def test_tempered_gradient_matches_the_dense_formula_in_expectation():
    """At T=2 (self-normalised weights: consistent, O(1/N) bias) the mean gradient, times T^2 as the loss applies
    it, is the dense tempered KL's within sampling error plus a bias that shrinks with N. Measured here: 12% of the
    largest gradient entry at N=12, 0.1% at N=96 (docs/training.md, "rs_kl")."""
    teacher, student = _logits(6), _logits(7, 1.0)
    t, m = 2.0, 3000
    s = student.clone().requires_grad_(True)
    (dense_grad,) = torch.autograd.grad(_dense_kl(s, teacher, t).sum() * t**2, s)
    gaps = []
    for n in (12, 96):
        ids, lp, counts = _draws(teacher, m, n)
        fn = lambda z, a=(ids, lp, counts): sampled_kl_rows_reference(z, *a, temperature=t) * t**2  # noqa: E731
        _, grads = _grad_per_draw(fn, student, m)
        mean, se = _mean_and_se(grads)
        gap = ((mean - dense_grad).abs() - 5 * se).clamp_min(0).max()
        gaps.append(float(gap))
    scale = float(dense_grad.abs().max())
    assert gaps[0] < 0.2 * scale and gaps[1] < 0.02 * scale and gaps[1] < gaps[0] / 4, (gaps, scale)


def test_carried_weights_give_the_mapped_gradient_in_expectation():
    """Another tokenizer: each draw's weight carried to its student id (several teacher ids onto one, some onto
    none: the remainder bucket, on the student tokens outside the map's image); its mean gradient is the gradient of
    the KL to the teacher's full distribution carried the same way."""
    teacher = _logits(8)
    student_v = 12
    # teacher ids 0, 7, 14, ... map to nothing; student ids 10 and 11 are no teacher token's image
    to_student = torch.tensor([i % 10 if i % 7 else -1 for i in range(V)])
    student = torch.randn(R, student_v, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    p = torch.softmax(teacher, -1)
    mapped = to_student >= 0
    dense_mass = torch.zeros(R, student_v, dtype=torch.float64).index_add_(1, to_student[mapped], p[:, mapped])
    dense_ids = torch.where(dense_mass > 0, torch.arange(student_v), -1)  # ids 10, 11: no teacher token's image
    s = student.clone().requires_grad_(True)
    dense = topk_kl_rows_reference(s, dense_ids, dense_mass.log(), tail=True)
    (dense_grad,) = torch.autograd.grad(dense.sum(), s)

    m = 3000
    ids, lp, counts = _draws(teacher, m)
    log_w = sampled_weights_reference(lp, counts)
    sid = torch.where(ids >= 0, to_student[ids.clamp_min(0)], -1)
    mass = torch.zeros(m * R, student_v, dtype=torch.float64)
    ok = (sid >= 0) & (counts > 0)
    mass.index_put_((torch.nonzero(ok)[:, 0], sid[ok]), log_w[ok].exp(), accumulate=True)
    z = student.repeat(m, 1).requires_grad_(True)
    log_mass = torch.where(mass > 0, mass.log(), -torch.inf)
    cand = torch.where(mass > 0, torch.arange(student_v).repeat(m * R, 1), -1)
    outside = torch.ones(student_v, dtype=torch.bool)
    outside[to_student[mapped]] = False
    d = carried_sampled_kl_rows_reference(z, cand, log_mass, outside[:11])  # id 11: outside by its absence
    # the dense reference's tail bucket is exactly the student's mass outside the image
    torch.testing.assert_close(carried_sampled_kl_rows_reference(s.detach(), dense_ids, dense_mass.log(), outside),
                               dense.detach())  # fmt: skip
    d.sum().backward()
    mean, se = _mean_and_se(z.grad.view(m, R, student_v))
    # row 1's teacher puts almost all its mass on one token: no set of draws sees the rest, so se is 0 there
    assert ((mean - dense_grad).abs() <= 5 * se + _unseen(m)).all()
