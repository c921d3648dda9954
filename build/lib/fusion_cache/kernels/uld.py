"""Triton forward and backward of the top-K z-scored sorted ULD loss (defined in kernels/reference.py).

One program handles BLOCK_N rows. The forward streams each row of student logits [N, V] in BLOCK_V-wide chunks and
keeps a running top-K buffer in registers: a chunk is merged only when one of its values beats a row's current K-th
value, and the merge is K passes of max / lowest-index argmax over (buffer, chunk), so the vocabulary is never
sorted and [N, V] is read once. Ties go to the lower vocabulary index, both at the K-th boundary and for the rank
order, exactly as `reference.topk_canonical`. It writes the per-row distance d [N] and the K selected
indices and values; the backward recomputes the K-wide math from those and scatters the exact gradient into the
K selected entries of a zeroed [N, V] gradient.

Under TRITON_INTERPRET=1 (CPU tests) the same kernels run with many rows per program; the interpreter costs a
fixed amount per op, so a 2-D block of rows is what makes it usable (docs in /work/shared/notes/environment.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _standardize(x, kmask, K: tl.constexpr, ZSCORE: tl.constexpr, SOFTMAX: tl.constexpr, inv_tau, eps):
    """[BN, KP] sorted values -> (q, c, sd) with q the compared vector; c, sd the z-score's centred values and std."""
    x = tl.where(kmask, x, 0.0)
    if ZSCORE:
        mean = tl.sum(x, axis=1) / K
        c = tl.where(kmask, x - mean[:, None], 0.0)
        sd = tl.sqrt(tl.sum(c * c, axis=1) / (K - 1))
        z = c / (sd[:, None] + eps)
    else:
        c = x
        sd = tl.sum(x, axis=1) * 0.0
        z = x
    if SOFTMAX:
        u = tl.where(kmask, z * inv_tau, float("-inf"))
        m = tl.max(u, axis=1)
        e = tl.where(kmask, tl.exp(u - m[:, None]), 0.0)
        q = e / tl.sum(e, axis=1)[:, None]
    else:
        q = tl.where(kmask, z, 0.0)
    return q, c, sd


@triton.jit
def _uld_fwd_kernel(
    logits_ptr,
    stride_l,
    teacher_ptr,
    stride_t,
    mask_ptr,
    dist_ptr,
    idx_ptr,
    val_ptr,
    lse_ptr,
    N,
    V,
    inv_tau,
    eps,
    K: tl.constexpr,
    KP: tl.constexpr,
    ZSCORE: tl.constexpr,
    SOFTMAX: tl.constexpr,
    TAIL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    valid = in_range & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
    rows64 = rows.to(tl.int64)
    kcols = tl.arange(0, KP)
    kmask = kcols[None, :] < K
    vcols = tl.arange(0, BLOCK_V)

    buf_v = tl.full([BLOCK_N, KP], float("-inf"), tl.float32)
    buf_i = tl.zeros([BLOCK_N, KP], tl.int64)
    m_run = tl.full([BLOCK_N], float("-inf"), tl.float32)  # online logsumexp (tail variant)
    s_run = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + vcols
        ptrs = logits_ptr + rows64[:, None] * stride_l + cols[None, :]
        x = tl.load(ptrs, mask=valid[:, None] & (cols[None, :] < V), other=float("-inf")).to(tl.float32)
        if TAIL:
            m_new = tl.maximum(m_run, tl.max(x, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
            m_run = m_new
        # the row's K-th value so far: a chunk only matters if it beats it (equal values lose on index)
        kth = tl.min(tl.where(kmask, buf_v, float("inf")), axis=1)
        beats = (tl.max(x, axis=1) > kth) & valid
        if tl.max(beats.to(tl.int32), axis=0) > 0:
            new_v = tl.full([BLOCK_N, KP], float("-inf"), tl.float32)
            new_i = tl.zeros([BLOCK_N, KP], tl.int64)
            # a runtime loop, not unrolled: K up to 128 unrolled makes the compile take minutes on a GPU
            for j in range(K):
                mb = tl.max(buf_v, axis=1)
                mx = tl.max(x, axis=1)
                # the buffer holds lower indices than this chunk, so it wins ties
                take_buf = mb >= mx
                pb = tl.min(tl.where(buf_v == mb[:, None], kcols[None, :], KP), axis=1)
                px = tl.min(tl.where(x == mx[:, None], vcols[None, :], BLOCK_V), axis=1)
                ib = tl.sum(tl.where(kcols[None, :] == pb[:, None], buf_i, 0), axis=1)
                val = tl.where(take_buf, mb, mx)
                ind = tl.where(take_buf, ib, (v0 + px).to(tl.int64))
                new_v = tl.where(kcols[None, :] == j, val[:, None], new_v)
                new_i = tl.where(kcols[None, :] == j, ind[:, None], new_i)
                buf_v = tl.where(take_buf[:, None] & (kcols[None, :] == pb[:, None]), float("-inf"), buf_v)
                x = tl.where((~take_buf)[:, None] & (vcols[None, :] == px[:, None]), float("-inf"), x)
            buf_v = new_v
            buf_i = new_i

    out_mask = valid[:, None] & kmask
    t = tl.load(teacher_ptr + rows64[:, None] * stride_t + kcols[None, :], mask=out_mask, other=0.0).to(tl.float32)
    buf_v = tl.where(valid[:, None], buf_v, 0.0)  # masked rows: finite garbage, never -inf - -inf
    if TAIL:
        lse = tl.where(valid, m_run + tl.log(s_run), 0.0)
        q_s = tl.where(kmask, tl.exp(buf_v - lse[:, None]), 0.0)
        q_t = tl.where(kmask, tl.exp(t), 0.0)
        d = tl.sum(tl.abs(q_s - q_t), axis=1) + tl.abs(tl.sum(q_t, axis=1) - tl.sum(q_s, axis=1))
        tl.store(lse_ptr + rows, lse, mask=in_range)
    else:
        q_s, _, _ = _standardize(buf_v, kmask, K, ZSCORE, SOFTMAX, inv_tau, eps)
        q_t, _, _ = _standardize(t, kmask, K, ZSCORE, SOFTMAX, inv_tau, eps)
        d = tl.sum(tl.where(kmask, tl.abs(q_s - q_t), 0.0), axis=1)
    tl.store(dist_ptr + rows, tl.where(valid, d, 0.0), mask=in_range)
    tl.store(idx_ptr + rows64[:, None] * K + kcols[None, :], buf_i, mask=in_range[:, None] & kmask)
    tl.store(val_ptr + rows64[:, None] * K + kcols[None, :], buf_v, mask=in_range[:, None] & kmask)


@triton.jit
def _uld_bwd_kernel(
    grad_ptr,
    stride_g,
    teacher_ptr,
    stride_t,
    mask_ptr,
    gdist_ptr,
    idx_ptr,
    val_ptr,
    lse_ptr,
    a_ptr,
    N,
    inv_tau,
    eps,
    K: tl.constexpr,
    KP: tl.constexpr,
    ZSCORE: tl.constexpr,
    SOFTMAX: tl.constexpr,
    TAIL: tl.constexpr,
    COMPACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    valid = in_range & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
    rows64 = rows.to(tl.int64)
    kcols = tl.arange(0, KP)
    kmask = kcols[None, :] < K
    m2 = valid[:, None] & kmask
    s = tl.load(val_ptr + rows64[:, None] * K + kcols[None, :], mask=m2, other=0.0)
    ind = tl.load(idx_ptr + rows64[:, None] * K + kcols[None, :], mask=m2, other=0)
    t = tl.load(teacher_ptr + rows64[:, None] * stride_t + kcols[None, :], mask=m2, other=0.0).to(tl.float32)
    gd = tl.load(gdist_ptr + rows, mask=valid, other=0.0).to(tl.float32)

    if TAIL:
        # p_i = exp(x_i - lse): d p_i / d x_j = p_i (delta_ij - pi_j). Here the selected part g_i p_i; the dense
        # part -pi_j * sum_i g_i p_i is added over the whole row by _tail_dense_kernel.
        lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
        q_s = tl.where(kmask, tl.exp(s - lse[:, None]), 0.0)
        q_t = tl.where(kmask, tl.exp(t), 0.0)
        diff = q_s - q_t
        gap = tl.sum(q_t, axis=1) - tl.sum(q_s, axis=1)  # tail_o - tail_t
        sg_tail = tl.where(gap > 0, 1.0, tl.where(gap < 0, -1.0, 0.0))
        g = (tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)) - sg_tail[:, None]) * gd[:, None]
        g = tl.where(kmask, g * q_s, 0.0)
        tl.store(a_ptr + rows, tl.sum(g, axis=1), mask=in_range)
    else:
        q_s, c, sd = _standardize(s, kmask, K, ZSCORE, SOFTMAX, inv_tau, eps)
        q_t, _, _ = _standardize(t, kmask, K, ZSCORE, SOFTMAX, inv_tau, eps)
        diff = q_s - q_t
        g = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)) * gd[:, None]  # d|x|/dx = sign(x), sign(0) = 0
        g = tl.where(kmask, g, 0.0)
        if SOFTMAX:
            g = q_s * (g - tl.sum(q_s * g, axis=1)[:, None]) * inv_tau
        if ZSCORE:
            den = sd + eps
            gz_mean = tl.sum(g, axis=1) / K
            gc = tl.sum(g * c, axis=1)
            # the std term: d sd / d c_j = c_j / ((K-1) sd); zero when the K values are all equal (c == 0)
            coef = tl.where(sd > 0, gc / (den * den * (K - 1) * sd), 0.0)
            g = (g - gz_mean[:, None]) / den[:, None] - coef[:, None] * c
    g = tl.where(m2, g, 0.0)
    if COMPACT:  # [N, K]: the gradient at the selected entries, in rank order (idx says where they belong)
        tl.store(grad_ptr + rows64[:, None] * stride_g + kcols[None, :], g.to(grad_ptr.dtype.element_ty), mask=m2)
    else:
        tl.store(grad_ptr + rows64[:, None] * stride_g + ind, g.to(grad_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _tail_dense_kernel(
    logits_ptr,
    stride_l,
    grad_ptr,
    stride_g,
    mask_ptr,
    lse_ptr,
    a_ptr,
    N,
    V,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """grad[j] -= softmax(x)_j * A for every entry of a valid row (the logsumexp part of the tail variant)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    valid = in_range & (tl.load(mask_ptr + rows, mask=in_range, other=0) != 0)
    rows64 = rows.to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=valid, other=0.0)
    a = tl.load(a_ptr + rows, mask=valid, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        m = valid[:, None] & (cols[None, :] < V)
        x = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=m, other=0.0).to(tl.float32)
        gp = grad_ptr + rows64[:, None] * stride_g + cols[None, :]
        g = tl.load(gp, mask=m, other=0.0).to(tl.float32) - tl.exp(x - lse[:, None]) * a[:, None]
        tl.store(gp, g.to(grad_ptr.dtype.element_ty), mask=m)


# Triton decides at decoration time: TRITON_INTERPRET=1 must be set before this module is imported.
INTERPRETED = type(_uld_fwd_kernel).__name__ == "InterpretedFunction"


def _blocks(n: int, v: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, KP): one row per program on a GPU; on the interpreter, many rows per program."""
    kp = max(triton.next_power_of_2(k), 2)
    if INTERPRETED:
        block_n = min(triton.next_power_of_2(max(n, 1)), 64)
        block_v = min(triton.next_power_of_2(v), 2048)
    else:
        block_n = 1
        # at least 256 columns: with Triton 3.6 on an H100, BLOCK_V of 16 or 64 with a narrow KP never finished
        # compiling (stuck in make_ttgir; measured 2026-11-24, docs/training.md); masking covers the rest
        block_v = max(min(triton.next_power_of_2(v), 4096 if k <= 32 else 2048), 256)
    return block_n, block_v, kp


def _check(
    logits: torch.Tensor, teacher: torch.Tensor, k: int, zscore: bool, softmax: bool, temperature: float, tail: bool
) -> int:
    if logits.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"expected [N, V] logits and [N, Kt] teacher values, got {tuple(logits.shape)}, {tuple(teacher.shape)}"
        )
    if logits.shape[0] != teacher.shape[0]:
        raise ValueError(f"row count differs: logits {tuple(logits.shape)} vs teacher {tuple(teacher.shape)}")
    k_eff = min(k, teacher.shape[1], logits.shape[1])
    if tail and (zscore or not softmax or temperature != 1.0):
        raise ValueError(
            f"the tail-mass bucket compares true probabilities: it needs zscore=False, softmax=True, temperature=1, "
            f"got zscore={zscore}, softmax={softmax}, temperature={temperature}"
        )
    if zscore and k_eff < 2:
        raise ValueError(f"z-score needs at least 2 values per row, got k={k_eff}")
    if k_eff > 128:
        raise ValueError(f"the Triton ULD kernel supports K <= 128, got k={k_eff}")
    return k_eff


def uld_rows_forward(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    row_mask: torch.Tensor,
    *,
    k: int,
    zscore: bool,
    softmax: bool,
    temperature: float,
    eps: float,
    tail: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row distances [N] fp32 (0 at masked rows), selected indices [N, K] int64, values [N, K] fp32 and the
    rows' logsumexp [N] fp32 (tail variant only, else empty)."""
    k_eff = _check(logits, teacher, k, zscore, softmax, temperature, tail)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    n, v = logits.shape
    dist = torch.empty(n, dtype=torch.float32, device=logits.device)
    idx = torch.zeros(n, k_eff, dtype=torch.int64, device=logits.device)
    val = torch.zeros(n, k_eff, dtype=torch.float32, device=logits.device)
    lse = torch.zeros(n if tail else 0, dtype=torch.float32, device=logits.device)
    mask = row_mask.to(device=logits.device, dtype=torch.int8).contiguous()
    block_n, block_v, kp = _blocks(n, v, k_eff)
    if n:
        _uld_fwd_kernel[(triton.cdiv(n, block_n),)](
            logits,
            logits.stride(0),
            teacher,
            teacher.stride(0),
            mask,
            dist,
            idx,
            val,
            lse if tail else dist,
            n,
            v,
            1.0 / temperature,
            eps,
            K=k_eff,
            KP=kp,
            ZSCORE=zscore,
            SOFTMAX=softmax,
            TAIL=tail,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
        )
    return dist, idx, val, lse


def _launch_bwd(
    grad, teacher, mask, grad_dist, idx, val, lse, a, *, zscore, softmax, temperature, eps, tail, compact, block_n
):
    """One launch of `_uld_bwd_kernel` over the N rows of ``idx`` [N, K] (``lse`` and ``a``: tail variant only)."""
    n, k_eff = idx.shape
    _uld_bwd_kernel[(triton.cdiv(n, block_n),)](
        grad,
        grad.stride(0),
        teacher,
        teacher.stride(0),
        mask,
        grad_dist.float().contiguous(),
        idx,
        val,
        lse if tail else val,
        a if tail else val,
        n,
        1.0 / temperature,
        eps,
        K=k_eff,
        KP=max(triton.next_power_of_2(k_eff), 2),
        ZSCORE=zscore,
        SOFTMAX=softmax,
        TAIL=tail,
        COMPACT=compact,
        BLOCK_N=block_n,
    )


def uld_rows_backward(
    grad_dist: torch.Tensor,
    shape: tuple[int, int],
    dtype: torch.dtype,
    teacher: torch.Tensor,
    row_mask: torch.Tensor,
    idx: torch.Tensor,
    val: torch.Tensor,
    *,
    zscore: bool,
    softmax: bool,
    temperature: float,
    eps: float,
    tail: bool = False,
    logits: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient [N, V] (dtype of the logits) of sum_i grad_dist[i] * d_i; nonzero only at the selected entries,
    except with ``tail`` (then ``logits`` and the forward's ``lse`` are needed: the gradient is dense).

    ``out``: an [N, V] zero-filled buffer to write into.
    """
    n, v = shape
    k_eff = idx.shape[1]
    # the tail variant writes each entry twice (selected part, then the dense part): accumulate in fp32 and round
    # once at the end, as autograd does for the reference
    acc_dtype = torch.float32 if tail else dtype
    grad = torch.zeros(n, v, dtype=acc_dtype, device=teacher.device) if out is None else out
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    mask = row_mask.to(device=grad.device, dtype=torch.int8).contiguous()
    block_n, block_v, _ = _blocks(n, v, k_eff)
    a = torch.zeros(n if tail else 0, dtype=torch.float32, device=grad.device)
    if n:
        grid = (triton.cdiv(n, block_n),)
        opts = dict(zscore=zscore, softmax=softmax, temperature=temperature, eps=eps)
        _launch_bwd(grad, teacher, mask, grad_dist, idx, val, lse, a, tail=tail, compact=False, block_n=block_n, **opts)
        if tail:
            if logits.stride(1) != 1:
                logits = logits.contiguous()
            _tail_dense_kernel[grid](
                logits, logits.stride(0), grad, grad.stride(0), mask, lse, a, n, v, BLOCK_N=block_n, BLOCK_V=block_v
            )
    return grad.to(dtype)


def uld_rows_backward_compact(
    grad_dist: torch.Tensor,
    teacher: torch.Tensor,
    row_mask: torch.Tensor,
    idx: torch.Tensor,
    val: torch.Tensor,
    *,
    zscore: bool,
    softmax: bool,
    temperature: float,
    eps: float,
) -> torch.Tensor:
    """[N, K] fp32 gradient of sum_i grad_dist[i] * d_i at the K selected entries (their vocabulary indices are the
    forward's ``idx`` [N, K]); 0 at masked rows. Without the tail variant that is the whole gradient: every other
    entry of the [N, V] gradient is zero, so a caller can fold it into a linear layer with a gather and an
    index_add over K rows instead of two [N, V] matmuls (kernels/fused_linear.py)."""
    n, k_eff = idx.shape
    grad = torch.zeros(n, k_eff, dtype=torch.float32, device=idx.device)
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    mask = row_mask.to(device=grad.device, dtype=torch.int8).contiguous()
    block_n = _blocks(n, k_eff, k_eff)[0]
    if n:
        opts = dict(zscore=zscore, softmax=softmax, temperature=temperature, eps=eps)
        _launch_bwd(
            grad, teacher, mask, grad_dist, idx, val, None, None, tail=False, compact=True, block_n=block_n, **opts
        )
    return grad


class ULDRowsFunction(torch.autograd.Function):
    """d = ULD per row [N] through the Triton kernels; differentiable with respect to the logits only."""

    @staticmethod
    def forward(ctx, logits, teacher, row_mask, k, zscore, softmax, temperature, eps, tail):
        opts = dict(zscore=zscore, softmax=softmax, temperature=temperature, eps=eps, tail=tail)
        dist, idx, val, lse = uld_rows_forward(logits, teacher, row_mask, k=k, **opts)
        # the tail variant's gradient is dense: it needs the logits again
        ctx.save_for_backward(teacher, row_mask, idx, val, lse, logits if tail else lse)
        ctx.opts = opts
        ctx.logits_meta = (logits.shape, logits.dtype)
        return dist

    @staticmethod
    def backward(ctx, grad_dist):
        teacher, row_mask, idx, val, lse, logits = ctx.saved_tensors
        shape, dtype = ctx.logits_meta
        grad = uld_rows_backward(
            grad_dist, tuple(shape), dtype, teacher, row_mask, idx, val, logits=logits, lse=lse, **ctx.opts
        )
        return grad, None, None, None, None, None, None, None, None


def uld_rows_triton(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    *,
    k: int = 10,
    zscore: bool = True,
    softmax: bool = True,
    temperature: float = 1.0,
    eps: float = 1e-7,
    tail: bool = False,
) -> torch.Tensor:
    """[N] fp32 per-row ULD distances (0 at masked rows), autograd-enabled. Shapes as `uld_rows_reference`."""
    if row_mask is None:
        row_mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    return ULDRowsFunction.apply(logits, teacher, row_mask, k, zscore, softmax, temperature, eps, tail)
