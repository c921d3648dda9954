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
from collections.abc import Callable
from typing import NamedTuple

import torch

from fusion_cache.kernels.reference import uld_rows_reference

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


class SparseGrad(NamedTuple):
    """A logits gradient that is ``values`` [n, K] at columns ``index`` [n, K] (int64) of each row and 0 elsewhere."""

    index: torch.Tensor
    values: torch.Tensor


# A term's per-chunk callback: (logits [n, V] of its rows in this chunk, the slice of its rows) ->
# (d [n] fp32 per-row distances, detached; gradient of sum(coef[sl] * d) w.r.t. the logits: dense [n, V] fp32 or a
# SparseGrad). The logits it gets may be a view of the chunk; it must not write to them.
ChunkGradFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, "torch.Tensor | SparseGrad"]]


class FusedTerm(NamedTuple):
    """One distillation term of the fused path: a loss on some rows of the [N, H] hidden states.

    Attributes:
        rows: [N_s] int64, strictly increasing: the hidden rows the term scores.
        coef: [N_s] fp32 row coefficients: the term adds ``sum_i coef_i d_i`` to the distillation sum.
        grad_fn: computes ``d`` and the gradient for a chunk of those rows (see `ChunkGradFn`).
    """

    rows: torch.Tensor
    coef: torch.Tensor
    grad_fn: ChunkGradFn


class FusedTermsOutput(NamedTuple):
    """What `fused_linear_terms` returns: only ``loss`` carries a graph."""

    loss: torch.Tensor  # ce_weight * ce + kd_weight * kd
    ce: torch.Tensor  # mean CE over labelled rows (0 without labels)
    kd: torch.Tensor  # sum over terms of sum_i coef_i d_i
    argmax: torch.Tensor  # [N] int64 argmax of each row's logits
    distances: list[torch.Tensor]  # per term, d [N_s] (detached): what each term's own metrics are made of


def uld_grad_fn(teacher: torch.Tensor, coef: torch.Tensor, *, k: int, backend: str, opts: dict) -> ChunkGradFn:
    """The ULD term's callback: teacher [N_s, Kt] values of the term's rows, coef [N_s].

    ``backend="triton"`` runs the ULD kernels and, without the tail bucket, returns the gradient sparsely (it is
    nonzero only at each row's K selected entries); ``"torch"`` differentiates the reference on the chunk.
    """

    def grad(logits: torch.Tensor, sl: slice):
        t, c = teacher[sl], coef[sl]
        mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if backend == "triton":
            from fusion_cache.kernels.uld import uld_rows_backward
            from fusion_cache.kernels.uld import uld_rows_backward_compact
            from fusion_cache.kernels.uld import uld_rows_forward

            dist, idx, val, lse = uld_rows_forward(logits, t, mask, k=k, **opts)
            if not opts["tail"]:
                no_tail = {key: value for key, value in opts.items() if key != "tail"}
                return dist, SparseGrad(idx, uld_rows_backward_compact(c, t, mask, idx, val, **no_tail))
            g = uld_rows_backward(c, tuple(logits.shape), torch.float32, t, mask, idx, val, logits=logits, lse=lse,
                                  **opts)  # fmt: skip
            return dist, g
        return autograd_grad_fn(lambda z, _: uld_rows_reference(z, t, k=k, **opts), coef)(logits, sl)

    return grad


def autograd_grad_fn(rows_fn: Callable[[torch.Tensor, slice], torch.Tensor], coef: torch.Tensor) -> ChunkGradFn:
    """A term callback that differentiates ``rows_fn(logits [n, V] fp32, sl) -> d [n]`` by autograd on the chunk:
    any loss's reference per-row function works on the fused path this way (coef [N_s] as in `FusedTerm`)."""

    def grad(logits: torch.Tensor, sl: slice):
        with torch.enable_grad():  # autograd.Function.forward runs with grad mode off
            x = logits.detach().float().requires_grad_()
            d = rows_fn(x, sl)
            (g,) = torch.autograd.grad((d * coef[sl].to(d.dtype)).sum(), x)
        return d.detach().float(), g

    return grad


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


def _fold_sparse_grad(local, idx, g_sel, h_c, weight, grad_hidden_c, grad_weight, grad_bias):
    """Add the contribution of a logits gradient that is ``g_sel`` [P, K] at ``idx`` [P, K] of chunk rows ``local``
    [P] and 0 elsewhere.

    grad_hidden_c [C, H] (a view, updated in place) gets sum_k g_sel[p, k] * W[idx[p, k]] at row local[p];
    grad_weight [V, H] gets g_sel[p, k] * h_c[local[p]] added at row idx[p, k]. Sums run in fp32 and are rounded
    once per chunk, as the dense matmul path does (a weight row picked by many rows is accumulated before rounding).
    """
    h = h_c.shape[1]
    w_sel = weight[idx].float()  # [P, K, H]
    grad_hidden_c.index_add_(0, local, torch.bmm(g_sel[:, None, :], w_sel)[:, 0].to(grad_hidden_c.dtype))
    rows, inverse = torch.unique(idx.reshape(-1), return_inverse=True)
    contrib = (g_sel[:, :, None] * h_c[local].float()[:, None, :]).reshape(-1, h)
    acc = torch.zeros(rows.shape[0], h, dtype=torch.float32, device=h_c.device).index_add_(0, inverse, contrib)
    grad_weight.index_add_(0, rows, acc.to(grad_weight.dtype))
    if grad_bias is not None:
        acc_b = torch.zeros(rows.shape[0], dtype=torch.float32, device=h_c.device)
        acc_b.index_add_(0, inverse, g_sel.reshape(-1))
        grad_bias.index_add_(0, rows, acc_b.to(grad_bias.dtype))


def _term_bounds(terms: list[FusedTerm], n: int, c: int) -> list[torch.Tensor]:
    """Per term, [n_chunks + 1] indices into its rows where each chunk of ``c`` hidden rows starts."""
    edges = torch.arange(0, n + c, c).clamp_max(n)
    out = []
    for t in terms:
        rows = t.rows.cpu()
        if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
            raise ValueError("a fused term's rows must be strictly increasing")
        if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= n):
            raise ValueError(f"a fused term's rows must lie in [0, {n}), got [{int(rows[0])}, {int(rows[-1])}]")
        out.append(torch.searchsorted(rows, edges).tolist())
    return out


def _rows_of(logits: torch.Tensor, local: torch.Tensor):
    """The chunk rows ``local`` [n] of logits [C, V]: a view when they are contiguous (no [n, V] copy)."""
    first, last = int(local[0]), int(local[-1])
    if last - first + 1 == local.numel():
        return logits[first : last + 1]
    return logits[local]


def fused_linear_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    terms: list[FusedTerm],
    *,
    ce_weight: float,
    kd_weight: float,
    chunk_size: int | None,
    ce_backend: str,
):
    """(loss, ce, kd, argmax, distances, grad_hidden, grad_weight, grad_bias); see `fused_linear_terms`."""
    n, h = hidden.shape
    v = weight.shape[0]
    c = chunk_size or chunk_size_for(n, v, h)
    bounds = _term_bounds(terms, n, c)
    grad_hidden = torch.zeros_like(hidden)
    grad_weight = torch.zeros_like(weight)
    grad_bias = None if bias is None else torch.zeros_like(bias)
    n_labels = 0 if labels is None else int((labels != IGNORE_INDEX).sum())
    ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
    argmax = torch.empty(n, dtype=torch.int64, device=hidden.device)
    distances = [torch.zeros(t.rows.shape[0], dtype=torch.float32, device=hidden.device) for t in terms]
    for j, start in enumerate(range(0, n, c)):
        sl = slice(start, min(start + c, n))
        h_c = hidden[sl]
        logits = h_c @ weight.t()
        if bias is not None:
            logits = logits + bias
        inplace_ce = bool(n_labels) and ce_backend == "triton"
        if not inplace_ce:  # the in-place CE kernel gives the argmax for free
            argmax[sl] = logits.argmax(-1)
        # every term reads the logits before the in-place CE kernel overwrites them with the CE gradient
        parts = []  # (local rows [n_s], gradient) per term with rows in this chunk
        for t, b, dist in zip(terms, bounds, distances, strict=True):
            a, e = b[j], b[j + 1]
            if a == e:
                continue
            local = t.rows[a:e] - start
            d, g = t.grad_fn(_rows_of(logits, local), slice(a, e))
            dist[a:e] = d
            kd_sum += (t.coef[a:e].to(d.dtype) * d).sum()
            parts.append((local, g))
        if not n_labels and all(isinstance(g, SparseGrad) for _, g in parts):
            # no CE and only sparse gradients: a gather and an index_add over K rows replace two [C, V] x [V, H]
            # matmuls (two thirds of the FLOPs); the logits chunk is not needed any more
            del logits
            for local, g in parts:
                _fold_sparse_grad(local, g.index, g.values * kd_weight, h_c, weight, grad_hidden[sl], grad_weight,
                                  grad_bias)  # fmt: skip
            continue
        if n_labels:
            scale = ce_weight / n_labels
            if inplace_ce:
                from fusion_cache.kernels.ce import ce_grad_inplace

                scales = torch.full((logits.shape[0],), scale, dtype=torch.float32, device=logits.device)
                ce_rows, argmax[sl] = ce_grad_inplace(logits, labels[sl], scales)
                ce_sum += ce_rows.sum()
                g = logits  # the logits chunk now holds its CE gradient (weight dtype)
            else:
                ce_c, g = _chunk_ce_grad(logits, labels[sl], scale)
                ce_sum += ce_c
                del logits
        else:
            g = torch.zeros_like(logits, dtype=torch.float32)
            del logits
        for local, part in parts:
            if isinstance(part, SparseGrad):
                rows = local[:, None].expand_as(part.index)
                g.index_put_((rows, part.index), (part.values * kd_weight).to(g.dtype), accumulate=True)
            else:
                g.index_add_(0, local, (part * kd_weight).to(g.dtype))
        g = g.to(weight.dtype)
        grad_hidden[sl] = g @ weight
        grad_weight.addmm_(g.t(), h_c)
        if grad_bias is not None:
            grad_bias += g.sum(0)
        del g
    ce = ce_sum / max(n_labels, 1)
    loss = ce_weight * ce + kd_weight * kd_sum
    return loss, ce, kd_sum, argmax, distances, grad_hidden, grad_weight, grad_bias


class FusedLinearTermsFunction(torch.autograd.Function):
    """loss = ce_weight * CE(hidden @ W.T + b, labels) + kd_weight * sum of the terms, chunked (grads in forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, terms, ce_weight, kd_weight, chunk, ce_backend):
        loss, ce, kd, argmax, distances, gh, gw, gb = fused_linear_forward(
            hidden, weight, bias, labels, terms, ce_weight=ce_weight, kd_weight=kd_weight, chunk_size=chunk,
            ce_backend=ce_backend,
        )  # fmt: skip
        ctx.save_for_backward(gh, gw, gb if gb is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(ce, kd, argmax, *distances)
        return loss, ce, kd, argmax, *distances

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        gh, gw, gb = ctx.saved_tensors
        gh, gw = gh * grad_loss.to(gh.dtype), gw * grad_loss.to(gw.dtype)
        gb = gb * grad_loss.to(gb.dtype) if ctx.has_bias else None
        return gh, gw, gb, None, None, None, None, None, None


def fused_linear_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    terms: list[FusedTerm],
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    chunk_size: int | None = None,
    ce_backend: str = "torch",
) -> FusedTermsOutput:
    """CE plus any number of distillation terms on the logits ``hidden @ weight.T + bias``, never materialized whole.

    Each chunk of C rows computes its [C, V] logits once; the CE and every term with rows in the chunk (each teacher
    of a multi-teacher run, each with its own loss) read them, and their gradients are folded into the gradients of
    the hidden states and the weight before the next chunk. Peak extra memory is O(C x V) whatever the number of
    terms.

    Args:
        hidden: [N, H]; weight: [V, H]; bias: [V] or None.
        terms: the distillation terms (`FusedTerm`; `uld_grad_fn` and `autograd_grad_fn` make their callbacks).
        labels: [N] int64 CE targets, IGNORE_INDEX (-100) for rows without one; None = no CE.
        ce_weight, kd_weight: loss = ce_weight * ce + kd_weight * kd (e.g. 1 - lambda and lambda).
        chunk_size: rows per chunk; None picks it from the shapes (`chunk_size_for`).
        ce_backend: "triton" (in-place CE gradient kernel, GPU) or "torch".

    Returns:
        `FusedTermsOutput`; ``loss`` is differentiable w.r.t. hidden, weight and bias.
    """
    if labels is not None and labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N]={hidden.shape[0]}, got {tuple(labels.shape)}")
    out = FusedLinearTermsFunction.apply(hidden, weight, bias, labels, list(terms), ce_weight, kd_weight, chunk_size,
                                         ce_backend)  # fmt: skip
    loss, ce, kd, argmax, *distances = out
    return FusedTermsOutput(loss, ce, kd, argmax, list(distances))


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
    coef = uld_row_coefficients(row_mask, row_weights, reduction)
    opts = dict(zscore=zscore, softmax=softmax, temperature=temperature, eps=eps, tail=tail)
    rows = row_mask.nonzero(as_tuple=True)[0]
    term = FusedTerm(rows, coef[rows], uld_grad_fn(teacher_values[rows], coef[rows], k=k, backend=backend, opts=opts))
    out = fused_linear_terms(hidden, weight, [term], labels, bias, ce_weight=ce_weight, kd_weight=uld_weight,
                             chunk_size=chunk_size, ce_backend=backend)  # fmt: skip
    return FusedLinearOutput(out.loss, out.ce, out.kd, out.argmax)
