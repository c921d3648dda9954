"""The top-K KL reference (same-vocabulary students) against hand computation, gradcheck and its edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_cache.kernels.reference import topk_kl_loss_reference
from fusion_cache.kernels.reference import topk_kl_rows_reference


def _by_hand(student_row: list[float], ids: list[int], teacher_lp: list[float]) -> float:
    """KL over the teacher's top-K plus the tail bucket, in plain Python."""
    z = max(student_row)
    log_norm = z + math.log(sum(math.exp(v - z) for v in student_row))
    q = [math.exp(student_row[i] - log_norm) for i in ids]
    p = [math.exp(v) for v in teacher_lp]
    kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    p_tail, q_tail = 1 - sum(p), 1 - sum(q)
    return kl + (p_tail * math.log(p_tail / q_tail) if p_tail > 0 else 0.0)


def _teacher(n: int, v: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(k, dim=-1)
    return logits, top.indices, top.values


def test_matches_hand_computation():
    student = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)
    ids = torch.tensor([[3, 0, 4], [1, 2, 0]])
    teacher = torch.tensor([[-0.4, -1.5, -2.9], [-1.0, -1.3, -2.2]], dtype=torch.float64)
    got = topk_kl_rows_reference(student, ids, teacher)
    want = [_by_hand(student[i].tolist(), ids[i].tolist(), teacher[i].tolist()) for i in range(2)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_zero_when_the_student_is_the_teacher_and_positive_otherwise():
    logits, ids, lp = _teacher(8, 40, 6)
    torch.testing.assert_close(topk_kl_rows_reference(logits, ids, lp), torch.zeros(8, dtype=torch.float64))
    other = logits + torch.randn_like(logits)
    assert bool((topk_kl_rows_reference(other, ids, lp) > 0).all())
    # renormalized variant (no tail): KL(p^ || q^) - log(sum q), so -log(sum q) at the teacher
    want = -torch.log(lp.exp().sum(-1))
    torch.testing.assert_close(topk_kl_rows_reference(logits, ids, lp, tail=False), want)


def test_gradcheck_double():
    logits, ids, lp = _teacher(4, 12, 5)
    x = (logits + torch.randn_like(logits)).requires_grad_()
    w = torch.rand(4, dtype=torch.float64)
    for tail in (True, False):
        assert torch.autograd.gradcheck(
            lambda t, tail=tail: topk_kl_loss_reference(t, ids, lp, row_weights=w, reduction="sum", tail=tail), (x,)
        )


def test_k_uses_the_first_entries_and_masked_rows_are_ignored():
    logits, ids, lp = _teacher(5, 30, 8)
    student = torch.randn(5, 30, dtype=torch.float64)
    torch.testing.assert_close(
        topk_kl_rows_reference(student, ids, lp, k=3), topk_kl_rows_reference(student, ids[:, :3], lp[:, :3])
    )
    student[2] = float("nan")
    mask = torch.tensor([True, True, False, True, True])
    per_row = topk_kl_loss_reference(student, ids, lp, mask, reduction="none")
    assert per_row[2] == 0 and bool(torch.isfinite(per_row).all())
    x = student.clone().requires_grad_()
    topk_kl_loss_reference(x, ids, lp, mask).backward()
    assert bool((x.grad[2] == 0).all())


def test_ids_outside_the_student_vocabulary_are_refused():
    logits, ids, lp = _teacher(2, 30, 4)
    with pytest.raises(ValueError, match=r"vocabulary \[0, 20\)"):
        topk_kl_rows_reference(logits[:, :20], ids, lp)
