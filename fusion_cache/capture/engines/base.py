"""The contract every teacher engine (vLLM, transformers) implements.

An engine turns token sequences into the teacher's top-K next-token log-probabilities at the answer positions.
Row t of a capture is the distribution that predicts ``input_ids[answer_start + t]``, i.e. it comes from the
logits at position ``answer_start + t - 1`` (so ``answer_start >= 1``). Values are natural-log probabilities of
the full-vocabulary softmax in fp32, sorted descending; ties keep the lower token id first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fusion_cache.errors import ConfigError


@dataclass(frozen=True)
class TopKCapture:
    """Top-K of one sequence's answer positions.

    Attributes:
        ids: int32 [n_answer, K], token ids sorted by descending log-probability.
        logprobs: float32 [n_answer, K], the matching log-probabilities (descending).
        target_logprobs: float32 [n_answer], log-probability of the actual next token ``input_ids[answer_start + t]``.
        counts: uint8 [n_answer, N] of a sampled capture (`capture.sampling`), else None: then ``ids`` and
            ``logprobs`` are [n_answer, N], each position's distinct draws most likely first with their counts
            (summing to N), padded with id -1, log-prob -inf and count 0.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    target_logprobs: np.ndarray
    counts: np.ndarray | None = None


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to capture: the full rendered token ids and the index of the first answer token (>= 1); for a
    sampled capture, ``sample_key`` (`capture.sampling.sample_key`) seeds its draws."""

    input_ids: Sequence[int]
    answer_start: int
    sample_key: int | None = None


class TeacherEngine(Protocol):
    """What `fusion_cache.capture.build` needs from an engine."""

    name: str  # "vllm" or "hf"
    dtype: str  # "float32" or "bfloat16", as actually run

    def capture(self, requests: Sequence[SequenceRequest], k: int, samples: int | None = None) -> list[TopKCapture]:
        """Top-K log-probabilities at the answer positions of every request, in request order; with ``samples`` N,
        N draws per position instead (`capture.sampling`; every request carries its ``sample_key``)."""
        ...

    def generate(
        self, prompts: Sequence[Sequence[int]], *, max_tokens: int, temperature: float, seed: int
    ) -> list[list[int]]:
        """Continue each prompt (token ids) and return the generated token ids, stop tokens excluded."""
        ...

    def sample_n(
        self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float, seed: int,
        progress: bool = False,
    ) -> list[list[list[int]]]:  # fmt: skip
        """``n`` continuations of each prompt, ``[prompt][sample]``, stop tokens excluded; deterministic per seed
        (``progress``: show a progress bar)."""
        ...

    def close(self) -> None:
        """Release the model (and vLLM's engine)."""
        ...


def check_sample_keys(requests: Sequence[SequenceRequest], samples: int | None) -> None:
    """A sampled capture needs every request's seed key (an internal invariant: the build sets them)."""
    if samples is not None:
        missing = [i for i, r in enumerate(requests) if r.sample_key is None]
        assert not missing, f"samples={samples}: requests {missing[:5]} carry no sample_key"


def check_sampling(prompts: Sequence[Sequence[int]], *, n: int = 1, max_tokens: int, temperature: float,
                   flag: str = "") -> None:  # fmt: skip
    """Refuse sampling settings every engine refuses, naming the setting (``flag`` "--" names CLI flags)."""
    if n < 1:
        raise ConfigError(f"{flag}n: must be >= 1, got {n}")
    if max_tokens < 1:
        raise ConfigError(f"{flag}max{'-' if flag else '_'}tokens: must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ConfigError(f"{flag}temperature: must be >= 0, got {temperature}")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("prompts: every prompt needs at least one token")
