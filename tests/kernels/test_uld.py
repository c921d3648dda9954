"""The Triton ULD kernel against kernels/reference.py: forward values and logits gradients on a grid of shapes,
dtypes and variants (interpreted on CPU, small shapes), masks, ties, K != Kt and strided rows."""

from __future__ import annotations

import warnings

import pytest
import torch

from fusion_cache.kernels.reference import uld_loss_reference

# per-dtype tolerances (distance, gradient); bf16 gradients are rounded to bf16 on both sides
TOL = {
    torch.float32: (dict(atol=2e-5, rtol=1e-4), dict(atol=1e-6, rtol=1e-4)),
    torch.bfloat16: (dict(atol=2e-5, rtol=1e-4), dict(atol=1e-2, rtol=1.6e-2)),
}

# (N, V, K, Kt): awkward sizes, K > Kt, K < Kt, K = V, more rows than one interpreter program takes
SHAPES = [(1, 16, 4, 4), (37, 1423, 37, 37), (16, 300, 10, 12), (9, 200, 16, 8), (70, 33, 33, 40), (3, 4100, 5, 5)]
VARIANTS = [
    dict(zscore=True, softmax=True, temperature=1.0),
    dict(zscore=False, softmax=True, temperature=2.0),
    dict(zscore=True, softmax=False, temperature=1.0),
    dict(zscore=True, softmax=True, temperature=0.5),
    dict(zscore=False, softmax=True, temperature=1.0, tail=True),
]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():  # the interpreter's numpy warns on the garbage of masked rows
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def _compare(triton_uld, logits, teacher, mask, *, k, dtype, **variant):
    """Forward [N] and logits gradient under a random grad_output, kernel vs reference."""
    x = logits.to(dtype).requires_grad_()
    grad_out = torch.rand(logits.shape[0], device=logits.device) + 0.5
    d = _quiet(triton_uld.uld_rows_triton, x, teacher, mask, k=k, **variant)
    _quiet(d.backward, grad_out)
    got = x.grad.clone()
    x.grad = None
    want = uld_loss_reference(x, teacher, mask, k=k, reduction="none", **variant)
    want.backward(grad_out)
    tol_d, tol_g = TOL[dtype]
    torch.testing.assert_close(d, want.detach(), **tol_d)
    torch.testing.assert_close(got.float(), x.grad.float(), **tol_g)
    assert got.dtype == dtype
    return d, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-V{}-K{}-Kt{}".format(*s))
def test_matches_reference_on_grid(triton_uld, device, shape, dtype):
    n, v, k, kt = shape
    g = torch.Generator().manual_seed(n * 1000 + v)
    logits = (torch.randn(n, v, generator=g) * 3).to(device)
    teacher = torch.randn(n, kt, generator=g).sort(dim=-1, descending=True).values.to(device)
    mask = (torch.rand(n, generator=g) > 0.25).to(device)
    variant = VARIANTS[sum(shape) % 4]
    _compare(triton_uld, logits, teacher, mask, k=k, dtype=dtype, **variant)


def _variant_id(v: dict) -> str:
    return "z{zscore}-sm{softmax}-t{temperature}".format(**v) + ("-tail" if v.get("tail") else "")


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_every_variant(triton_uld, device, variant):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(12, 257, generator=g) * 2).to(device)
    teacher = torch.randn(12, 10, generator=g).sort(dim=-1, descending=True).values.to(device)
    _compare(
        triton_uld,
        logits,
        teacher,
        torch.ones(12, dtype=torch.bool, device=device),
        k=10,
        dtype=torch.float32,
        **variant,
    )


def test_max_k_128(triton_uld, device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 700, generator=g).to(device)
    teacher = torch.randn(3, 130, generator=g).sort(dim=-1, descending=True).values.to(device)
    _compare(triton_uld, logits, teacher, None, k=128, dtype=torch.float32)
    with pytest.raises(ValueError, match="K <= 128"):
        triton_uld.uld_rows_triton(torch.randn(2, 300, device=device), torch.randn(2, 200, device=device), k=129)


@pytest.mark.slow
def test_widest_vocabulary_262144(triton_uld, device):
    """Gemma's 262,144-entry vocabulary: the running top-K crosses many vocabulary blocks, the answer sits at the
    end of the row."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 262_144, generator=g).to(device)
    logits[0, -3:] += 8.0  # the top entries in the last block
    teacher = torch.randn(2, 10, generator=g).sort(dim=-1, descending=True).values.to(device)
    _compare(triton_uld, logits, teacher, None, k=10, dtype=torch.float32)


def test_every_row_masked_gives_zero_loss_and_zero_gradient(triton_uld, device):
    logits = torch.randn(5, 64, device=device)
    logits[2] = float("nan")  # garbage in a masked row must not leak
    teacher = torch.full((5, 8), float("nan"), device=device)
    x = logits.requires_grad_()
    d = _quiet(triton_uld.uld_rows_triton, x, teacher, torch.zeros(5, dtype=torch.bool, device=device), k=8)
    _quiet(d.sum().backward)
    assert (d == 0).all()
    assert (x.grad == 0).all()


def test_ties_follow_the_reference(triton_uld, device):
    """Integer logits: many values tie inside the top-K and at the K-th boundary (also across chunk borders)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (20, 2600), generator=g).float().to(device)
    teacher = torch.randn(20, 12, generator=g).sort(dim=-1, descending=True).values.to(device)
    mask = torch.ones(20, dtype=torch.bool, device=device)
    # without the z-score: the top 12 values are often all equal, and then the z-score's gradient is scaled by 1/eps,
    # which turns rounding-order differences (a GPU's reductions against the CPU's) into large absolute ones
    _, grad = _compare(triton_uld, logits, teacher, mask, k=12, dtype=torch.float32, zscore=False, softmax=True)
    # the gradient is on exactly K entries per row, the lowest-index ones among equal values
    assert ((grad != 0).sum(-1) <= 12).all()
    # with the z-score: the same entries are selected and the distances agree
    d, idx, _, _ = _quiet(
        triton_uld.uld_rows_forward, logits, teacher, mask, k=12, zscore=True, softmax=True, temperature=1.0, eps=1e-7
    )
    want = uld_loss_reference(logits, teacher, mask, k=12, reduction="none")
    torch.testing.assert_close(d, want, atol=2e-5, rtol=1e-4)
    from fusion_cache.kernels.reference import topk_canonical

    assert torch.equal(idx, topk_canonical(logits, 12))


def test_strided_rows_and_errors(triton_uld, device):
    big = torch.randn(6, 500, device=device)
    logits = big[:, :300]  # row stride 500 != V
    teacher = torch.randn(6, 10, device=device).sort(dim=-1, descending=True).values
    _compare(triton_uld, logits, teacher, None, k=10, dtype=torch.float32)
    with pytest.raises(ValueError, match="row count"):
        triton_uld.uld_rows_triton(torch.randn(3, 20, device=device), torch.randn(2, 5, device=device))
    with pytest.raises(ValueError, match="at least 2"):
        triton_uld.uld_rows_triton(torch.randn(3, 20, device=device), torch.randn(3, 1, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tail_bucket_matches_reference(triton_uld, device, dtype):
    """The tail-mass variant: teacher log-probs, dense gradient through the row's logsumexp, several V chunks."""
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(10, 4500, generator=g) * 3).to(device)
    logits[:, :3] += 12  # a peaked student, so the top-K carries real mass
    teacher = torch.log_softmax(torch.randn(10, 4500, generator=g) * 4, -1).topk(8).values.to(device)
    mask = torch.tensor([True] * 7 + [False] * 3, device=device)
    _compare(triton_uld, logits, teacher, mask, k=8, dtype=dtype, zscore=False, tail=True)
    with pytest.raises(ValueError, match="tail-mass"):
        triton_uld.uld_rows_triton(logits, teacher, k=8, tail=True)  # zscore defaults to True


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda v: f"z{v['zscore']}-sm{v['softmax']}-t{v['temperature']}")
def test_compact_backward_is_the_dense_gradient_at_the_selected_entries(triton_uld, device, variant):
    """uld_rows_backward_compact [N, K] == the dense [N, V] gradient gathered at the forward's indices, and the
    dense gradient is zero everywhere else (what kernels/fused_linear.py relies on to skip two matmuls)."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(13, 333, generator=g) * 2).to(device)
    teacher = torch.randn(13, 9, generator=g).sort(dim=-1, descending=True).values.to(device)
    mask = (torch.rand(13, generator=g) > 0.3).to(device)
    grad_d = (torch.rand(13, generator=g) + 0.5).to(device)
    opts = dict(eps=1e-7, **variant)
    dist, idx, val, _ = _quiet(triton_uld.uld_rows_forward, logits, teacher, mask, k=8, **opts)
    dense = _quiet(
        triton_uld.uld_rows_backward, grad_d, tuple(logits.shape), torch.float32, teacher, mask, idx, val, **opts
    )
    compact = _quiet(triton_uld.uld_rows_backward_compact, grad_d, teacher, mask, idx, val, **opts)
    assert compact.shape == (13, 8) and compact.dtype == torch.float32
    torch.testing.assert_close(compact, dense.gather(1, idx), atol=0, rtol=0)
    rest = dense.clone()
    rest.scatter_(1, idx, 0.0)
    assert (rest == 0).all()
    assert (compact[~mask] == 0).all()
    assert (compact[mask] != 0).any()
