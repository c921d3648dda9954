"""The distillation losses as functions on tensors: the layer between kernels/ and the trainer.

`uld_loss` and `topk_kl_loss` take logits; `fused_linear_uld` takes hidden states and the lm_head weight instead
(chunked, the [N, V] logits never exist whole); `ULDLoss` and `FusedLinearULDLoss` are their module forms. The named,
registered losses the trainer chooses per teacher are `fusion_cache.train.losses`. Everything dispatches to one
backend:

- ``torch``: the PyTorch reference (kernels/reference.py), any device.
- ``triton``: the fused Triton kernels (kernels/uld.py); needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1
  set before triton is imported (how the CPU tests run them).
- ``auto`` (default): triton for CUDA tensors when triton is installed, else torch. So the trainer uses the kernel
  on a GPU and the reference on CPU.

The choice comes from ``FUSION_CACHE_KERNEL=auto|torch|triton``, read once (the first call), and can be forced in
tests with `set_backend`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.kernels.fused_linear import FusedLinearOutput
from fusion_cache.kernels.fused_linear import fused_linear_uld_loss
from fusion_cache.kernels.reference import reduce_rows
from fusion_cache.kernels.reference import topk_kl_loss_reference
from fusion_cache.kernels.reference import uld_loss_reference

BACKENDS = ("auto", "torch", "triton")
_override: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend (tests); None goes back to the environment's choice."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {list(BACKENDS)}, got {name!r}")
    _override = name


@functools.cache
def _env_backend() -> str:
    """FUSION_CACHE_KERNEL, read once per process."""
    name = os.environ.get("FUSION_CACHE_KERNEL", "auto")
    if name not in BACKENDS:
        raise ConfigError(f"FUSION_CACHE_KERNEL must be one of {list(BACKENDS)}, got {name!r}")
    return name


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(device: torch.device | str | None = None) -> str:
    """The backend in force for tensors on ``device``: "torch" or "triton"."""
    name = _override or _env_backend()
    dev = torch.device(device) if device is not None else None
    on_gpu = dev is not None and dev.type == "cuda"
    if name == "auto":
        return "triton" if on_gpu and _triton_installed() else "torch"
    if name == "triton":
        if not _triton_installed():
            raise MissingDependencyError("the triton kernel backend needs triton: pip install 'fusion-cache[kernels]'")
        if not on_gpu and not _interpreting():
            raise ConfigError(
                f"kernel backend 'triton' got tensors on {dev}: it needs CUDA tensors, or TRITON_INTERPRET=1 "
                "set before triton is imported (CPU interpreter, slow); use FUSION_CACHE_KERNEL=auto or torch"
            )
    return name


def uld_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    *,
    k: int = 10,
    zscore: bool = True,
    softmax: bool = True,
    temperature: float = 1.0,
    tail: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """InfiFusion's top-K z-scored sorted ULD, defined (shapes and semantics too) by
    `fusion_cache.kernels.reference.uld_loss_reference`: logits [N, V], teacher values [N, Kt] sorted descending."""
    opts = dict(k=k, zscore=zscore, softmax=softmax, temperature=temperature, tail=tail)
    if resolve_backend(student_logits.device) == "torch":
        return uld_loss_reference(student_logits, teacher_values, row_mask, row_weights, reduction=reduction, **opts)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    from fusion_cache.kernels.uld import uld_rows_triton

    if row_mask is None:
        row_mask = torch.ones(student_logits.shape[0], dtype=torch.bool, device=student_logits.device)
    dist = uld_rows_triton(student_logits, teacher_values, row_mask, **opts)
    return reduce_rows(dist, row_mask, row_weights, reduction)


def fused_linear_uld(
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
    tail: bool = False,
    reduction: str = "mean",
    ce_weight: float = 0.0,
    uld_weight: float = 1.0,
    chunk_size: int | None = None,
) -> FusedLinearOutput:
    """``(loss, ce, uld, argmax)`` with ``loss = ce_weight * CE + uld_weight * ULD`` of ``hidden @ weight.T + bias``,
    chunked over rows (see `fusion_cache.kernels.fused_linear.fused_linear_uld_loss`): hidden [N, H], weight [V, H],
    teacher_values [N, Kt], labels [N] (-100 = no CE target)."""
    return fused_linear_uld_loss(
        hidden,
        weight,
        teacher_values,
        row_mask,
        row_weights,
        labels,
        bias,
        k=k,
        zscore=zscore,
        softmax=softmax,
        temperature=temperature,
        tail=tail,
        reduction=reduction,
        ce_weight=ce_weight,
        uld_weight=uld_weight,
        backend=resolve_backend(hidden.device),
        chunk_size=chunk_size,
    )


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    row_mask: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    *,
    k: int | None = None,
    tail: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL(teacher || student) over the teacher's top-K ids plus a tail bucket, for a student with the
    teacher's vocabulary: logits [N, V], teacher ids and log-probs [N, Kt] (see
    `fusion_cache.kernels.reference.topk_kl_rows_reference`). PyTorch on every backend: one log_softmax and a gather."""
    return topk_kl_loss_reference(
        student_logits, teacher_ids, teacher_logprobs, row_mask, row_weights, k=k, tail=tail, reduction=reduction
    )


class ULDLoss(nn.Module):
    """Module form of `uld_loss`.

    Shape:
        student_logits: [N, V]; teacher_values: [N, Kt]; row_mask, row_weights: [N]; output: scalar or [N].

    Example:
        >>> loss_fn = ULDLoss(k=10)
        >>> loss = loss_fn(logits[rows], teacher_values, row_weights=w, reduction="sum")
    """

    def __init__(
        self, k: int = 10, *, zscore: bool = True, softmax: bool = True, temperature: float = 1.0, tail: bool = False
    ):
        super().__init__()
        self.opts = dict(k=k, zscore=zscore, softmax=softmax, temperature=temperature, tail=tail)

    def forward(self, student_logits, teacher_values, row_mask=None, row_weights=None, reduction: str = "mean"):
        return uld_loss(student_logits, teacher_values, row_mask, row_weights, reduction=reduction, **self.opts)


class FusedLinearULDLoss(ULDLoss):
    """Module form of `fused_linear_uld`: takes the student's hidden states and its lm_head instead of logits.

    Shape:
        hidden: [N, H]; lm_head: nn.Linear(H, V); teacher_values: [N, Kt]; row_mask, row_weights, labels: [N].
    """

    def forward(self, hidden, lm_head: nn.Linear, teacher_values, row_mask=None, row_weights=None, labels=None, *,
                reduction: str = "mean", ce_weight: float = 0.0, uld_weight: float = 1.0):  # fmt: skip
        weights = dict(reduction=reduction, ce_weight=ce_weight, uld_weight=uld_weight)
        return fused_linear_uld(hidden, lm_head.weight, teacher_values, row_mask, row_weights, labels, lm_head.bias,
                                **weights, **self.opts)  # fmt: skip
