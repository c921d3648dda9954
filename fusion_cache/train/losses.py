"""The distillation losses by name: the one registry the configs, the CLI and the trainer read.

Each loss is one registered unit (`DistillLoss`): its name, its description, what it needs from a teacher (its ids
in the student's vocabulary, true log-probs), its per-row distances (from the reference in
`fusion_cache.kernels.reference`, through `fusion_cache.train.functional`) and its per-chunk gradient for the fused
lm_head path. `LOSSES` is the only list of valid names.

- ``uld``: InfiFusion's top-K z-scored sorted ULD (any tokenizer; rank-sorted, token identity is not used).
- ``kl``: forward KL over the teacher's cached top-K ids plus a tail bucket; needs the teacher's ids in the
  student's vocabulary: a teacher with the student's tokenizer and a codec that stores ids.
- ``kl_notail``: ``kl`` without the tail bucket (the teacher's top-K renormalised; the biased sparse KD that
  DistillKit and most toolkits use, kept as a baseline).
- ``mapped_kl``: the same KL for a teacher of any tokenizer: its cached top-K mass carried onto the student's
  vocabulary through the byte-level vocabulary map (`train.vocab`), at every student row inside a span the
  teacher predicted (mid-token rows included), what does not map going to the tail bucket. For a teacher with the
  student's tokenizer it is ``kl``.
- ``hybrid``: GOLD's manner: KL on the teacher tokens that exist in the student's vocabulary (exact byte match)
  plus sorted L1 (ULD) on the unmatched rest, at byte-aligned rows.
- ``rs_kl``: the importance-weighted forward KL of a sampled cache (``build --sampling rs``, RS-KD): unbiased in
  expectation at T=1 where every top-K loss is biased; any tokenizer (draws carried through the vocabulary map as
  ``mapped_kl`` carries a top-K, unmappable draws in the tail bucket). The only loss a sampled cache takes.

``auto`` (`AUTO`, per teacher) picks ``rs_kl`` for a sampled cache, ``kl`` for a teacher with the student's
vocabulary, ``mapped_kl`` for another teacher whose cache holds ids and log-probs, else ``uld``.

A loss says which target it reads (``target``): ``values`` (the teacher's sorted top-K values at aligned rows),
``exact`` (those values with the student ids of exactly matching tokens) or ``carried`` (`train.vocab.carry`). The
stream builds each teacher's target accordingly (`train.stream.DistillStream`).

Importing this module does not import torch (the CLI builds its help from it); the computations import it when run.
"""

from __future__ import annotations

import dataclasses
from abc import ABC
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar

from fusion_cache.config import lookup
from fusion_cache.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from fusion_cache.kernels.fused_linear import ChunkGradFn


AUTO = "auto"  # per teacher: the best loss the teacher allows (`resolve_loss_names`)


@dataclass(frozen=True)
class TeacherTraits:
    """What a teacher's cache allows, for choosing and checking its loss.

    Attributes:
        name: the teacher's label (for messages).
        same_vocab: the teacher's ids are the student's (same tokenizer and template, codec with ids).
        codec: the cache's codec (its ``has_ids``, ``has_logprobs`` and ``name`` are read).
        k: K of the cache (None: unknown).
        tokenizer_found: the teacher's own tokenizer was found (`train.vocab.teacher_tokenizer`), so its ids can be
            mapped onto the student's vocabulary; ``auto`` picks ``uld`` over ``mapped_kl`` where it was not.
    """

    name: str
    same_vocab: bool
    codec: Any
    k: int | None = None
    tokenizer_found: bool = True


class DistillLoss(ABC):
    """One distillation loss: per-row distances d [N] from the student's logits at a teacher's rows.

    Subclasses set ``name`` and ``description``, implement `rows`, and may override `grad_fn` (the fused lm_head
    path; the default differentiates `rows` by autograd on each chunk) and `check`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_ids: ClassVar[bool] = False  # the teacher's top-K ids in the student's vocabulary
    target: ClassVar[str] = "values"  # what the stream builds for a teacher of another tokenizer (module docstring)

    @abstractmethod
    def rows(self, logits: torch.Tensor, target: dict) -> torch.Tensor:
        """d [N] fp32, differentiable w.r.t. ``logits`` [N, V]; ``target`` holds values [N, Kt] (and ids [N, Kt])."""

    def grad_fn(self, target: dict, coef: torch.Tensor, backend: str) -> ChunkGradFn:
        """The fused path's per-chunk callback (see `fusion_cache.kernels.fused_linear.FusedTerm`)."""
        from fusion_cache.kernels.fused_linear import autograd_grad_fn

        def rows(z: torch.Tensor, sl: slice) -> torch.Tensor:
            return self.rows(z, {key: value[sl] for key, value in target.items()})

        return autograd_grad_fn(rows, coef)

    def check(self, teacher: TeacherTraits) -> None:
        """Refuse a teacher this loss cannot use (ConfigError naming the teacher and the reason)."""
        _refuse_sampled(self, teacher)
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
    strict_k: bool = False  # k was asked for above every cache's K: refuse it (else min(k, K) values are compared)
    kd_temperature: float = 1.0  # refused unless 1 (`check`): ULD's own knob is `temperature`

    def _opts(self) -> dict:
        return dict(zscore=self.zscore, softmax=self.softmax, temperature=self.temperature, tail=self.tail)

    def rows(self, logits, target):
        from fusion_cache.train.functional import uld_loss

        return uld_loss(logits, target["values"], k=self.k, reduction="none", **self._opts())

    def grad_fn(self, target, coef, backend):
        from fusion_cache.kernels.fused_linear import uld_grad_fn

        return uld_grad_fn(target["values"], coef, k=self.k, backend=backend, opts={**self._opts(), "eps": 1e-7})

    def check(self, teacher):
        from fusion_cache.cache.codecs import require_logprobs

        _refuse_sampled(self, teacher)
        _refuse_kd_temperature(self, teacher, "ULD's softmax temperature is the `temperature` field (--temperature)")
        if self.tail:  # first: the tail bucket implies no z-score, and names the real reason
            require_logprobs(teacher.codec, "train --tail")
        if not self.zscore:
            require_logprobs(teacher.codec, "train --no-zscore")
        if teacher.k is None:
            return
        if self.strict_k and self.k > teacher.k:
            raise ConfigError(
                f"top_k={self.k} for teacher {teacher.name}: its cache holds K={teacher.k} values per position, so a "
                f"K={self.k} ULD cannot be computed; use --top-k {teacher.k} or less"
            )
        k_eff = min(self.k, teacher.k)
        if self.zscore and k_eff < 3:
            raise ConfigError(
                f"top_k={k_eff} for teacher {teacher.name} (the cache's K={teacher.k}): a z-scored ULD over {k_eff} "
                "values is identically zero (every row standardizes to the same values), so it would teach nothing; "
                "use --top-k 3 or more, or --no-zscore"
            )


@dataclass(frozen=True)
class TopKKL(DistillLoss):
    """Forward KL(teacher || student) over the teacher's cached top-K ids plus a tail bucket."""

    name: ClassVar[str] = "kl"
    description: ClassVar[str] = "top-K KL with a tail bucket (a teacher with the student's tokenizer; ids cached)"
    needs_ids: ClassVar[bool] = True
    tail: ClassVar[bool] = True  # the "everything else" bucket (`TopKKLNoTail`: without it)
    # KD temperature: the cached (T=1) teacher and the student both taken at T; the rows are scaled by T^2 so the
    # gradient's magnitude does not shrink as 1/T^2 and lambda keeps its meaning across temperatures (Hinton et al.)
    kd_temperature: float = 1.0

    def rows(self, logits, target):
        from fusion_cache.kernels.reference import topk_kl_rows_reference

        if "ids" not in target:
            raise ValueError("kd_loss 'kl' needs the teacher's ids in the batch (a same-tokenizer teacher)")
        t = self.kd_temperature
        return topk_kl_rows_reference(logits, target["ids"], target["values"], tail=self.tail, temperature=t) * t**2

    def check(self, teacher):
        from fusion_cache.cache.codecs import require_logprobs

        super().check(teacher)
        require_logprobs(teacher.codec, "train --kd-loss kl")


@dataclass(frozen=True)
class TopKKLNoTail(TopKKL):
    """`TopKKL` without the tail bucket: the teacher's top-K renormalised (DistillKit's plain sparse KD; biased)."""

    name: ClassVar[str] = "kl_notail"
    description: ClassVar[str] = "top-K KL over the renormalised top-K, no tail bucket (a same-tokenizer teacher)"
    tail: ClassVar[bool] = False


@dataclass(frozen=True)
class MappedKL(TopKKL):
    """`TopKKL` against the teacher's top-K carried onto the student's vocabulary (`train.vocab.carry`)."""

    name: ClassVar[str] = "mapped_kl"
    description: ClassVar[str] = "top-K KL through the byte-level vocabulary map (any tokenizer; ids cached)"
    needs_ids: ClassVar[bool] = False
    target: ClassVar[str] = "carried"

    def check(self, teacher):
        from fusion_cache.cache.codecs import require_logprobs

        _refuse_sampled(self, teacher)
        _require_ids(self, teacher)
        require_logprobs(teacher.codec, f"train --kd-loss {self.name}")


@dataclass(frozen=True)
class Hybrid(DistillLoss):
    """GOLD-style: KL on exactly matched tokens plus sorted L1 on the rest (`reference.hybrid_rows_reference`)."""

    name: ClassVar[str] = "hybrid"
    description: ClassVar[str] = "KL on exactly matched tokens + sorted L1 on the rest, as GOLD (any tokenizer)"
    target: ClassVar[str] = "exact"
    kd_temperature: float = 1.0  # refused unless 1 (`check`)

    def rows(self, logits, target):
        from fusion_cache.kernels.reference import hybrid_rows_reference

        if "ids" not in target:
            raise ValueError("kd_loss 'hybrid' needs the teacher's matched ids in the batch")
        return hybrid_rows_reference(logits, target["ids"], target["values"])

    def check(self, teacher):
        from fusion_cache.cache.codecs import require_logprobs

        _refuse_sampled(self, teacher)
        _refuse_kd_temperature(self, teacher, "its sorted-L1 part has no tempered form yet")
        _require_ids(self, teacher)
        require_logprobs(teacher.codec, f"train --kd-loss {self.name}")


@dataclass(frozen=True)
class SampledKL(DistillLoss):
    """Importance-weighted forward KL from a sampled cache (RS-KD; `kernels.reference.sampled_kl_rows_reference`).

    A teacher with the student's tokenizer: its draws, counts and T=1 log-probs themselves (the target's ``counts``).
    Another tokenizer: each row's self-normalised weights at ``kd_temperature`` (`sampled_weights_reference`),
    carried onto the student's vocabulary by `train.vocab.carry` as ``mapped_kl`` carries a top-K (the stream does it),
    so the target holds student ids and log weights whose shortfall from 1 (the draws that map to no student token)
    goes to a remainder bucket: the student tokens outside the map's image (``outside``, set from the map by
    `with_map`; `carried_sampled_kl_rows_reference`). That set is fixed by the map, not by the row's draws (a top-K
    tail bucket's is), so the gradient is linear in the carried weights and, at T=1 and at rows on a shared token
    boundary, an unbiased estimate of the gradient against the teacher's full distribution carried the same way
    (a mid-token row renormalises its agreeing draws, as ``mapped_kl`` does). The rows are scaled by T^2, as ``kl``'s.
    Without ``outside`` (a loss made without a map), the carried rows fall back to ``mapped_kl``'s row-wise tail.

    Attributes:
        kd_temperature: T.
        outside: bool [V_s] (torch), True for the student tokens no teacher token maps to; None for a same-tokenizer
            teacher.
    """

    name: ClassVar[str] = "rs_kl"
    description: ClassVar[str] = "importance-weighted KL of a sampled cache (--sampling rs, RS-KD; any tokenizer)"
    target: ClassVar[str] = "carried"
    kd_temperature: float = 1.0
    outside: Any = dataclasses.field(default=None, compare=False, repr=False)

    def with_map(self, vmap: Any) -> SampledKL:
        """This loss for a teacher of another tokenizer whose draws `vmap` (`train.vocab.VocabMap`) carries."""
        import torch

        return dataclasses.replace(self, outside=torch.from_numpy(vmap.outside()))

    def rows(self, logits, target):
        from fusion_cache.kernels.reference import carried_sampled_kl_rows_reference
        from fusion_cache.kernels.reference import sampled_kl_rows_reference
        from fusion_cache.kernels.reference import topk_kl_rows_reference

        if "ids" not in target:
            raise ValueError("kd_loss 'rs_kl' needs the drawn ids in the batch")
        t = self.kd_temperature
        if "counts" in target:  # the teacher's own draws (same tokenizer)
            d = sampled_kl_rows_reference(logits, target["ids"], target["values"], target["counts"], temperature=t)
        elif self.outside is not None:  # carried weights: already tempered, so only the student side is divided
            d = carried_sampled_kl_rows_reference(logits, target["ids"], target["values"], self.outside, temperature=t)
        else:
            d = topk_kl_rows_reference(logits.float() / t, target["ids"], target["values"], tail=True)
        return d * t**2

    def check(self, teacher):
        if not teacher.codec.has_counts:
            raise ConfigError(
                f"kd_loss {self.name!r} for teacher {teacher.name}: its cache (codec {teacher.codec.name!r}) holds a "
                "top-K, not sampled tokens; rebuild it with --sampling rs, or use kl / mapped_kl on a top-K cache"
            )


def _refuse_sampled(loss: DistillLoss, teacher: TeacherTraits) -> None:
    if getattr(teacher.codec, "has_counts", False):
        raise ConfigError(
            f"kd_loss {loss.name!r} for teacher {teacher.name}: its cache holds tokens sampled from the teacher "
            f"(codec {teacher.codec.name!r}), not a top-K; use kd_loss {SampledKL.name!r} (or 'auto')"
        )


def _refuse_kd_temperature(loss: DistillLoss, teacher: TeacherTraits, reason: str) -> None:
    if loss.kd_temperature != 1.0:
        raise ConfigError(
            f"kd_temperature={loss.kd_temperature} with kd_loss {loss.name!r} for teacher {teacher.name}: {reason}; "
            "use kd_loss kl or mapped_kl, or kd_temperature 1"
        )


def _require_ids(loss: DistillLoss, teacher: TeacherTraits) -> None:
    if not teacher.codec.has_ids:
        raise ConfigError(
            f"kd_loss {loss.name!r} for teacher {teacher.name}: a {teacher.codec.name!r} cache stores no token ids "
            "(the map carries each teacher token by its id); rebuild it with --codec full or raw, or use 'uld'"
        )


LOSSES: dict[str, type[DistillLoss]] = {
    cls.name: cls for cls in (ULD, TopKKL, TopKKLNoTail, MappedKL, Hybrid, SampledKL)
}
LOSS_CHOICES: tuple[str, ...] = (*LOSSES, AUTO)  # what a config or the CLI may name


def loss_help() -> str:
    """One line per loss name, for CLI help."""
    lines = [f"{name}: {cls.description}" for name, cls in LOSSES.items()]
    auto = f"{AUTO}: rs_kl for a sampled cache, kl for the student's own tokenizer, mapped_kl for another, else uld"
    return "; ".join([*lines, auto])


def make_loss(name: str, **options) -> DistillLoss:
    """The loss ``name`` with the options it takes (the others are ignored: one option set serves every loss).

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    cls = lookup(LOSSES, name, "kd_loss")
    fields = {f.name for f in dataclasses.fields(cls)}  # not ClassVars (`TopKKL.tail` is fixed per name)
    return cls(**{k: v for k, v in options.items() if k in fields})


def per_teacher(names: list[str], n: int) -> list[str]:
    """``names`` (one loss for every teacher, or one per teacher) as one name per teacher of ``n``."""
    if len(names) not in (1, n):
        raise ConfigError(f"kd_loss: give one loss for every teacher or one per cache ({n}), got {len(names)}: {names}")
    return list(names) * n if len(names) == 1 else list(names)


def resolve_loss_names(names: list[str], teachers: list[TeacherTraits]) -> list[str]:
    """One loss name per teacher: ``names`` is one name for all or one per teacher; ``auto`` becomes ``rs_kl`` for a
    sampled cache, ``kl`` for a teacher with the student's vocabulary, ``mapped_kl`` for another whose cache holds
    ids and log-probs and whose tokenizer was found, else ``uld``."""
    out = []
    for name, t in zip(per_teacher(names, len(teachers)), teachers, strict=True):
        if name == AUTO:
            if getattr(t.codec, "has_counts", False):
                name = SampledKL.name
            elif t.codec.has_ids and t.codec.has_logprobs and (t.same_vocab or t.tokenizer_found):
                name = TopKKL.name if t.same_vocab else MappedKL.name
            else:
                name = ULD.name
        out.append(name)
    return out
