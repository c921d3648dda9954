"""The Triton in-place cross-entropy gradient (kernels/ce.py) against PyTorch: loss, gradient, argmax, ignored rows."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 7), (13, 301), (6, 5000)], ids=lambda s: f"N{s[0]}-V{s[1]}")
def test_matches_torch(triton_uld, device, shape, dtype):
    ce_mod = importlib.import_module("fusion_cache.kernels.ce")
    n, v = shape
    g = torch.Generator().manual_seed(n * 7 + v)
    x = (torch.randn(n, v, generator=g) * 3).to(device, dtype)
    x[:, v // 2] = x.max() + 1  # a clear maximum mid-row, and a tie at the end: argmax takes the first
    x[0, -1] = x[0, v // 2]
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[1::3] = ce_mod.IGNORE_INDEX
    scale = (torch.rand(n, generator=g) + 0.5).to(device)

    ref = x.float().clone().requires_grad_()
    per_row = F.cross_entropy(ref, labels, ignore_index=ce_mod.IGNORE_INDEX, reduction="none")
    (per_row * scale).sum().backward()
    want_argmax = x.argmax(-1)

    buf = x.clone()
    loss, argmax = ce_mod.ce_grad_inplace(buf, labels, scale)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(loss, per_row.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buf.float(), ref.grad.to(dtype).float(), **tol)
    assert torch.equal(argmax, want_argmax)
    ignored = labels == ce_mod.IGNORE_INDEX
    assert (buf[ignored] == 0).all() and (loss[ignored] == 0).all()


def test_refuses_a_non_unit_column_stride(triton_uld, device):
    ce_mod = importlib.import_module("fusion_cache.kernels.ce")
    x = torch.randn(8, 4, device=device).t()
    with pytest.raises(ValueError, match="unit column stride"):
        ce_mod.ce_grad_inplace(x, torch.zeros(4, dtype=torch.int64, device=device), torch.ones(4, device=device))
