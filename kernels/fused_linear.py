"""Chunked fused lm_head + ULD (+ CE): the [N, V] logits are never materialized whole.

Input hidden states [N, H] and the lm_head weight [V, H]. Rows are processed in chunks of C; per chunk the logits
[C, V] are computed, the ULD distances (and the CE on the same logits, so both losses share one pass) and their
gradient with respect to the logits are taken at once, and that gradient is folded immediately into the gradients
of the hidden states [N, H] and the weight [V, H]. Peak extra memory is O(C x V), not O(N x V). As in Liger's
fused-linear losses, the gradients are computed in the forward (the loss is a scalar) and backward only scales them
by grad_output.

The per-chunk ULD can be the Triton kernel (`backend="triton"`) or the PyTorch reference (`backend="torch"`,
autograd on the chunk), so the same path runs on CPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fusion_cache.kernels.reference import uld_loss_reference

IGNORE_INDEX = -100


class FusedLinearOutput(NamedTuple):
    """What the fused path returns: only ``loss`` carries a graph."""

    loss: torch.Tensor  # ce_weight * ce + uld_weight * uld
    ce: torch.Tensor  # mean CE over labelled rows (0 without labels)
    uld: torch.Tensor  # the ULD term with its reduction
    argmax: torch.Tensor  # [N] int64 argmax of each row's logits (for top-1 metrics, free in the same pass)


def chunk_size_for(n: int, v: int, h: int) -> int:
    """Rows per chunk: Liger's rule, with a floor that amortizes the weight gradient's update.

    Liger sizes the [C, V] logits chunk like the [N, H] hidden states: ``inc_factor = ceil(V / H)``,
    ``C = next_power_of_2(ceil(N / inc_factor))``. Every chunk also reads and writes the whole [V, H] weight gradient
    once (``addmm_``), which at C = 256, V = 151936, H = 4096 is most of the non-matmul time on an H100. So C is at
    least ``H / 4`` rows (capped by N): a [H / 4, V] chunk is a quarter of the [V, H] weight gradient that is held
    anyway, so peak memory stays O(V x H + N x H), never O(N x V).
    """
    inc_factor = max(math.ceil(v / max(h, 1)), 1)
    rows = max(math.ceil(n / inc_factor), 1, min(n, h // 4))
    return 1 << (rows - 1).bit_length()


def uld_row_coefficients(
    row_mask: torch.Tensor, row_weights: torch.Tensor | None, reduction: str, dtype=torch.float32
) -> torch.Tensor:
    """[N] coefficients c with ``loss = sum_i c_i d_i``, matching `uld_loss_reference`'s "sum" and "mean"."""
    mask = row_mask.to(dtype)
    w = mask if row_weights is None else torch.where(row_mask, row_weights.to(dtype), torch.zeros_like(mask))
    if reduction == "sum":
        return w
    if reduction == "mean":
        total = mask.sum() if row_weights is None else w.sum().clamp_min(1e-12)
        return w / total if bool(row_mask.any()) else w * 0.0
    raise ValueError(f"reduction must be 'mean' or 'sum' for the fused path, got {reduction!r}")


def _chunk_uld_grad(logits, teacher, mask, coef, *, backend, k, opts):
    """(sum_i coef_i d_i, gradient of it w.r.t. the chunk's logits in fp32) for one chunk."""
    if backend == "triton":
        from fusion_cache.kernels.uld import uld_rows_backward
        from fusion_cache.kernels.uld import uld_rows_forward

        dist, idx, val, lse = uld_rows_forward(logits, teacher, mask, k=k, **opts)
        grad = uld_rows_backward(
            coef, tuple(logits.shape), torch.float32, teacher, mask, idx, val, logits=logits, lse=lse, **opts
        )
        return (dist * coef).sum(), grad
    with torch.enable_grad():  # autograd.Function.forward runs with grad mode off
        x = logits.detach().float().requires_grad_()
        d = uld_loss_reference(x, teacher, mask, k=k, reduction="none", **opts)
        total = (d * coef).sum()
        (grad,) = torch.autograd.grad(total, x)
    return total.detach(), grad


def _chunk_ce_grad(logits, labels, scale):
    """(sum of the chunk's CE over labelled rows, scale * (softmax - onehot) [C, V] fp32, 0 at ignored rows)."""
    keep = labels != IGNORE_INDEX
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    picked = lf.gather(1, safe[:, None])[:, 0]
    ce = torch.where(keep, lse - picked, torch.zeros_like(lse)).sum()
    g = torch.exp(lf - lse[:, None])
    g.scatter_add_(1, safe[:, None], -torch.ones_like(picked)[:, None])
    return ce, g * (keep.to(torch.float32) * scale)[:, None]


def _chunk_uld_grad_sparse(logits, teacher, mask, coef, k, opts):
    """(sum_i coef_i d_i, selected indices [C, K] int64, gradient at them [C, K] fp32) through the Triton kernels."""
    from fusion_cache.kernels.uld import uld_rows_backward_compact
    from fusion_cache.kernels.uld import uld_rows_forward

    dist, idx, val, _ = uld_rows_forward(logits, teacher, mask, k=k, **opts)
    no_tail = {key: value for key, value in opts.items() if key != "tail"}
    g_sel = uld_rows_backward_compact(coef, teacher, mask, idx, val, **no_tail)
    return (dist * coef).sum(), idx, g_sel


def _fold_sparse_grad(idx, g_sel, h_c, weight, grad_hidden_c, grad_weight, grad_bias):
    """Add the chunk's contribution of a logits gradient that is ``g_sel`` [C, K] at ``idx`` [C, K] and 0 elsewhere.

    grad_hidden_c [C, H] (a view, written in place) = sum_k g_sel[c, k] * W[idx[c, k]]; grad_weight [V, H] gets
    g_sel[c, k] * h_c[c] added at row idx[c, k]. Sums run in fp32 and are rounded once per chunk, as the dense matmul
    path does (a weight row picked by many rows of the chunk is accumulated before rounding).
    """
    h = h_c.shape[1]
    w_sel = weight[idx].float()  # [C, K, H]
    grad_hidden_c.copy_(torch.bmm(g_sel[:, None, :], w_sel)[:, 0])
    rows, inverse = torch.unique(idx.reshape(-1), return_inverse=True)
    contrib = (g_sel[:, :, None] * h_c.float()[:, None, :]).reshape(-1, h)
    acc = torch.zeros(rows.shape[0], h, dtype=torch.float32, device=h_c.device).index_add_(0, inverse, contrib)
    grad_weight.index_add_(0, rows, acc.to(grad_weight.dtype))
    if grad_bias is not None:
        acc_b = torch.zeros(rows.shape[0], dtype=torch.float32, device=h_c.device)
        acc_b.index_add_(0, inverse, g_sel.reshape(-1))
        grad_bias.index_add_(0, rows, acc_b.to(grad_bias.dtype))


def fused_linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: torch.Tensor,
    row_mask: torch.Tensor,
    coef: torch.Tensor,
    labels: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    k: int,
    ce_weight: float,
    uld_weight: float,
    backend: str,
    chunk_size: int | None,
    opts: dict,
):
    """(loss, ce, uld, grad_hidden, grad_weight, grad_bias), with loss = ce_weight * ce + uld_weight * uld."""
    n, h = hidden.shape
    v = weight.shape[0]
    c = chunk_size or chunk_size_for(n, v, h)
    grad_hidden = torch.zeros_like(hidden)
    grad_weight = torch.zeros_like(weight)
    grad_bias = None if bias is None else torch.zeros_like(bias)
    n_labels = 0 if labels is None else int((labels != IGNORE_INDEX).sum())
    ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    uld_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    argmax = torch.empty(n, dtype=torch.int64, device=hidden.device)
    # Without the tail bucket the ULD gradient w.r.t. the logits is nonzero only at each row's K selected entries.
    # The Triton backend returns it compactly. Without CE it then reaches the hidden states and the weight through a
    # gather and an index_add over K rows, instead of two [C, V] x [V, H] matmuls (two thirds of the FLOPs); with CE
    # the gradient is dense, so the CE kernel writes it over the logits chunk and the K entries are added to it.
    sparse = backend == "triton" and not opts["tail"]
    for start in range(0, n, c):
        sl = slice(start, min(start + c, n))
        h_c = hidden[sl]
        logits = h_c @ weight.t()
        if bias is not None:
            logits = logits + bias
        if sparse:
            uld_c, idx, g_sel = _chunk_uld_grad_sparse(logits, teacher[sl], row_mask[sl], coef[sl], k, opts)
            uld_sum += uld_c
            g_sel *= uld_weight
            if not n_labels:
                argmax[sl] = logits.argmax(-1)
                del logits
                _fold_sparse_grad(idx, g_sel, h_c, weight, grad_hidden[sl], grad_weight, grad_bias)
                continue
            from fusion_cache.kernels.ce import ce_grad_inplace

            scale = torch.full((logits.shape[0],), ce_weight / n_labels, dtype=torch.float32, device=logits.device)
            ce_rows, argmax[sl] = ce_grad_inplace(logits, labels[sl], scale)
            ce_sum += ce_rows.sum()
            g = logits.scatter_add_(1, idx, g_sel.to(logits.dtype))  # the logits chunk now holds its gradient
        else:
            argmax[sl] = logits.argmax(-1)
            uld_c, grad = _chunk_uld_grad(logits, teacher[sl], row_mask[sl], coef[sl], backend=backend, k=k, opts=opts)
            uld_sum += uld_c
            grad *= uld_weight
            if n_labels:
                ce_c, g_ce = _chunk_ce_grad(logits, labels[sl], ce_weight / n_labels)
                ce_sum += ce_c
                grad += g_ce
                del g_ce
            g = grad.to(weight.dtype)
            del grad
        grad_hidden[sl] = g @ weight
        grad_weight.addmm_(g.t(), h_c)
        if grad_bias is not None:
            grad_bias += g.sum(0)
        del logits, g
    ce = ce_sum / max(n_labels, 1)
    loss = ce_weight * ce + uld_weight * uld_sum
    return loss, ce, uld_sum, argmax, grad_hidden, grad_weight, grad_bias


class FusedLinearULDFunction(torch.autograd.Function):
    """loss = ce_weight * CE(hidden @ W.T + b, labels) + uld_weight * ULD(hidden @ W.T + b, teacher), chunked."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, teacher, row_mask, coef, labels, k, ce_weight, uld_weight, backend, chunk, opts
    ):
        loss, ce, uld, argmax, gh, gw, gb = fused_linear_forward(
            hidden,
            weight,
            teacher,
            row_mask,
            coef,
            labels,
            bias,
            k=k,
            ce_weight=ce_weight,
            uld_weight=uld_weight,
            backend=backend,
            chunk_size=chunk,
            opts=opts,
        )
        ctx.save_for_backward(gh, gw, gb if gb is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(ce, uld, argmax)
        return loss, ce, uld, argmax

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_uld, _grad_argmax):
        gh, gw, gb = ctx.saved_tensors
        gh, gw = gh * grad_loss.to(gh.dtype), gw * grad_loss.to(gw.dtype)
        gb = gb * grad_loss.to(gb.dtype) if ctx.has_bias else None
        return gh, gw, gb, None, None, None, None, None, None, None, None, None, None


def fused_linear_uld_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_values: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    k: int = 10,
    zscore: bool = True,
    softmax: bool = True,
    temperature: float = 1.0,
    eps: float = 1e-7,
    tail: bool = False,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    uld_weight: float = 1.0,
    backend: str = "torch",
    chunk_size: int | None = None,
) -> FusedLinearOutput:
    """``(loss, ce, uld)`` for logits ``hidden @ weight.T + bias`` without materializing them.

    Args:
        hidden: [N, H] hidden states (requires grad as needed); weight: [V, H]; bias: [V] or None.
        teacher_values: [N, Kt] sorted teacher top-K values; row_mask [N] bool (None = all rows), row_weights [N].
        labels: [N] int64 CE targets, IGNORE_INDEX (-100) for rows without one; None = no CE.
        tail: the tail-mass bucket variant (see `fusion_cache.kernels.reference.uld_rows_reference`).
        reduction: of the ULD term, "mean" or "sum", as `uld_loss_reference`. CE is the mean over labelled rows.
        ce_weight, uld_weight: loss = ce_weight * ce + uld_weight * uld (e.g. 1 - lambda and lambda).
        backend: "triton" or "torch" for the per-chunk ULD.
        chunk_size: rows per chunk; None picks it from the shapes (`chunk_size_for`).

    Returns:
        `FusedLinearOutput`: loss (differentiable w.r.t. hidden, weight, bias); ce, uld (detached scalars, for
        logging) and the rows' argmax [N].
    """
    n = hidden.shape[0]
    if row_mask is None:
        row_mask = torch.ones(n, dtype=torch.bool, device=hidden.device)
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be [N]={n}, got {tuple(labels.shape)}")
    coef = uld_row_coefficients(row_mask, row_weights, reduction)
    opts = dict(zscore=zscore, softmax=softmax, temperature=temperature, eps=eps, tail=tail)
    return FusedLinearOutput(
        *FusedLinearULDFunction.apply(
            hidden,
            weight,
            bias,
            teacher_values,
            row_mask,
            coef,
            labels,
            k,
            ce_weight,
            uld_weight,
            backend,
            chunk_size,
            opts,
        )
    )
