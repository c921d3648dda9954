"""The ULD reference against hand-computed cases, gradcheck, and its masking / truncation / weighting rules."""

from __future__ import annotations

import math

import pytest
import torch

from fusion_cache.kernels.reference import standardized_probs
from fusion_cache.kernels.reference import uld_loss_reference
from fusion_cache.kernels.reference import uld_rows_reference


def _by_hand(student_row: list[float], teacher_row: list[float], k: int) -> float:
    """Direct transcription of the definition in kernels/reference.py's docstring for one row, in plain Python."""

    def probs(vals: list[float]) -> list[float]:
        top = sorted(vals, reverse=True)[:k]
        mean = sum(top) / k
        std = math.sqrt(sum((v - mean) ** 2 for v in top) / (k - 1))
        z = [(v - mean) / (std + 1e-7) for v in top]
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    return sum(abs(a - b) for a, b in zip(probs(student_row), probs(teacher_row), strict=True))


def test_matches_hand_computation():
    student = [[2.0, -1.0, 0.5, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]]
    teacher = [[-0.1, -1.5, -2.0, -4.0], [-1.0, -1.1, -1.2, -9.0]]
    got = uld_rows_reference(torch.tensor(student), torch.tensor(teacher), k=3)
    want = [_by_hand(student[i], teacher[i], 3) for i in range(2)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_zscore_makes_logprobs_and_logits_equivalent():
    logits = torch.randn(6, 50) * 3
    teacher_logits = torch.randn(6, 50).sort(dim=-1, descending=True).values[:, :10]
    teacher_logprobs = teacher_logits - torch.randn(6, 1).abs() * 5  # any per-row constant shift
    a = uld_rows_reference(logits, teacher_logits, k=10)
    b = uld_rows_reference(logits, teacher_logprobs, k=10)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_identical_distributions_give_zero_and_range_is_0_to_2():
    logits = torch.randn(4, 30)
    teacher = logits.topk(10).values - 7.0
    assert uld_rows_reference(logits, teacher, k=10).abs().max() < 1e-6
    d = uld_rows_reference(torch.randn(64, 30) * 10, torch.randn(64, 10).sort(descending=True).values, k=10)
    assert (d >= 0).all() and (d <= 2).all()


def test_gradcheck_double():
    torch.manual_seed(0)
    logits = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 7, dtype=torch.float64).sort(dim=-1, descending=True).values
    w = torch.rand(5, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False])
    for zscore, softmax in [(True, True), (False, True), (True, False)]:

        def fn(x, zscore=zscore, softmax=softmax):
            return uld_loss_reference(x, teacher, mask, w, k=4, zscore=zscore, softmax=softmax, reduction="sum")

        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-5)


def test_gradient_only_at_selected_entries():
    logits = torch.randn(3, 40, requires_grad=True)
    teacher = torch.randn(3, 8).sort(dim=-1, descending=True).values
    uld_loss_reference(logits, teacher, k=5).backward()
    selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.detach().topk(5).indices, True)
    assert (logits.grad[~selected] == 0).all()
    assert (logits.grad[selected] != 0).any()


def test_masked_rows_contribute_nothing_even_if_nan():
    logits = torch.randn(4, 20, requires_grad=True)
    teacher = torch.randn(4, 6).sort(dim=-1, descending=True).values
    teacher[1] = float("nan")
    mask = torch.tensor([True, False, True, True])
    loss = uld_loss_reference(logits, teacher, mask, k=6)
    loss.backward()
    assert torch.isfinite(loss)
    assert (logits.grad[1] == 0).all()
    full = uld_loss_reference(logits.detach()[mask], teacher[mask], k=6)
    torch.testing.assert_close(loss.detach(), full)


def test_all_rows_masked_gives_zero_loss_and_zero_grad():
    logits = torch.randn(3, 20, requires_grad=True)
    loss = uld_loss_reference(logits, torch.randn(3, 6), torch.zeros(3, dtype=torch.bool), k=6)
    loss.backward()
    assert loss.item() == 0.0
    assert (logits.grad == 0).all()


def test_k_truncates_to_the_common_k():
    logits = torch.randn(4, 30)
    teacher = torch.randn(4, 64).sort(dim=-1, descending=True).values
    a = uld_rows_reference(logits, teacher, k=10)
    b = uld_rows_reference(logits, teacher[:, :10], k=10)
    c = uld_rows_reference(logits, teacher[:, :10], k=50)  # student K larger than teacher Kt: min wins
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_weights_and_reductions():
    logits = torch.randn(5, 20)
    teacher = torch.randn(5, 6).sort(dim=-1, descending=True).values
    d = uld_loss_reference(logits, teacher, k=6, reduction="none")
    w = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.4])
    torch.testing.assert_close(uld_loss_reference(logits, teacher, None, w, k=6, reduction="sum"), (w * d).sum())
    torch.testing.assert_close(uld_loss_reference(logits, teacher, k=6), d.mean())
    with pytest.raises(ValueError, match="reduction"):
        uld_loss_reference(logits, teacher, k=6, reduction="max")


def test_bf16_logits_close_to_fp32():
    logits = torch.randn(8, 100) * 4
    teacher = torch.randn(8, 10).sort(dim=-1, descending=True).values
    a = uld_rows_reference(logits, teacher, k=10)
    b = uld_rows_reference(logits.bfloat16(), teacher, k=10)
    torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_zscore_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        uld_rows_reference(torch.randn(2, 5), torch.randn(2, 1), k=1)


def test_temperature_flattens():
    vals = torch.tensor([[3.0, 1.0, 0.0, -2.0]])
    sharp = standardized_probs(vals, temperature=0.5)
    flat = standardized_probs(vals, temperature=4.0)
    assert sharp[0, 0] > flat[0, 0]
    torch.testing.assert_close(sharp.sum(-1), torch.ones(1))


def test_topk_canonical_breaks_ties_by_lower_index():
    from fusion_cache.kernels.reference import topk_canonical

    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    assert topk_canonical(x, 2).tolist() == [[1, 2], [0, 1], [5, 4]]
    assert topk_canonical(x, 4).tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [5, 4, 3, 2]]
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(-2, 3, (16, 300), generator=g).float()
    want = torch.sort(ints, dim=-1, descending=True, stable=True).indices[:, :20]
    assert torch.equal(topk_canonical(ints, 20), want)


def test_gradient_goes_to_the_canonical_entries_on_ties():
    logits = torch.tensor([[2.0, 1.0, 2.0, 2.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-0.1, -2.0]])
    uld_loss_reference(logits, teacher, k=2).backward()
    assert logits.grad[0, 3] == 0 and logits.grad[0, 0] != 0 and logits.grad[0, 2] != 0


def test_tail_bucket_by_hand_and_gradcheck():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[-0.3, -1.8, -2.5]], dtype=torch.float64)  # log-probs: tail 1 - sum(exp)
    p = torch.softmax(logits, -1)[0, [3, 0]]
    t = teacher[0, :2].exp()
    want = (p - t).abs().sum() + ((1 - p.sum()) - (1 - t.sum())).abs()
    got = uld_rows_reference(logits, teacher, k=2, zscore=False, tail=True)
    torch.testing.assert_close(got, want[None])
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    tv = torch.log_softmax(torch.randn(4, 9, dtype=torch.float64), -1).topk(3).values

    def fn(x):
        return uld_loss_reference(x, tv, k=3, zscore=False, tail=True, reduction="sum")

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)
    fn(x).backward()
    assert (x.grad != 0).all()  # the tail reaches every logit through the logsumexp
    with pytest.raises(ValueError, match="tail-mass"):
        uld_rows_reference(logits, teacher, k=2, tail=True)
