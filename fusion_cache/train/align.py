"""Pair a student's answer rows with a teacher's across tokenizers: byte-span alignment (default) or ULD's index one.

A *row* is one answer position of the loss: row t of a model predicts answer token t, from the logits of the token
before it (the context token ``answer_start - 1 + t``; for row 0 that is the last prompt token). Rows are
comparable when both models have consumed exactly the same answer text, i.e. their context tokens **end at the same
byte** of the answer. Offsets are taken relative to the answer's first byte (the end of the last prompt token), so
the two models may render different prompts (chat templates, plain text) and still share the answer's bytes.

- ``bytes`` (docs/fusion.md, "Alignment of answer rows across tokenizers"): a student row is paired with the
  teacher row whose context token ends at the same answer byte; rows with no partner are dropped. Nothing crosses
  the prompt/answer boundary: only answer rows are paired, and row 0 of each side (context = the whole prompt)
  pairs with row 0 of the other.
- ``index`` (ULD, arXiv 2402.12030): row t pairs with row t for t < min(n_student, n_teacher), whatever the text.

The cached offsets are character-granular (the fast tokenizers' offset mapping, see docs/fusion.md): when a
byte-level tokenizer splits a multi-byte character over two tokens, both get the character's whole span. Such a
token does not really end where its span says, and it is recognized by the next token starting before its end
(the two overlap); its row is not a valid boundary and is never paired. Everything here is numpy over whole rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field

import numpy as np

from fusion_cache.config import lookup
from fusion_cache.errors import ConfigError


@dataclass(frozen=True)
class TokenSpans:
    """One model's view of one sample, as the cache (or `fusion_cache.capture.render.render`) stores it.

    Attributes:
        byte_start: int [n_tokens] start of each token in the UTF-8 bytes of the model's rendered text.
        byte_end: int [n_tokens] one past the end of each token.
        answer_start: index of the first answer token (>= 1).
        n_rows: answer rows available (<= n_tokens - answer_start; fewer after truncation).
    """

    byte_start: np.ndarray
    byte_end: np.ndarray
    answer_start: int
    n_rows: int

    def __post_init__(self) -> None:
        n_tokens = len(self.byte_start)
        if len(self.byte_end) != n_tokens:
            raise ConfigError(f"byte_start has {n_tokens} entries but byte_end has {len(self.byte_end)}")
        if not 1 <= self.answer_start < n_tokens:
            raise ConfigError(f"answer_start={self.answer_start} invalid for {n_tokens} tokens")
        if not 0 <= self.n_rows <= n_tokens - self.answer_start:
            raise ConfigError(f"n_rows={self.n_rows} invalid: {n_tokens - self.answer_start} answer tokens")


@dataclass(frozen=True)
class Alignment:
    """Pairs of (student row, teacher row), both increasing.

    Attributes:
        student_rows: int64 [P] student answer rows.
        teacher_rows: int64 [P] teacher answer rows (into the cache's top-K block).
        n_student: student answer rows that could have been paired.
        n_teacher: teacher answer rows that could have been paired.
    """

    student_rows: np.ndarray
    teacher_rows: np.ndarray
    n_student: int
    n_teacher: int

    @property
    def aligned(self) -> int:
        return len(self.student_rows)

    @property
    def dropped_student(self) -> int:
        return self.n_student - self.aligned

    @property
    def dropped_teacher(self) -> int:
        return self.n_teacher - self.aligned


def answer_boundaries(spans: TokenSpans) -> tuple[np.ndarray, np.ndarray]:
    """The rows whose context ends at a real token boundary, and where (bytes after the answer's start).

    Returns:
        (rows int64 [R], ends int64 [R]): rows increasing, ends strictly increasing; row 0 is always first, at 0.
        Where several rows end at the same byte (a zero-width token) the last one is kept: it has seen the most.
    """
    n = spans.n_rows
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    start = np.asarray(spans.byte_start, dtype=np.int64)
    end = np.asarray(spans.byte_end, dtype=np.int64)
    ctx = spans.answer_start - 1 + np.arange(n)  # context token of each row; ctx + 1 always exists
    rel = end[ctx] - end[spans.answer_start - 1]
    # a token overlapped by the next one ends inside a character (char-granular offsets): not a boundary
    real = start[ctx + 1] >= end[ctx]
    real[0] = True  # the prompt and the answer are tokenized separately: their boundary is always real
    rows = np.flatnonzero(real)
    ends = rel[rows]
    last_of_run = np.ones(len(rows), dtype=bool)
    last_of_run[:-1] = ends[1:] != ends[:-1]
    return rows[last_of_run], ends[last_of_run]


def align_bytes(student: TokenSpans, teacher: TokenSpans) -> Alignment:
    """Byte-span alignment: pair rows whose context tokens end at the same answer byte."""
    s_rows, s_ends = answer_boundaries(student)
    t_rows, t_ends = answer_boundaries(teacher)
    _, si, ti = np.intersect1d(s_ends, t_ends, assume_unique=True, return_indices=True)
    return Alignment(s_rows[si], t_rows[ti], student.n_rows, teacher.n_rows)


def align_index(n_student: int, n_teacher: int) -> Alignment:
    """ULD's index alignment: row t with row t over the first ``min(n_student, n_teacher)`` answer rows.

    Also the exact alignment when both sides have the same tokenizer and template (identical tokens).
    """
    rows = np.arange(min(n_student, n_teacher), dtype=np.int64)
    return Alignment(rows, rows, n_student, n_teacher)


# The alignment modes (the module docstring defines them): name -> (student, teacher) -> Alignment.
# `TrainConfig.align` takes these names.
ALIGNERS: dict[str, Callable[[TokenSpans, TokenSpans], Alignment]] = {
    "bytes": align_bytes,
    "index": lambda student, teacher: align_index(student.n_rows, teacher.n_rows),
}
ALIGN_MODES: tuple[str, ...] = tuple(ALIGNERS)


def align(mode: str, student: TokenSpans, teacher: TokenSpans) -> Alignment:
    """Align by the mode named ``mode`` (a key of ``ALIGNERS``).

    Raises:
        ConfigError: an unknown mode; the message lists the valid ones.
    """
    return lookup(ALIGNERS, mode, "align")(student, teacher)


@dataclass
class AlignStats:
    """Running counts of aligned and dropped answer rows (one per teacher in a run)."""

    samples: int = 0
    student_rows: int = 0
    teacher_rows: int = 0
    aligned: int = 0
    empty: int = field(default=0)  # samples where nothing could be paired

    def add(self, a: Alignment) -> None:
        self.samples += 1
        self.student_rows += a.n_student
        self.teacher_rows += a.n_teacher
        self.aligned += a.aligned
        self.empty += a.aligned == 0

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "aligned": self.aligned,
            "dropped_student": self.student_rows - self.aligned,
            "dropped_teacher": self.teacher_rows - self.aligned,
            "aligned_fraction_of_student": round(self.aligned / self.student_rows, 4) if self.student_rows else None,
            "samples_without_pairs": self.empty,
        }
