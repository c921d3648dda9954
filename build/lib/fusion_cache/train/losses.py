"""The distillation losses: the layer between kernels/ and the trainer, and the one registry of loss names.

Each loss is one registered unit (`DistillLoss`): its name, what it needs from a teacher (its ids in the student's
vocabulary, true log-probs), its per-row reference in `fusion_cache.kernels.reference`, and its per-chunk gradient
for the fused lm_head path. `LOSSES` is the only list of valid names; configs, the CLI and the trainer read it.

- ``uld``: InfiFusion's top-K z-scored sorted ULD (any tokenizer; `uld_loss`).
- ``kl``: forward KL over the teacher's cached top-K ids plus a tail bucket (`topk_kl_loss`); needs the teacher's
  ids in the student's vocabulary: a teacher with the student's tokenizer and a codec that stores ids.

``auto`` (`AUTO`, per teacher) picks ``kl`` where the teacher allows it, else ``uld``.

The functional forms (`uld_loss`, `topk_kl_loss`, `fused_linear_uld`) dispatch to one backend:

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
from abc import ABC
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any
from typing import ClassVar

import torch
from torch import nn

from fusion_cache.cache.codecs import require_logprobs
from fusion_cache.errors import ConfigError
from fusion_cache.errors import MissingDependencyError
from fusion_cache.kernels.fused_linear import ChunkGradFn
from fusion_cache.kernels.fused_linear import FusedLinearOutput
from fusion_cache.kernels.fused_linear import autograd_grad_fn
from fusion_cache.kernels.fused_linear import fused_linear_uld_loss
from fusion_cache.kernels.fused_linear import uld_grad_fn
from fusion_cache.kernels.reference import reduce_rows
from fusion_cache.kernels.reference import topk_kl_loss_reference
from fusion_cache.kernels.reference import topk_kl_rows_reference
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
        self.k, self.zscore, self.softmax, self.temperature, self.tail = k, zscore, softmax, temperature, tail

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
            tail=self.tail,
            reduction=reduction,
        )


class FusedLinearULDLoss(nn.Module):
    """Module form of `fused_linear_uld`: takes the student's hidden states and its lm_head instead of logits.

    Shape:
        hidden: [N, H]; lm_head: nn.Linear(H, V); teacher_values: [N, Kt]; row_mask, row_weights, labels: [N].
    """

    def __init__(
        self, k: int = 10, *, zscore: bool = True, softmax: bool = True, temperature: float = 1.0, tail: bool = False
    ):
        super().__init__()
        self.k, self.zscore, self.softmax, self.temperature, self.tail = k, zscore, softmax, temperature, tail

    def forward(
        self,
        hidden,
        lm_head: nn.Linear,
        teacher_values,
        row_mask=None,
        row_weights=None,
        labels=None,
        *,
        reduction: str = "mean",
        ce_weight: float = 0.0,
        uld_weight: float = 1.0,
    ):
        return fused_linear_uld(
            hidden,
            lm_head.weight,
            teacher_values,
            row_mask,
            row_weights,
            labels,
            lm_head.bias,
            k=self.k,
            zscore=self.zscore,
            softmax=self.softmax,
            temperature=self.temperature,
            tail=self.tail,
            reduction=reduction,
            ce_weight=ce_weight,
            uld_weight=uld_weight,
        )


# ------------------------------------------------------------------------------------------- the loss registry
AUTO = "auto"  # per teacher: the best loss the teacher allows (`resolve_loss_names`)


@dataclass(frozen=True)
class TeacherTraits:
    """What a teacher's cache allows, for choosing and checking its loss.

    Attributes:
        name: the teacher's label (for messages).
        same_vocab: the teacher's ids are the student's (same tokenizer and template, codec with ids).
        codec: the cache's codec (its ``has_logprobs`` and ``name`` are read).
    """

    name: str
    same_vocab: bool
    codec: Any


class DistillLoss(ABC):
    """One distillation loss: per-row distances d [N] from the student's logits at a teacher's rows.

    Subclasses set ``name`` and ``description``, implement `rows`, and may override `grad_fn` (the fused lm_head
    path; the default differentiates `rows` by autograd on each chunk) and `check`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_ids: ClassVar[bool] = False  # the teacher's top-K ids in the student's vocabulary

    @abstractmethod
    def rows(self, logits: torch.Tensor, target: dict) -> torch.Tensor:
        """d [N] fp32, differentiable w.r.t. ``logits`` [N, V]; ``target`` holds values [N, Kt] (and ids [N, Kt])."""

    def grad_fn(self, target: dict, coef: torch.Tensor, backend: str) -> ChunkGradFn:
        """The fused path's per-chunk callback (see `fusion_cache.kernels.fused_linear.FusedTerm`)."""

        def rows(z: torch.Tensor, sl: slice) -> torch.Tensor:
            return self.rows(z, {key: value[sl] for key, value in target.items()})

        return autograd_grad_fn(rows, coef)

    def check(self, teacher: TeacherTraits) -> None:
        """Refuse a teacher this loss cannot use (ConfigError naming the teacher and the reason)."""
        if self.needs_ids and not teacher.same_vocab:
            raise ConfigError(
                f"kd_loss {self.name!r} for teacher {teacher.name}: it needs the teacher's token ids in the "
                "student's vocabulary (a student with the teacher's tokenizer and chat template, and a cache whose "
                "codec stores ids: raw or full); use 'uld' (or 'auto') for this teacher"
            )


@dataclass(frozen=True)
class ULD(DistillLoss):
    """InfiFusion's sorted ULD over the top-k values (`kernels.reference.uld_rows_reference`)."""

    name: ClassVar[str] = "uld"
    description: ClassVar[str] = "InfiFusion's sorted, z-scored top-K ULD (any tokenizer)"
    k: int = 10
    zscore: bool = True
    softmax: bool = True
    temperature: float = 1.0
    tail: bool = False

    def _opts(self) -> dict:
        return dict(zscore=self.zscore, softmax=self.softmax, temperature=self.temperature, tail=self.tail)

    def rows(self, logits, target):
        return uld_loss(logits, target["values"], k=self.k, reduction="none", **self._opts())

    def grad_fn(self, target, coef, backend):
        return uld_grad_fn(target["values"], coef, k=self.k, backend=backend, opts={**self._opts(), "eps": 1e-7})

    def check(self, teacher):
        if self.tail:  # first: the tail bucket implies no z-score, and names the real reason
            require_logprobs(teacher.codec, "train --tail")
        if not self.zscore:
            require_logprobs(teacher.codec, "train --no-zscore")


@dataclass(frozen=True)
class TopKKL(DistillLoss):
    """Forward KL(teacher || student) over the teacher's cached top-K ids plus a tail bucket."""

    name: ClassVar[str] = "kl"
    description: ClassVar[str] = "top-K KL with a tail bucket (a teacher with the student's tokenizer; ids cached)"
    needs_ids: ClassVar[bool] = True

    def rows(self, logits, target):
        if "ids" not in target:
            raise ValueError("kd_loss 'kl' needs the teacher's ids in the batch (a same-tokenizer teacher)")
        return topk_kl_rows_reference(logits, target["ids"], target["values"], tail=True)

    def check(self, teacher):
        super().check(teacher)
        require_logprobs(teacher.codec, "train --kd-loss kl")


LOSSES: dict[str, type[DistillLoss]] = {cls.name: cls for cls in (ULD, TopKKL)}
LOSS_CHOICES: tuple[str, ...] = (*LOSSES, AUTO)  # what a config or the CLI may name


def loss_help() -> str:
    """One line per loss name, for CLI help."""
    lines = [f"{name}: {cls.description}" for name, cls in LOSSES.items()]
    return "; ".join([*lines, f"{AUTO}: kl where the teacher allows it, else uld"])


def make_loss(name: str, **options) -> DistillLoss:
    """The loss ``name`` with the options it takes (the others are ignored: one option set serves every loss).

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    cls = LOSSES.get(name)
    if cls is None:
        raise ConfigError(f"kd_loss: unknown value {name!r}; valid values: {', '.join(LOSS_CHOICES)}")
    fields = getattr(cls, "__dataclass_fields__", {})
    return cls(**{k: v for k, v in options.items() if k in fields})


def resolve_loss_names(names: list[str], teachers: list[TeacherTraits]) -> list[str]:
    """One loss name per teacher: ``names`` is one name for all or one per teacher; ``auto`` becomes ``kl`` for a
    teacher that allows it and ``uld`` otherwise."""
    if len(names) not in (1, len(teachers)):
        raise ConfigError(
            f"kd_loss: give one loss for every teacher or one per cache ({len(teachers)}), got {len(names)}: {names}"
        )
    per = names * len(teachers) if len(names) == 1 else list(names)
    out = []
    for name, t in zip(per, teachers, strict=True):
        if name == AUTO:
            name = TopKKL.name if t.same_vocab and t.codec.has_logprobs else ULD.name
        out.append(name)
    return out
