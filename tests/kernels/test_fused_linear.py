"""The chunked fused lm_head + ULD (+ CE) path against the dense computation, for both per-chunk backends."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fusion_cache.kernels.fused_linear import chunk_size_for
from fusion_cache.kernels.fused_linear import fused_linear_uld_loss
from fusion_cache.kernels.fused_linear import uld_row_coefficients
from fusion_cache.kernels.reference import uld_loss_reference


def _dense(hidden, weight, bias, teacher, mask, weights, labels, *, reduction, ce_w, uld_w, k):
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    uld = uld_loss_reference(logits, teacher, mask, weights, k=k, reduction=reduction)
    ce = F.cross_entropy(logits.float(), labels) if labels is not None else torch.zeros((), device=logits.device)
    return ce_w * ce + uld_w * uld, ce, uld


CASES = [
    # (N, H, V, Kt, dtype, reduction, chunk, with bias, with labels)
    (37, 16, 301, 12, torch.float32, "sum", 8, True, True),
    (20, 8, 150, 6, torch.float32, "mean", None, False, True),
    (19, 16, 200, 10, torch.bfloat16, "sum", 4, False, True),
    (12, 8, 100, 10, torch.float32, "mean", 5, True, False),
    # no labels, a bf16 weight and rows that pick the same vocabulary entries: the sparse path's fp32 accumulation
    (24, 16, 40, 10, torch.bfloat16, "sum", 16, True, False),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-V{c[2]}-{str(c[4])[6:]}-{c[5]}-chunk{c[6]}")
def test_matches_dense(request, device, backend, case):
    """Both backends on the test device; the Triton one without labels takes the sparse gradient path."""
    if backend == "triton":
        request.getfixturevalue("triton_uld")
    n, h, v, kt, dtype, reduction, chunk, with_bias, with_labels = case
    g = torch.Generator().manual_seed(n + v)
    hidden = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / 3).to(device, dtype).requires_grad_()
    bias = torch.randn(v, generator=g).to(device, dtype).requires_grad_() if with_bias else None
    teacher = torch.randn(n, kt, generator=g).sort(dim=-1, descending=True).values.to(device)
    mask = (torch.rand(n, generator=g) > 0.2).to(device)
    weights = torch.rand(n, generator=g).to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device) if with_labels else None
    if labels is not None:
        labels[::4] = -100
    params = [p for p in (hidden, weight, bias) if p is not None]
    opts = dict(reduction=reduction, k=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, ce, uld, _ = fused_linear_uld_loss(
            hidden,
            weight,
            teacher,
            mask,
            weights,
            labels,
            bias,
            ce_weight=0.3,
            uld_weight=0.7,
            backend=backend,
            chunk_size=chunk,
            **opts,
        )
    (loss * 1.7).backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    want, ce_want, uld_want = _dense(hidden, weight, bias, teacher, mask, weights, labels, ce_w=0.3, uld_w=0.7, **opts)
    (want * 1.7).backward()
    # fp32 on a GPU: cuBLAS and the gather may sum in another order; bf16 weights are rounded once per chunk
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss.float(), want.float(), **tol)
    torch.testing.assert_close(ce.float(), ce_want.float(), **tol)
    torch.testing.assert_close(uld.float(), uld_want.float(), **tol)
    for a, p in zip(got, params, strict=True):
        scale = p.grad.float().abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a.float() / scale, p.grad.float() / scale, **tol)


def test_all_rows_masked_and_no_labels_gives_zero():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss, ce, uld, _ = fused_linear_uld_loss(hidden, weight, torch.randn(6, 5), torch.zeros(6, dtype=torch.bool), k=5)
    loss.backward()
    assert loss.item() == 0.0 and ce.item() == 0.0 and uld.item() == 0.0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_chunk_size_like_liger_with_a_floor():
    # Liger: ceil(V/H) = 38 -> ceil(8192/38) = 216 -> 256; the floor H/4 = 1024 rows wins
    assert chunk_size_for(8192, 151936, 4096) == 1024
    assert chunk_size_for(1024, 32768, 4096) == 1024
    assert chunk_size_for(100_000, 32768, 4096) == 16384  # Liger's rule above the floor: ceil(100000/8) -> 16384
    assert chunk_size_for(5, 100, 4096) == 8  # never more than N rounded up to a power of two
    assert chunk_size_for(600, 151936, 576) == 256  # a 135M student: H/4 = 144 -> 256


def test_row_coefficients():
    mask = torch.tensor([True, False, True])
    w = torch.tensor([1.0, float("nan"), 3.0])
    torch.testing.assert_close(uld_row_coefficients(mask, w, "sum"), torch.tensor([1.0, 0.0, 3.0]))
    torch.testing.assert_close(uld_row_coefficients(mask, None, "mean"), torch.tensor([0.5, 0.0, 0.5]))
    with pytest.raises(ValueError, match="reduction"):
        uld_row_coefficients(mask, None, "none")
