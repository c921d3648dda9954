"""The distillation losses the trainer uses: the layer between kernels/ and the trainer.

`uld_loss` is the functional form and `ULDLoss` the module. Both dispatch to one backend chosen once: the PyTorch
reference (kernels/reference.py) today; a fused Triton kernel registers here as another backend. The choice comes
from ``FUSION_CACHE_KERNEL=auto|torch|triton`` and can be overridden in tests with `set_backend`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fusion_cache.errors import ConfigError
from kernels.reference import uld_loss_reference

BACKENDS = ("auto", "torch")
_override: str | None = None


def set_backend(name: str | None) -> None:
    """Force a backend (tests); None goes back to the environment's choice."""
    global _override
    if name is not None and name not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {list(BACKENDS)}, got {name!r}")
    _override = name


def resolve_backend() -> str:
    """The backend in force: the override, else FUSION_CACHE_KERNEL, else auto (-> the reference)."""
    name = _override or os.environ.get("FUSION_CACHE_KERNEL", "auto")
    if name not in BACKENDS:
        raise ConfigError(f"FUSION_CACHE_KERNEL must be one of {list(BACKENDS)}, got {name!r}")
    return "torch"


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
    reduction: str = "mean",
) -> torch.Tensor:
    """InfiFusion's top-K z-scored sorted ULD (DESIGN.md section 1). Shapes and semantics as
    `kernels.reference.uld_loss_reference`: logits [N, V], teacher values [N, Kt] sorted descending."""
    resolve_backend()
    return uld_loss_reference(
        student_logits,
        teacher_values,
        row_mask,
        row_weights,
        k=k,
        zscore=zscore,
        softmax=softmax,
        temperature=temperature,
        reduction=reduction,
    )


class ULDLoss(nn.Module):
    """Module form of `uld_loss`.

    Shape:
        student_logits: [N, V]; teacher_values: [N, Kt]; row_mask, row_weights: [N]; output: scalar or [N].

    Example:
        >>> loss_fn = ULDLoss(k=10)
        >>> loss = loss_fn(logits[rows], teacher_values, row_weights=w, reduction="sum")
    """

    def __init__(self, k: int = 10, *, zscore: bool = True, softmax: bool = True, temperature: float = 1.0):
        super().__init__()
        self.k, self.zscore, self.softmax, self.temperature = k, zscore, softmax, temperature

    def forward(self, student_logits, teacher_values, row_mask=None, row_weights=None, reduction: str = "mean"):
        return uld_loss(
            student_logits,
            teacher_values,
            row_mask,
            row_weights,
            k=self.k,
            zscore=self.zscore,
            softmax=self.softmax,
            temperature=self.temperature,
            reduction=reduction,
        )
