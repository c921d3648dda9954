"""Streams a teacher cache into student training examples; memory does not grow with the cache.

Rows are decoded one record batch at a time, re-rendered for the student (or reused as is when the student has
the teacher's tokenizer and template), aligned by index over the answer tokens (ULD's alignment: the first
``min(n_student, n_teacher)`` answer positions) and passed through a bounded, seeded shuffle buffer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.writer import CacheRow
from fusion_cache.render import render
from fusion_cache.render import tokenizer_hash


@dataclass
class StudentExample:
    """One training sample for the student.

    Attributes:
        input_ids: int64 [n] student tokens.
        answer_start: index of the first answer token.
        teacher_values: float32 [n_aligned, Kt] teacher top-K log-probs for student answer tokens 0..n_aligned-1.
        teacher_top1: int32 [n_aligned] teacher's most likely token ids (same-tokenizer caches only, else None).
        teacher_ids: int32 [n_aligned, Kt] the teacher's top-K ids (same tokenizer and a codec with ids, else None).
    """

    sample_id: str
    input_ids: np.ndarray
    answer_start: int
    teacher_values: np.ndarray
    teacher_top1: np.ndarray | None
    teacher_ids: np.ndarray | None = None


class CacheStream(torch.utils.data.IterableDataset):
    """Iterate StudentExamples from one cache, for ``epochs`` passes (None = forever).

    Args:
        cache_dir: the teacher cache.
        tokenizer: the student's tokenizer.
        chat_template: render with the student's chat template (False: plain text).
        max_length: student sequences are truncated to this many tokens.
        shuffle_buffer: rows held for shuffling (1 = cache order).
        seed: shuffle seed; epoch e uses seed + e.
    """

    def __init__(
        self,
        cache_dir: str,
        tokenizer: Any,
        *,
        chat_template: bool,
        max_length: int,
        shuffle_buffer: int = 1,
        seed: int = 0,
        epochs: int | None = 1,
    ):
        self.reader = CacheReader(cache_dir)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_length = max_length
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epochs = epochs
        t = self.reader.manifest.teacher
        # Same tokens for the student as for the teacher: reuse the cached ids and compare top-1 ids directly.
        self.same_tokenizer = tokenizer_hash(tokenizer) == t.tokenizer_hash and chat_template == t.chat_template

    def example(self, row: CacheRow) -> StudentExample | None:
        """The student's view of one cached row (None when no answer token survives truncation)."""
        if self.same_tokenizer:
            ids, start = row.input_ids.astype(np.int64), row.answer_start
        else:
            r = render(self.tokenizer, json.loads(row.conversation), chat_template=self.chat_template)
            ids, start = r.input_ids.astype(np.int64), r.answer_start
        ids = ids[: self.max_length]
        n = min(len(ids) - start, row.topk_logprobs.shape[0])
        if n < 1:
            return None
        # a `values` cache has no ids: training needs only the values, the top-1 agreement metric is skipped
        teacher_ids = row.topk_ids[:n] if self.same_tokenizer and self.reader.codec.has_ids else None
        top1 = None if teacher_ids is None else teacher_ids[:, 0]
        return StudentExample(row.sample_id, ids, start, row.topk_logprobs[:n], top1, teacher_ids)

    def __iter__(self) -> Iterator[StudentExample]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(self.seed + epoch)
            buf: list[StudentExample] = []
            for row in self.reader.iter_rows():
                ex = self.example(row)
                if ex is None:
                    continue
                if self.shuffle_buffer <= 1:
                    yield ex
                    continue
                buf.append(ex)
                if len(buf) >= self.shuffle_buffer:
                    yield buf.pop(rng.randrange(len(buf)))
            rng.shuffle(buf)
            yield from buf
            epoch += 1


def collate(examples: list[StudentExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch and index the answer positions.

    Returns:
        input_ids [B, L] int64 and attention_mask [B, L] (right padding);
        answer_index [M]: flat indices into the B * L positions whose logits predict an answer token (position p
            predicts token p + 1), and answer_targets [M] those tokens;
        uld_rows [N]: indices into the M answer rows that have a teacher row (index alignment), with
            teacher_values [N, Kt], row_weights [N] (1 / (n_b * B): mean over a sample's positions, then over the
            batch) and teacher_top1 [N] (-1 when the tokenizers differ);
        teacher_ids [N, Kt] int64, only when every example has the teacher's ids (same tokenizer, codec with ids).
    """
    b = len(examples)
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    answer_index, targets, uld_rows, vals, weights, top1 = [], [], [], [], [], []
    m = 0
    for i, e in enumerate(examples):
        n_tok = len(e.input_ids)
        input_ids[i, :n_tok] = torch.from_numpy(e.input_ids)
        attention[i, :n_tok] = 1
        n_ans = n_tok - e.answer_start
        answer_index.append(i * length + e.answer_start - 1 + np.arange(n_ans))
        targets.append(e.input_ids[e.answer_start :])
        n = e.teacher_values.shape[0]  # <= n_ans: answer token t pairs with teacher row t
        uld_rows.append(m + np.arange(n))
        m += n_ans
        vals.append(e.teacher_values)
        weights.append(np.full(n, 1.0 / (n * b), dtype=np.float32))
        top1.append(e.teacher_top1 if e.teacher_top1 is not None else np.full(n, -1, dtype=np.int32))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "answer_index": torch.from_numpy(np.concatenate(answer_index)).long(),
        "answer_targets": torch.from_numpy(np.concatenate(targets)).long(),
        "uld_rows": torch.from_numpy(np.concatenate(uld_rows)).long(),
        "teacher_values": torch.from_numpy(np.concatenate(vals)).float(),
        "row_weights": torch.from_numpy(np.concatenate(weights)),
        "teacher_top1": torch.from_numpy(np.concatenate(top1).astype(np.int64)),
    }
    if all(e.teacher_ids is not None for e in examples):
        batch["teacher_ids"] = torch.from_numpy(np.concatenate([e.teacher_ids for e in examples]).astype(np.int64))
    return batch
