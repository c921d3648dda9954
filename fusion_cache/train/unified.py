"""Unified fusion (InfiFusion_u): one student trained against several teacher caches at once.

    stream = UnifiedStream(["cache/a", "cache/b"], tokenizer, chat_template=True, max_length=1024)
    for batch in ...: out = unified_losses(model, collate_unified(examples, pad, stream.n_teachers, "mean"), ...)

The caches are joined on sample_id while streaming (`fusion_cache.train.join`), each sample is rendered once for the
student, and each teacher's answer rows are paired with the student's by byte-span or index alignment
(`train.align`). The loss is ``(1 - lambda) * CE + lambda * combine_s(L_pair,s)`` with the per-row weights of
`fusion_cache.train.weights`; each teacher's own ``L_pair,s`` is returned for the logs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import CacheRow
from fusion_cache.capture.render import render
from fusion_cache.capture.render import tokenizer_hash
from fusion_cache.errors import ConfigError
from fusion_cache.train.align import AlignStats
from fusion_cache.train.align import TokenSpans
from fusion_cache.train.align import align
from fusion_cache.train.align import align_index
from fusion_cache.train.join import CacheJoin
from fusion_cache.train.join import unique_names
from fusion_cache.train.losses import uld_loss
from fusion_cache.train.objective import answer_logits
from fusion_cache.train.stream import check_rank_layout
from fusion_cache.train.stream import pad_answers
from fusion_cache.train.weights import sample_row_weights
from fusion_cache.train.weights import topk_entropy


@dataclass
class TeacherTarget:
    """One teacher's signal for one sample.

    Attributes:
        student_rows: int64 [P] student answer rows (increasing) that the teacher is aligned to.
        values: float32 [P, Kt] the teacher's top-K log-probs at the paired rows.
        top1: int32 [P] teacher's most likely ids (same tokenizer and a codec with ids), else None.
        entropy: float64 [P] entropy of the teacher's cached distribution at those rows (`combine.topk_entropy`).
    """

    student_rows: np.ndarray
    values: np.ndarray
    top1: np.ndarray | None
    entropy: np.ndarray


@dataclass
class UnifiedExample:
    """One sample for the student with every teacher that has it (``teachers[s]`` None: absent or nothing aligned)."""

    sample_id: str
    input_ids: np.ndarray  # int64 [n]
    answer_start: int
    teachers: list[TeacherTarget | None]


class UnifiedStream(torch.utils.data.IterableDataset):
    """Iterate UnifiedExamples from several caches joined on sample_id, for ``epochs`` passes (None = forever).

    Args:
        cache_dirs: one cache per teacher.
        tokenizer: the student's tokenizer.
        chat_template: render with the student's chat template (False: plain text).
        max_length: student sequences are truncated to this many tokens.
        align_mode: ``bytes`` (default) or ``index``; a teacher with the student's tokenizer and template is always
            paired row for row (identical tokens).
        k: the loss's K, used for the teachers' entropies.
        shuffle_buffer, seed: bounded seeded shuffle, as `fusion_cache.train.stream.CacheStream` (epoch e of rank r uses
            ``seed + e + 1_000_003 * r``).
        join_window: see `fusion_cache.train.join.CacheJoin`.
        rank, world_size: data parallelism: this rank keeps the joined samples whose position in join order is
            ``rank`` modulo ``world_size`` (disjoint across ranks, together every sample). Every rank reads every
            cache; only its own samples are aligned.

    ``iter(stream)`` starts at the beginning; ``stream.iterator(state)`` continues where an earlier
    `UnifiedIterator.state_dict` was taken (exact: the same examples in the same order as without the stop).

    Attributes:
        names: one unique label per cache (the teachers' names).
        join: the join, whose ``counts`` say how many samples had every teacher and which were missing.
        align_stats: per teacher, the aligned and dropped answer rows so far.
        skipped: samples left out: no answer token after truncation, or no row aligned to any teacher.
    """

    def __init__(
        self,
        cache_dirs: list[str],
        tokenizer: Any,
        *,
        chat_template: bool,
        max_length: int,
        align_mode: str = "bytes",
        k: int = 10,
        shuffle_buffer: int = 1,
        seed: int = 0,
        epochs: int | None = 1,
        join_window: int = 1024,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        self.rank = rank
        self.world_size = world_size
        self.readers = [CacheReader(d) for d in cache_dirs]
        self.names = unique_names([r.manifest.teacher.name for r in self.readers])
        self.join = CacheJoin(self.readers, self.names, window=join_window)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_length = max_length
        self.align_mode = align_mode
        self.k = k
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epochs = epochs
        student_hash = tokenizer_hash(tokenizer)
        self.same_tokenizer = [
            student_hash == r.manifest.teacher.tokenizer_hash and chat_template == r.manifest.teacher.chat_template
            for r in self.readers
        ]
        self.align_stats = {n: AlignStats() for n in self.names}
        self.skipped = {"no_answer_token": 0, "nothing_aligned": 0}

    @property
    def n_teachers(self) -> int:
        return len(self.readers)

    def counts(self) -> dict:
        """The join's and the alignments' counts so far (for logs and the run summary)."""
        return {
            "join": self.join.counts.as_dict(),
            "align": {n: s.as_dict() for n, s in self.align_stats.items()},
            "skipped": dict(self.skipped),
            "align_mode": self.align_mode,
        }

    def _student_view(self, rows: list[CacheRow | None]) -> tuple[np.ndarray, TokenSpans]:
        # a teacher with the student's tokenizer and template already holds the student's tokens
        for s, row in enumerate(rows):
            if row is not None and self.same_tokenizer[s]:
                ids, start, b0, b1 = row.input_ids, row.answer_start, row.token_byte_start, row.token_byte_end
                break
        else:
            row = next(r for r in rows if r is not None)
            r = render(self.tokenizer, json.loads(row.conversation), chat_template=self.chat_template)
            ids, start, b0, b1 = r.input_ids, r.answer_start, r.byte_start, r.byte_end
        ids = ids[: self.max_length].astype(np.int64)
        return ids, TokenSpans(b0, b1, start, max(0, len(ids) - start))

    def example(self, rows: list[CacheRow | None]) -> UnifiedExample | None:
        """The student's view of one joined sample (None when nothing is left to train on)."""
        ids, spans = self._student_view(rows)
        if spans.n_rows < 1:
            self.skipped["no_answer_token"] += 1
            return None
        targets: list[TeacherTarget | None] = []
        for s, row in enumerate(rows):
            if row is None:
                targets.append(None)
                continue
            if self.same_tokenizer[s]:
                a = align_index(spans.n_rows, row.n_answer)
            else:
                teacher = TokenSpans(row.token_byte_start, row.token_byte_end, row.answer_start, row.n_answer)
                a = align(self.align_mode, spans, teacher)
            self.align_stats[self.names[s]].add(a)
            if a.aligned == 0:
                targets.append(None)
                continue
            values = row.topk_logprobs[a.teacher_rows]
            top1 = row.topk_ids[a.teacher_rows, 0] if self.same_tokenizer[s] and self.readers[s].codec.has_ids else None
            targets.append(TeacherTarget(a.student_rows, values, top1, topk_entropy(values, self.k)))
        if all(t is None for t in targets):
            self.skipped["nothing_aligned"] += 1
            return None
        sample_id = next(r.sample_id for r in rows if r is not None)
        return UnifiedExample(sample_id, ids, spans.answer_start, targets)

    def fingerprints(self) -> list[str]:
        """The caches' config fingerprints, in order (a saved position is only valid for these caches)."""
        return [r.manifest.config_fingerprint for r in self.readers]

    def iterator(self, state: dict | None = None) -> UnifiedIterator:
        """An iterator from the start, or from ``state`` (a `UnifiedIterator.state_dict` of this stream's settings)."""
        return UnifiedIterator(self, state)

    def __iter__(self) -> Iterator[UnifiedExample]:
        return self.iterator()

    def _generate(self) -> Iterator[UnifiedExample]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = random.Random(self.seed + epoch + 1_000_003 * self.rank)
            buf: list[UnifiedExample] = []
            for ordinal, rows in enumerate(self.join):
                if ordinal % self.world_size != self.rank:
                    continue
                ex = self.example(rows)
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


class UnifiedIterator:
    """The stateful iterator of a `UnifiedStream`; ``state_dict()`` between two examples captures it exactly.

    The state is the number of examples already returned (plus the caches' fingerprints and the rank layout).
    Restoring replays the stream that far: the join's pending samples, the alignments and the shuffle buffer are
    rebuilt exactly as they were, and the join and alignment counts come out as in an uninterrupted run. The
    replay decodes and aligns but runs no model, so it costs a small fraction of the training it skips (the
    reader's throughput against the trainer's is in benchmarks/results/train.md).
    """

    def __init__(self, stream: UnifiedStream, state: dict | None = None):
        self.stream = stream
        self._yielded = 0
        self._gen = stream._generate()
        if state is not None:
            self._restore(state)

    def __iter__(self) -> UnifiedIterator:
        return self

    def __next__(self) -> UnifiedExample:
        ex = next(self._gen)
        self._yielded += 1
        return ex

    def state_dict(self) -> dict:
        """JSON-serializable position after the last example returned."""
        s = self.stream
        return {"cache_fingerprints": s.fingerprints(), "rank": s.rank, "world_size": s.world_size,
                "yielded": self._yielded}  # fmt: skip

    def _restore(self, state: dict) -> None:
        s = self.stream
        if state.get("cache_fingerprints") != s.fingerprints():
            raise ConfigError(
                f"stream state: saved for caches with fingerprints {state.get('cache_fingerprints')}, but the "
                f"caches given have {s.fingerprints()}; resume with the caches the run started with, in that order"
            )
        check_rank_layout(state, s.rank, s.world_size)
        target = int(state["yielded"])
        for _ in range(target):
            if next(self._gen, None) is None:
                raise ConfigError(f"stream state: position {target} is past the end of the joined caches")
        self._yielded = target


def collate_unified(
    examples: list[UnifiedExample], pad_id: int, n_teachers: int, combine: str, *, temperature: float = 1.0
) -> dict[str, Any]:
    """Pad a batch, index the answer positions and lay out each teacher's rows with their loss weights.

    Returns:
        input_ids [B, L], attention_mask [B, L], answer_index [M], answer_targets [M] as `stream.collate`, and
        ``teachers``: per teacher, None (no sample of the batch has it) or a dict with rows [N_s] (indices into the
        M answer rows), values [N_s, Kt_s], loss_weights [N_s] (the combine mode's), log_weights [N_s] (its own
        L_pair,s: mean over its rows, then over the samples that have it) and top1 [N_s] (-1 where unknown).
    """
    b = len(examples)
    batch, starts = pad_answers(examples, pad_id)
    per: list[dict[str, list]] = [{"rows": [], "values": [], "w": [], "log": [], "top1": []} for _ in range(n_teachers)]
    have = [sum(e.teachers[s] is not None for e in examples) for s in range(n_teachers)]
    for e, m in zip(examples, starts, strict=True):
        rows = [t.student_rows if t is not None else None for t in e.teachers]
        ents = [t.entropy if t is not None else None for t in e.teachers]
        weights = sample_row_weights(rows, ents, combine, b, temperature=temperature)
        for s, t in enumerate(e.teachers):
            if t is None:
                continue
            n = len(t.student_rows)
            per[s]["rows"].append(m + t.student_rows)
            per[s]["values"].append(t.values)
            per[s]["w"].append(weights[s])
            per[s]["log"].append(np.full(n, 1.0 / (have[s] * n), dtype=np.float32))
            per[s]["top1"].append(t.top1 if t.top1 is not None else np.full(n, -1, dtype=np.int32))
    teachers: list[dict | None] = []
    for s in range(n_teachers):
        if not have[s]:
            teachers.append(None)
            continue
        p = per[s]
        teachers.append(
            {
                "rows": torch.from_numpy(np.concatenate(p["rows"])).long(),
                "values": torch.from_numpy(np.concatenate(p["values"])).float(),
                "loss_weights": torch.from_numpy(np.concatenate(p["w"])),
                "log_weights": torch.from_numpy(np.concatenate(p["log"])),
                "top1": torch.from_numpy(np.concatenate(p["top1"]).astype(np.int64)),
            }
        )
    return {**batch, "teachers": teachers}


@dataclass
class UnifiedStepOutput:
    """Loss terms of one batch; the fields of `objective.StepOutput` plus each teacher's own term."""

    loss: torch.Tensor
    ce: torch.Tensor
    uld: torch.Tensor  # combine_s(L_pair,s), as weighted into the loss
    answer_tokens: int
    top1_hits: int
    top1_total: int
    teacher_uld: list[float | None]  # L_pair,s per teacher (None: no sample of the batch has it)


def unified_losses(
    model: torch.nn.Module,
    batch: dict[str, Any],
    *,
    lambda_: float,
    k: int,
    zscore: bool = True,
    softmax: bool = True,
    temperature: float = 1.0,
) -> UnifiedStepOutput:
    """``(1 - lambda) * CE + lambda * sum_s sum_r w[s, r] * d[s, r]`` for one `collate_unified` batch.

    Each teacher's distances ``d[s]`` [N_s] come from the student logits at its own rows (``uld_loss`` with
    reduction "none"), so teachers with different K or alignments never need a common layout. With lambda == 0
    the ULD terms are computed for the logs only, without a graph.
    """
    logits = answer_logits(model, batch)  # [M, V]
    ce = F.cross_entropy(logits.float(), batch["answer_targets"])
    opts = dict(k=k, zscore=zscore, softmax=softmax, temperature=temperature, reduction="none")
    kd = logits.new_zeros((), dtype=torch.float32)
    per_teacher: list[float | None] = []
    hits = total = 0
    for t in batch["teachers"]:
        if t is None:
            per_teacher.append(None)
            continue
        rows = logits[t["rows"]]  # [N_s, V]
        with torch.set_grad_enabled(lambda_ > 0 and torch.is_grad_enabled()):
            d = uld_loss(rows if lambda_ > 0 else rows.detach(), t["values"], **opts)  # [N_s]
        kd = kd + (t["loss_weights"].to(d.dtype) * d).sum()
        per_teacher.append(float((t["log_weights"].to(d.dtype) * d.detach()).sum()))
        with torch.no_grad():
            known = t["top1"] >= 0
            hits += int((rows.argmax(-1) == t["top1"])[known].sum())
            total += int(known.sum())
    loss = (1.0 - lambda_) * ce + lambda_ * kd if lambda_ > 0 else ce
    return UnifiedStepOutput(loss, ce, kd.detach(), int(batch["answer_targets"].numel()), hits, total, per_teacher)


# ---------------------------------------------------------------- what the trainer (train.py) calls in unified mode


def make_unified_stream(
    cfg: Any, tokenizer: Any, epochs: int | None, *, rank: int = 0, world_size: int = 1
) -> UnifiedStream:
    """The stream of a `TrainConfig` with mode "unified" (this rank's part under data parallelism)."""
    from fusion_cache.capture.render import has_chat_template

    return UnifiedStream(
        list(cfg.shards),
        tokenizer,
        chat_template=has_chat_template(tokenizer),
        max_length=cfg.max_length,
        align_mode=cfg.align,
        k=cfg.top_k,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        epochs=epochs,
        join_window=cfg.join_window,
        rank=rank,
        world_size=world_size,
    )


def unified_step(
    model: torch.nn.Module, examples: list[UnifiedExample], pad_id: int, cfg: Any, stream: UnifiedStream
) -> UnifiedStepOutput:
    """Collate ``examples`` and compute the unified loss with ``cfg``'s settings."""
    batch = collate_unified(examples, pad_id, stream.n_teachers, cfg.combine, temperature=cfg.uncertainty_temperature)
    return unified_losses(
        model, batch, lambda_=cfg.lambda_, k=cfg.top_k, zscore=cfg.zscore, softmax=cfg.softmax,
        temperature=cfg.temperature,
    )  # fmt: skip


class TeacherTerms:
    """Averages each teacher's L_pair,s over the micro-batches of one optimizer step that had it.

    ``pop()`` gives ``{"uld_<teacher>": value or None}`` for the step's metrics record and starts the next step.
    """

    def __init__(self, names: list[str]):
        self.names = names
        self._sum = [0.0] * len(names)
        self._n = [0] * len(names)

    def add(self, terms: list[float | None]) -> None:
        for s, v in enumerate(terms):
            if v is not None:
                self._sum[s] += v
                self._n[s] += 1

    def pop(self) -> dict[str, float | None]:
        out = {f"uld_{n}": (self._sum[s] / self._n[s] if self._n[s] else None) for s, n in enumerate(self.names)}
        self._sum = [0.0] * len(self.names)
        self._n = [0] * len(self.names)
        return out
