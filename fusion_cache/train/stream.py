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
import pyarrow as pa
import torch

from fusion_cache.cache.reader import BatchPosition
from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import CacheRow
from fusion_cache.capture.render import render
from fusion_cache.capture.render import tokenizer_hash
from fusion_cache.errors import ConfigError


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


@dataclass
class _Ref:
    """Where one row sits in the cache: shard, record batch inside the shard, row inside the batch."""

    shard: int
    batch: int
    row: int


class CacheStream(torch.utils.data.IterableDataset):
    """Iterate StudentExamples from one cache, for ``epochs`` passes (None = forever); resumable at any example.

    ``iter(stream)`` starts at the beginning; ``stream.iterator(state)`` continues exactly where an earlier
    `StreamIterator.state_dict` was taken, yielding the same examples in the same order as the uninterrupted
    iterator would have. Under data parallelism each rank passes its ``rank`` and ``world_size`` and keeps the rows
    whose position in cache order is ``rank`` modulo ``world_size``: the ranks' rows are disjoint, together they
    are the whole cache, and their counts differ by at most one.

    Args:
        cache_dir: the teacher cache.
        tokenizer: the student's tokenizer.
        chat_template: render with the student's chat template (False: plain text).
        max_length: student sequences are truncated to this many tokens.
        shuffle_buffer: rows held for shuffling (1 = cache order).
        seed: shuffle seed; epoch e of rank r uses ``seed + e + 1_000_003 * r``.
        epochs: passes over the cache (None = forever).
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.
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
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        self.reader = CacheReader(cache_dir)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_length = max_length
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size
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
        # Copies, not views: a raw-codec row's arrays are views of the memory-mapped shard, and one example that
        # waits long in the shuffle buffer would keep its whole shard mapped and resident (bench_train (c)).
        teacher_ids = np.array(row.topk_ids[:n]) if self.same_tokenizer and self.reader.codec.has_ids else None
        top1 = None if teacher_ids is None else teacher_ids[:, 0]
        return StudentExample(row.sample_id, ids, start, np.array(row.topk_logprobs[:n]), top1, teacher_ids)

    def epoch_rng(self, epoch: int) -> random.Random:
        """The shuffle RNG of ``epoch`` on this rank (rank 0 of 1 keeps the single-process seeds)."""
        return random.Random(self.seed + epoch + 1_000_003 * self.rank)

    def iterator(self, state: dict | None = None) -> StreamIterator:
        """An iterator from the start, or from ``state`` (a `StreamIterator.state_dict` of this stream's settings)."""
        return StreamIterator(self, state)

    def __iter__(self) -> Iterator[StudentExample]:
        return self.iterator()

    def decode_rows(self, batch: pa.RecordBatch, rows: list[int], shard: int) -> list[CacheRow]:
        """Decode only ``rows`` of a record batch (all of it when that is every row: no copy)."""
        name = self.reader.manifest.shards[shard].path
        if len(rows) == batch.num_rows:
            return self.reader.decode_batch(batch, name)
        return self.reader.decode_batch(batch.take(pa.array(rows, type=pa.int64())), name)


def check_rank_layout(state: dict, rank: int, world_size: int) -> None:
    """Refuse a saved stream position taken by another rank layout (each rank saved its own part of the data)."""
    if (state.get("rank"), state.get("world_size")) != (rank, world_size):
        raise ConfigError(
            f"stream state: saved by rank {state.get('rank')} of {state.get('world_size')}, "
            f"loaded by rank {rank} of {world_size}; resume with the same number of processes"
        )


class StreamIterator:
    """The stateful iterator of a `CacheStream`; ``state_dict()`` between two examples captures it exactly.

    The state is small JSON: the epoch, the position of the next row to read (shard, record batch, row), how many
    rows of the epoch were passed (for the rank stride), the shuffle RNG's state, and the shuffle buffer as row
    positions, which ``load`` decodes again from the cache instead of storing the examples themselves.
    """

    def __init__(self, stream: CacheStream, state: dict | None = None):
        self.stream = stream
        self._epoch = 0
        self._new_epoch()
        if state is not None:
            self._restore(state)
        self._gen = self._run()

    def __iter__(self) -> StreamIterator:
        return self

    def __next__(self) -> StudentExample:
        return next(self._gen)

    def state_dict(self) -> dict:
        """JSON-serializable position after the last example returned (see the class docstring)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "cache_fingerprint": self.stream.reader.manifest.config_fingerprint,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "epoch": self._epoch,
            "position": [self._pos.shard, self._pos.batch, self._pos.row],
            "ordinal": self._ordinal,
            "yielded": self._yielded,
            "rng": [version, list(internal), gauss],
            "buffer": [[r.shard, r.batch, r.row] for r, _ in self._buf],
        }

    # ------------------------------------------------------------------ internals
    def _restore(self, state: dict) -> None:
        s = self.stream
        fp = s.reader.manifest.config_fingerprint
        if state.get("cache_fingerprint") != fp:
            raise ConfigError(
                f"stream state: saved for cache fingerprint {str(state.get('cache_fingerprint'))[:16]}..., "
                f"but {s.reader.path} has {fp[:16]}...; resume with the cache the run started with"
            )
        check_rank_layout(state, s.rank, s.world_size)
        self._epoch = int(state["epoch"])
        self._pos = _Ref(*(int(x) for x in state["position"]))
        self._ordinal = int(state["ordinal"])
        self._yielded = int(state["yielded"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._buf = self._reload_buffer([_Ref(*r) for r in state["buffer"]])

    def _reload_buffer(self, refs: list[_Ref]) -> list[tuple[_Ref, StudentExample]]:
        """Decode the buffered rows again, in buffer order (they lie between the oldest ref and the read position)."""
        if not refs:
            return []
        s = self.stream
        wanted: dict[tuple[int, int], list[int]] = {}
        for r in refs:
            wanted.setdefault((r.shard, r.batch), []).append(r.row)
        last = max(wanted)
        found: dict[tuple[int, int, int], StudentExample] = {}
        for pos, batch in s.reader.iter_batches(BatchPosition(*min(wanted))):
            key = (pos.shard, pos.batch)
            if key in wanted:
                rows = sorted(set(wanted[key]))
                for i, row in zip(rows, s.decode_rows(batch, rows, pos.shard), strict=True):
                    found[(*key, i)] = s.example(row)
            if key >= last:
                break
        buf = []
        for r in refs:
            ex = found.get((r.shard, r.batch, r.row))
            if ex is None:
                raise ConfigError(f"stream state: buffered row {r} is not in {s.reader.path} (or has no answer)")
            buf.append((r, ex))
        return buf

    def _new_epoch(self) -> None:
        self._pos = _Ref(0, 0, 0)
        self._ordinal = 0
        self._yielded = 0
        self._rng = self.stream.epoch_rng(self._epoch)
        self._buf = []

    def _run(self) -> Iterator[StudentExample]:
        s = self.stream
        n_shards = len(s.reader.manifest.shards)
        while s.epochs is None or self._epoch < s.epochs:
            if self._pos.shard < n_shards:  # still reading this epoch's rows
                start = self._pos
                for pos, batch in s.reader.iter_batches(BatchPosition(start.shard, start.batch)):
                    first = start.row if (pos.shard, pos.batch) == (start.shard, start.batch) else 0
                    base = self._ordinal - first  # ordinal of row 0 of this batch
                    mine = [i for i in range(first, batch.num_rows) if (base + i) % s.world_size == s.rank]
                    decoded = dict(zip(mine, s.decode_rows(batch, mine, pos.shard), strict=True)) if mine else {}
                    for i in range(first, batch.num_rows):
                        # advance before any yield: the state then says "this row is done"
                        self._pos = _Ref(pos.shard, pos.batch, i + 1)
                        self._ordinal = base + i + 1
                        ex = s.example(decoded[i]) if i in decoded else None
                        if ex is None:
                            continue
                        if s.shuffle_buffer <= 1:
                            self._yielded += 1
                            yield ex
                            continue
                        self._buf.append((_Ref(pos.shard, pos.batch, i), ex))
                        if len(self._buf) >= s.shuffle_buffer:
                            _, out = self._buf.pop(self._rng.randrange(len(self._buf)))
                            self._yielded += 1
                            yield out
                self._pos = _Ref(n_shards, 0, 0)
                self._rng.shuffle(self._buf)  # the drain order; saved with the buffer, so it survives a resume
            while self._buf:
                _, out = self._buf.pop(0)
                self._yielded += 1
                yield out
            if self._yielded == 0 and (s.epochs is None or s.epochs > 1):  # every further epoch would be empty too
                raise ConfigError(
                    f"{s.reader.path}: rank {s.rank} of {s.world_size} got no usable rows in epoch {self._epoch} "
                    f"({s.reader.manifest.stats.rows} rows in the cache); use fewer processes or a larger cache"
                )
            self._epoch += 1
            self._new_epoch()


def pad_answers(examples: list, pad_id: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Pad a batch of examples (anything with ``input_ids`` and ``answer_start``) and index its answer positions.

    Returns:
        ({input_ids [B, L] int64, attention_mask [B, L] (right padding), answer_index [M]: flat indices into the
        B * L positions whose logits predict an answer token (position p predicts token p + 1), answer_targets [M]
        those tokens}, the index in M of each sample's first answer row).
    """
    b = len(examples)
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention = torch.zeros((b, length), dtype=torch.long)
    answer_index, targets, starts = [], [], []
    m = 0
    for i, e in enumerate(examples):
        n_tok = len(e.input_ids)
        input_ids[i, :n_tok] = torch.from_numpy(e.input_ids)
        attention[i, :n_tok] = 1
        n_ans = n_tok - e.answer_start
        answer_index.append(i * length + e.answer_start - 1 + np.arange(n_ans))
        targets.append(e.input_ids[e.answer_start :])
        starts.append(m)
        m += n_ans
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "answer_index": torch.from_numpy(np.concatenate(answer_index)).long(),
        "answer_targets": torch.from_numpy(np.concatenate(targets)).long(),
    }
    return batch, starts


def collate(examples: list[StudentExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch and index the answer positions.

    Returns:
        input_ids, attention_mask, answer_index, answer_targets as `pad_answers`;
        uld_rows [N]: indices into the M answer rows that have a teacher row (index alignment), with
            teacher_values [N, Kt], row_weights [N] (1 / (n_b * B): mean over a sample's positions, then over the
            batch) and teacher_top1 [N] (-1 when the tokenizers differ);
        teacher_ids [N, Kt] int64, only when every example has the teacher's ids (same tokenizer, codec with ids).
    """
    b = len(examples)
    batch, starts = pad_answers(examples, pad_id)
    uld_rows, vals, weights, top1 = [], [], [], []
    for e, m in zip(examples, starts, strict=True):
        n = e.teacher_values.shape[0]  # <= n_ans: answer token t pairs with teacher row t
        uld_rows.append(m + np.arange(n))
        vals.append(e.teacher_values)
        weights.append(np.full(n, 1.0 / (max(n, 1) * b), dtype=np.float32))  # n = 0: no teacher rows (CE-only eval)
        top1.append(e.teacher_top1 if e.teacher_top1 is not None else np.full(n, -1, dtype=np.int32))
    batch.update(
        uld_rows=torch.from_numpy(np.concatenate(uld_rows)).long(),
        teacher_values=torch.from_numpy(np.concatenate(vals)).float(),
        row_weights=torch.from_numpy(np.concatenate(weights)),
        teacher_top1=torch.from_numpy(np.concatenate(top1).astype(np.int64)),
    )
    if all(e.teacher_ids is not None for e in examples):
        batch["teacher_ids"] = torch.from_numpy(np.concatenate([e.teacher_ids for e in examples]).astype(np.int64))
    return batch
