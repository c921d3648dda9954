"""Triton cross-entropy over a chunk of logits, its gradient written over the logits in place (as Liger's fused
linear cross-entropy does), and each row's argmax in the same pass.

Per row of logits x [C, V]: pass 1 streams the row once for the online logsumexp and the argmax; pass 2 streams it
again and overwrites it with ``scale * (softmax(x) - onehot(label))``. Rows whose label is IGNORE_INDEX get a zero
gradient and a zero loss. Reading the row twice and writing it once in its own dtype replaces the five or six fp32
[C, V] temporaries of the PyTorch formulation (kernels/fused_linear.py keeps that one as the CPU path and the
reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100


@triton.jit
def _ce_grad_inplace_kernel(
    logits_ptr,
    stride_l,
    labels_ptr,
    scale_ptr,
    loss_ptr,
    argmax_ptr,
    N,
    V,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows64 = rows.to(tl.int64)
    vcols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index)
    keep = in_range & (label != ignore_index)
    safe = tl.where(keep, label, 0).to(tl.int64)
    scale = tl.where(keep, tl.load(scale_ptr + rows, mask=in_range, other=0.0), 0.0)
    picked = tl.load(logits_ptr + rows64 * stride_l + safe, mask=keep, other=0.0).to(tl.float32)

    m_run = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_run = tl.zeros([BLOCK_N], tl.float32)
    best_i = tl.zeros([BLOCK_N], tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + vcols
        m = in_range[:, None] & (cols[None, :] < V)
        x = tl.load(logits_ptr + rows64[:, None] * stride_l + cols[None, :], mask=m, other=float("-inf"))
        x = x.to(tl.float32)
        cmax = tl.max(x, axis=1)
        # first index of the row's maximum, as torch.argmax (a later chunk must be strictly larger to win)
        cpos = tl.min(tl.where(x == cmax[:, None], cols[None, :], V), axis=1).to(tl.int64)
        best_i = tl.where(cmax > m_run, cpos, best_i)
        m_new = tl.maximum(m_run, cmax)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m_run = m_new
    lse = m_run + tl.log(s_run)
    tl.store(loss_ptr + rows, tl.where(keep, lse - picked, 0.0), mask=in_range)
    tl.store(argmax_ptr + rows, best_i, mask=in_range)

    for v0 in range(0, V, BLOCK_V):
        cols = v0 + vcols
        m = in_range[:, None] & (cols[None, :] < V)
        ptrs = logits_ptr + rows64[:, None] * stride_l + cols[None, :]
        x = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
        p = tl.where(keep[:, None], tl.exp(x - lse[:, None]), 0.0)
        g = (p - tl.where(cols[None, :] == safe[:, None], 1.0, 0.0)) * scale[:, None]
        tl.store(ptrs, g.to(logits_ptr.dtype.element_ty), mask=m)


INTERPRETED = type(_ce_grad_inplace_kernel).__name__ == "InterpretedFunction"


def ce_grad_inplace(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite ``logits`` [C, V] (row stride free, unit column stride) with ``scale[:, None] * (softmax - onehot)``.

    Args:
        logits: [C, V] fp32 or bf16, overwritten.
        labels: [C] int64 targets, IGNORE_INDEX for rows without one (their gradient rows become 0).
        scale: [C] fp32 per-row factor of the gradient (e.g. ce_weight / number of labelled rows).

    Returns:
        (per-row CE [C] fp32, 0 at ignored rows; per-row argmax [C] int64 of the logits before overwriting).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"expected [C, V] logits with unit column stride, got {tuple(logits.shape)}")
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(n, dtype=torch.int64, device=logits.device)
    if INTERPRETED:
        block_n, block_v = min(triton.next_power_of_2(max(n, 1)), 64), min(triton.next_power_of_2(v), 2048)
    else:
        block_n, block_v = 1, min(triton.next_power_of_2(v), 4096)
    if n:
        _ce_grad_inplace_kernel[(triton.cdiv(n, block_n),)](
            logits,
            logits.stride(0),
            labels.contiguous(),
            scale.float().contiguous(),
            loss,
            argmax,
            n,
            v,
            IGNORE_INDEX,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
        )
    return loss, argmax
