"""Streams S >= 1 teacher caches into student training examples; memory does not grow with the caches.

    stream = DistillStream(["cache/a", "cache/b"], tokenizer, chat_template=True, max_length=1024)
    for ex in stream: ...      # ex.teachers[s]: teacher s's aligned rows of this sample, or None

The caches are joined on sample_id (`train.join`; one cache is the S = 1 case: no join at all), each sample is
rendered once for the student (or its cached tokens are reused when a teacher has the student's tokenizer and
template), and each teacher's answer rows are paired with the student's (`train.align`): a teacher with the
student's tokenizer row for row, another by byte span (default) or by index (ULD's alignment). For a teacher of
another tokenizer whose loss keeps token identity, its cached ids are also put in the student's vocabulary through
a vocabulary map (`train.vocab`): exactly matching tokens only (``exact``, for the hybrid loss), or every candidate
carried to the student token it starts with, at every student row inside a span the teacher predicted
(``carried``, for the mapped KL). Examples pass
through a bounded, seeded shuffle buffer. The stream is resumable at any example: `DistillIterator.state_dict` is
small JSON (the join's positions, the shuffle RNG and the buffered samples as row positions), and restoring it
decodes only the rows it names again.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fusion_cache.cache.reader import CacheReader
from fusion_cache.cache.row import CacheRow
from fusion_cache.cache.row import MissingField
from fusion_cache.capture.render import render
from fusion_cache.capture.render import tokenizer_hash
from fusion_cache.errors import ConfigError
from fusion_cache.train.align import Alignment
from fusion_cache.train.align import AlignStats
from fusion_cache.train.align import TokenSpans
from fusion_cache.train.align import align
from fusion_cache.train.align import align_index
from fusion_cache.train.align import answer_boundaries
from fusion_cache.train.join import CacheJoin
from fusion_cache.train.join import JoinCounts
from fusion_cache.train.join import RowRef
from fusion_cache.train.join import Sample
from fusion_cache.train.join import fetch_rows
from fusion_cache.train.join import unique_names
from fusion_cache.train.vocab import Carried
from fusion_cache.train.vocab import carry
from fusion_cache.train.weights import answer_nll_per_byte
from fusion_cache.train.weights import topk_entropy

log = logging.getLogger(__name__)

# why the stream leaves a joined sample out (the keys of `DistillStream.skipped`)
DROP_REASONS = ("no_answer_token", "nothing_aligned")


@dataclass
class TeacherTarget:
    """One teacher's signal for one sample (arrays owned by the example, never views of a mapped shard).

    Attributes:
        student_rows: int64 [P] student answer rows (increasing) that the teacher is aligned to.
        values: float32 [P, Kt] the teacher's top-K log-probs at the paired rows (sorted descending; a carried
            target's are the log-probs of ``ids``, -inf in empty slots).
        ids: int32 [P, Kt] the teacher's top-K token ids in the student's vocabulary, -1 where a token has none
            (a teacher with the student's tokenizer and a codec that stores ids: its own ids; another teacher with an
            ``exact`` or ``carried`` target: mapped ids), else None.
        entropy: float64 [P] entropy of the teacher's cached distribution at those rows (`weights.topk_entropy`),
            when the stream was asked for it (the ``uncertainty`` combine), else None.
        answer_nll: the teacher's cross-entropy on the sample's whole gold answer in nats per byte
            (`weights.answer_nll_per_byte`), when the stream was asked for it (the ``min_ce`` combine), else None.
        counts: float32 [P, Kt] of a sampled cache's teacher with the student's tokenizer: how many of the N draws
            gave each id (0 in padding slots; ``values`` are then the draws' T=1 log-probs, ``ids`` the drawn ids,
            -1 in padding); else None. (A sampled teacher of another tokenizer gets a carried target: ``values`` are
            the log importance weights at ``kd_temperature`` carried onto student ids, `train.losses.SampledKL`.)
    """

    student_rows: np.ndarray
    values: np.ndarray
    ids: np.ndarray | None = None
    entropy: np.ndarray | None = None
    answer_nll: float | None = None
    counts: np.ndarray | None = None

    @property
    def top1(self) -> np.ndarray | None:
        """int32 [P] the teacher's most likely ids (None when ``ids`` is)."""
        return None if self.ids is None else self.ids[:, 0]


@dataclass
class Example:
    """One sample for the student with every teacher that has it (``teachers[s]`` None: absent or nothing aligned).

    Attributes:
        sample_id: the sample's id (32 hex chars).
        input_ids: int64 [n] student tokens.
        answer_start: index of the first answer token.
        teachers: [S] per teacher, its aligned rows or None.
        refs: [S] where each teacher's row of the sample is in its cache (None: absent), when it came from a
            stream (errors name the rows of a failing batch).
    """

    sample_id: str
    input_ids: np.ndarray
    answer_start: int
    teachers: list[TeacherTarget | None]
    refs: list[RowRef | None] | None = None


class DistillStream(torch.utils.data.IterableDataset):
    """Iterate Examples from S >= 1 caches joined on sample_id, for ``epochs`` passes (None = forever).

    Args:
        caches: one cache (a path or fsspec URL) per teacher.
        tokenizer: the student's tokenizer.
        chat_template: render with the student's chat template (False: plain text).
        max_length: student sequences are truncated to this many tokens.
        align_mode: ``bytes`` (default) or ``index``, for teachers with another tokenizer; a teacher with the
            student's tokenizer and template is always paired row for row (identical tokens).
        entropy_k: compute each teacher's entropy over its top-``entropy_k`` values (the ``uncertainty``
            combine needs it); None skips it.
        answer_scores: give each target the teacher's cross-entropy on the gold answer (the ``min_ce`` combine
            needs it; the cache must store target log-probs).
        targets: [S] per teacher, the target its loss reads when it has another tokenizer: ``values`` (default),
            ``exact`` or ``carried`` (`train.losses`); the last two need ``maps``.
        maps: [S] per teacher, its `train.vocab.VocabMap` onto the student's vocabulary, or None.
        shuffle_buffer: examples held for shuffling (1 = join order); seed: shuffle seed; epoch e of rank r uses
            ``seed + e + 1_000_003 * r``.
        join_window: see `train.join.CacheJoin`.
        kd_temperature: T of a sampled cache's importance weights when they are carried onto another tokenizer's
            vocabulary (``carried`` target; `train.losses.SampledKL`).
        rank, world_size: data parallelism: this rank keeps the joined samples whose position in join order is
            ``rank`` modulo ``world_size`` (disjoint across ranks, together every sample, counts within one).
            None (both): `data_parallel_rank`, i.e. ``torch.distributed``'s rank and world size when a process group
            is initialised, else the RANK and WORLD_SIZE that torchrun and ``accelerate launch`` set, else 0 of 1.
            Pass ``rank=0, world_size=1`` when something else splits the stream: ``accelerator.prepare`` of its
            DataLoader (accelerate dispatches or shards the batches itself; `train.batch.PaddedCollator`).

    Inside a `DataLoader` with ``num_workers`` W, worker w of rank r keeps the samples of part ``r * W + w`` of
    ``world_size * W``: no sample twice, none lost, whatever the numbers of workers and ranks.

    ``iter(stream)`` starts at the beginning; ``stream.iterator(state)`` continues exactly where an earlier
    `DistillIterator.state_dict` was taken, yielding the same examples in the same order.

    Attributes:
        names: one unique label per cache (the teachers' names).
        same_tokenizer: [S] whether teacher s has the student's tokenizer and template.
        join_counts: how many samples had every teacher and which were missing (cumulative over passes).
        align_stats: per teacher, the aligned and dropped answer rows so far.
        skipped: samples dropped so far, by reason (`DROP_REASONS`): ``no_answer_token`` (no answer token left
            within ``max_length``), ``nothing_aligned`` (no answer row aligned to any teacher). Each pass ends with
            one log line of its counts, and a warning that says why when it yielded nothing.
        where: this stream's part of the data, for logs (rank, and DataLoader worker inside one).
    """

    def __init__(
        self,
        caches: list[str] | str,
        tokenizer: Any,
        *,
        chat_template: bool,
        max_length: int,
        align_mode: str = "bytes",
        entropy_k: int | None = None,
        answer_scores: bool = False,
        targets: list[str] | None = None,
        maps: list | None = None,
        shuffle_buffer: int = 1,
        seed: int = 0,
        epochs: int | None = 1,
        join_window: int = 1024,
        kd_temperature: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        rank, world_size = data_parallel_rank(rank, world_size)
        caches = [caches] if isinstance(caches, str) else list(caches)
        self.readers = [CacheReader(c) for c in caches]
        self.names = unique_names([r.manifest.teacher.name for r in self.readers])
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_length = max_length
        self.align_mode = align_mode
        self.entropy_k = entropy_k
        self.answer_scores = answer_scores
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epochs = epochs
        self.join_window = join_window
        self.kd_temperature = kd_temperature
        self.rank = rank
        self.world_size = world_size
        self.same_tokenizer = [shares_tokenizer(r, tokenizer, chat_template) for r in self.readers]
        n = len(self.readers)
        self.targets = list(targets) if targets is not None else ["values"] * n
        self.maps = list(maps) if maps is not None else [None] * n
        if len(self.targets) != n or len(self.maps) != n:
            raise ConfigError(f"targets and maps: one per cache ({n}), got {len(self.targets)} and {len(self.maps)}")
        for s, (target, vmap) in enumerate(zip(self.targets, self.maps, strict=True)):
            if target not in ("values", "exact", "carried"):
                raise ConfigError(f"targets[{s}]: unknown value {target!r}; valid values: values, exact, carried")
            if target != "values" and not self.same_tokenizer[s] and vmap is None:
                raise ConfigError(f"teacher {self.names[s]}: a {target!r} target needs a vocabulary map")
        self.join_counts = JoinCounts(list(self.names))
        self.align_stats = {n: AlignStats() for n in self.names}
        self.skipped = dict.fromkeys(DROP_REASONS, 0)
        self.where = f"rank {rank} of {world_size}"

    @property
    def n_teachers(self) -> int:
        return len(self.readers)

    def has_ids(self, s: int) -> bool:
        """Whether teacher s's examples carry its top-K ids in the student's vocabulary."""
        return self.same_tokenizer[s] and self.readers[s].codec.has_ids

    def counts(self) -> dict:
        """The join's and the alignments' counts so far (for logs and the run summary)."""
        return {
            "join": self.join_counts.as_dict(),
            "align": {n: s.as_dict() for n, s in self.align_stats.items()},
            "skipped": dict(self.skipped),
            "align_mode": self.align_mode,
        }

    def fingerprints(self) -> list[str]:
        """The caches' config fingerprints, in order (a saved position is only valid for these caches)."""
        return [r.manifest.config_fingerprint for r in self.readers]

    # ------------------------------------------------------------------ one sample
    def _student_view(self, rows: list[CacheRow | None]) -> tuple[np.ndarray, TokenSpans]:
        """The student's tokens and their byte spans for one joined sample."""
        # a teacher with the student's tokenizer and template already holds the student's tokens
        for s, row in enumerate(rows):
            if row is not None and self.same_tokenizer[s]:
                ids, start, b0, b1 = row.input_ids, row.answer_start, row.token_byte_start, row.token_byte_end
                break
        else:
            row = next(r for r in rows if r is not None)
            r = render(self.tokenizer, json.loads(row.conversation), chat_template=self.chat_template)
            ids, start, b0, b1 = r.input_ids, r.answer_start, r.byte_start, r.byte_end
        # a copy: a raw-codec row's arrays are views of the memory-mapped shard, and an example that waits long in
        # the shuffle buffer would keep its whole shard mapped and resident (benchmarks/bench_train.py (c))
        ids = np.array(ids[: self.max_length], dtype=np.int64)
        return ids, TokenSpans(b0, b1, start, max(0, len(ids) - start))

    def example(self, rows: list[CacheRow | None]) -> Example | None:
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
            target = self._target(s, row, spans)
            if target is not None and self.entropy_k is not None:
                target.entropy = topk_entropy(target.values, self.entropy_k)
            if target is not None and self.answer_scores:
                target.answer_nll = answer_score(row, self.names[s])
            targets.append(target)
        if all(t is None for t in targets):
            self.skipped["nothing_aligned"] += 1
            return None
        sample_id = next(r.sample_id for r in rows if r is not None)
        return Example(sample_id, ids, spans.answer_start, targets)

    def _target(self, s: int, row: CacheRow, spans: TokenSpans) -> TeacherTarget | None:
        """Teacher s's target for one sample (None: nothing aligned); counts the alignment."""
        mode = "values" if self.same_tokenizer[s] else self.targets[s]
        if mode == "carried":
            return self._carried(s, row, spans)
        if self.same_tokenizer[s]:
            a = align_index(spans.n_rows, row.n_answer)
        else:
            teacher = TokenSpans(row.token_byte_start, row.token_byte_end, row.answer_start, row.n_answer)
            a = align(self.align_mode, spans, teacher)
        self.align_stats[self.names[s]].add(a)
        if a.aligned == 0:
            return None
        values = np.asarray(row.topk_logprobs[a.teacher_rows], dtype=np.float32)  # fancy indexing: a copy
        ids = counts = None
        if self.has_ids(s):
            ids = np.asarray(row.topk_ids[a.teacher_rows], dtype=np.int32)
        elif mode == "exact":
            ids = self.maps[s].exact_ids(row.topk_ids[a.teacher_rows])
        if row.sample_counts is not None:
            counts = np.asarray(row.sample_counts[a.teacher_rows], dtype=np.float32)
        return TeacherTarget(a.student_rows, values, ids, counts=counts)

    def _carried(self, s: int, row: CacheRow, spans: TokenSpans) -> TeacherTarget | None:
        """Teacher s's top-K carried onto the student's vocabulary at every student row it predicts."""
        c = carry_row(self.maps[s], row, spans, kd_temperature=self.kd_temperature)
        a = Alignment(c.student_rows, c.student_rows, spans.n_rows, row.n_answer)  # counted: rows with a target
        self.align_stats[self.names[s]].add(a)
        if not len(c.student_rows):
            return None
        return TeacherTarget(c.student_rows, c.logprobs, c.ids)

    # ------------------------------------------------------------------ iteration
    def join(self, state: dict | None = None) -> CacheJoin:
        """One pass of the join (from ``state`` when given); with one cache, only this rank's rows are decoded."""
        wanted = None
        if self.n_teachers == 1 and self.world_size > 1:
            rank, world = self.rank, self.world_size
            wanted = lambda ordinal: ordinal % world == rank  # noqa: E731
        return CacheJoin(
            self.readers, self.names, window=self.join_window, counts=self.join_counts, wanted=wanted, state=state
        )

    def epoch_rng(self, epoch: int) -> random.Random:
        """The shuffle RNG of ``epoch`` on this rank (rank 0 of 1 keeps the single-process seeds)."""
        return random.Random(self.seed + epoch + 1_000_003 * self.rank)

    def iterator(self, state: dict | None = None) -> DistillIterator:
        """An iterator from the start, or from ``state`` (a `DistillIterator.state_dict` of this stream's settings)."""
        return DistillIterator(self, state)

    def __iter__(self) -> Iterator[Example]:
        """Every example of this rank; inside a `DataLoader` worker, only that worker's share of them (worker w of
        W on rank r takes the samples of rank ``r * W + w`` of ``world_size * W``), so the workers together yield
        each sample once."""
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers <= 1:
            return self.iterator()
        worker = copy.copy(self)  # the reader objects are shared read-only; counters are per worker
        worker.rank = self.rank * info.num_workers + info.id
        worker.world_size = self.world_size * info.num_workers
        worker.join_counts = JoinCounts(list(self.names))
        worker.align_stats = {n: AlignStats() for n in self.names}
        worker.skipped = dict.fromkeys(DROP_REASONS, 0)
        worker.where = f"{self.where}, DataLoader worker {info.id} of {info.num_workers}"
        return worker.iterator()


def data_parallel_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """This process's (rank, world size): the arguments when given; else ``torch.distributed``'s when a process
    group is initialised; else the RANK and WORLD_SIZE environment variables (torchrun, ``accelerate launch``);
    else (0, 1).

    Raises:
        ConfigError: only one of the two given, or a rank outside [0, world_size).
    """
    if (rank is None) != (world_size is None):
        raise ConfigError(f"rank, world_size: give both or neither, got rank={rank}, world_size={world_size}")
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank: must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def answer_score(row: CacheRow, name: str) -> float:
    """The teacher's cross-entropy on the row's gold answer in nats per byte: its cached log-probs of the answer's
    tokens over the bytes they cover (at most the answer's: a chat template's end-of-turn text is not the answer)."""
    if isinstance(row.target_logprobs, MissingField):
        raise ConfigError(f"teacher {name}: combine 'min_ce' needs the answer tokens' log-probs, which its codec "
                          "does not store")  # fmt: skip
    end = np.asarray(row.token_byte_end, dtype=np.int64)
    last = row.answer_start + row.n_answer - 1
    covered = int(end[last] - end[row.answer_start - 1]) if row.n_answer else 0
    answer = len(json.loads(row.conversation)[-1]["content"].encode())
    return answer_nll_per_byte(row.target_logprobs, min(covered, answer) if covered > 0 else answer)


def carry_row(vmap: Any, row: CacheRow, spans: TokenSpans, *, kd_temperature: float = 1.0) -> Carried:
    """A cached row's top-K carried onto the student's vocabulary (`train.vocab.carry`) for the student answer rows
    of ``spans``: the student's and the teacher's rows that end at real token boundaries, the answer's bytes.

    A sampled row carries its draws' self-normalised importance weights at ``kd_temperature``
    (`kernels.reference.sampled_weights_reference`) instead of log-probs: carrying is linear in the mass, so the
    carried weights estimate the carried tempered teacher, and draws that map to no student token fall into the
    tail bucket, as unmapped top-K mass does."""
    s_rows, s_ends = answer_boundaries(spans)
    student_ends = np.full(spans.n_rows, -1, dtype=np.int64)
    student_ends[s_rows] = s_ends
    teacher = TokenSpans(row.token_byte_start, row.token_byte_end, row.answer_start, row.n_answer)
    t_rows, t_ends = answer_boundaries(teacher)
    answer = json.loads(row.conversation)[-1]["content"].encode()
    values = row.topk_logprobs[t_rows]
    if row.sample_counts is not None:
        from fusion_cache.kernels.reference import sampled_weights_reference

        counts = torch.from_numpy(np.asarray(row.sample_counts[t_rows], dtype=np.float64))
        values = sampled_weights_reference(torch.from_numpy(np.asarray(values, np.float64)), counts, kd_temperature)
        values = values.numpy().astype(np.float32)
    return carry(vmap, student_ends, t_ends, row.topk_ids[t_rows], values, answer)


def shares_tokenizer(reader: CacheReader, tokenizer: Any, chat_template: bool | None = None) -> bool:
    """Whether a student with ``tokenizer`` (rendering with its chat template, or as ``chat_template`` says) sees
    exactly the teacher's tokens: the same tokenizer hash and the same rendering."""
    from fusion_cache.capture.render import has_chat_template

    chat = has_chat_template(tokenizer) if chat_template is None else chat_template
    t = reader.manifest.teacher
    return tokenizer_hash(tokenizer) == t.tokenizer_hash and chat == t.chat_template


def check_rank_layout(state: dict, rank: int, world_size: int) -> None:
    """Refuse a saved stream position taken by another rank layout (each rank saved its own part of the data)."""
    if (state.get("rank"), state.get("world_size")) != (rank, world_size):
        raise ConfigError(
            f"stream state: saved by rank {state.get('rank')} of {state.get('world_size')}, "
            f"loaded by rank {rank} of {world_size}; resume with the same number of processes"
        )


class DistillIterator:
    """The stateful iterator of a `DistillStream`; ``state_dict()`` between two examples captures it exactly.

    The state is small JSON: the epoch, the join's state (`CacheJoin.state_dict`: read positions and the samples
    waiting for partners), the shuffle RNG's state, the buffered examples as the row positions of their samples
    (decoded and rebuilt on restore instead of being stored), and the counters.
    """

    def __init__(self, stream: DistillStream, state: dict | None = None):
        self.stream = stream
        self._epoch = 0
        self._yielded = 0  # examples returned in this epoch
        self._rng = stream.epoch_rng(0)
        self._buf: list[tuple[list[RowRef | None], Example]] = []
        self._join: CacheJoin | None = stream.join()  # None: this epoch's samples are all read; draining
        if state is not None:
            self._restore(state)
        self._gen = self._run()

    def __iter__(self) -> DistillIterator:
        return self

    def __next__(self) -> Example:
        return next(self._gen)

    def state_dict(self) -> dict:
        """JSON-serializable position after the last example returned (see the class docstring)."""
        s = self.stream
        version, internal, gauss = self._rng.getstate()
        return {
            "cache_fingerprints": s.fingerprints(),
            "rank": s.rank,
            "world_size": s.world_size,
            "epoch": self._epoch,
            "yielded": self._yielded,
            "join": self._join.state_dict() if self._join is not None else None,
            "rng": [version, list(internal), gauss],
            "buffer": [[r.to_json() if r is not None else None for r in refs] for refs, _ in self._buf],
            "counts": {
                "join": s.join_counts.as_dict(),
                "align": {n: vars(a) for n, a in s.align_stats.items()},
                "skipped": dict(s.skipped),
            },
        }

    def _restore(self, state: dict) -> None:
        s = self.stream
        if state.get("cache_fingerprints") != s.fingerprints():
            raise ConfigError(
                f"stream state: saved for caches with fingerprints {state.get('cache_fingerprints')}, but the "
                f"caches given have {s.fingerprints()}; resume with the caches the run started with, in that order"
            )
        check_rank_layout(state, s.rank, s.world_size)
        self._epoch = int(state["epoch"])
        self._yielded = int(state["yielded"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._join = s.join(state["join"]) if state["join"] is not None else None
        # rebuild the buffered examples from their rows; then put back the counters as they were saved
        buffered = [[RowRef.from_json(r) if r is not None else None for r in refs] for refs in state["buffer"]]
        rows = [
            fetch_rows(reader, [refs[i] for refs in buffered if refs[i] is not None])
            for i, reader in enumerate(s.readers)
        ]
        self._buf = []
        for refs in buffered:
            ex = s.example([rows[i][r] if r is not None else None for i, r in enumerate(refs)])
            if ex is None:
                raise ConfigError(f"stream state: a buffered sample at {refs} has nothing to train on")
            ex.refs = refs
            self._buf.append((refs, ex))
        counts = state["counts"]
        s.join_counts.load(counts["join"])
        for name, a in counts["align"].items():
            vars(s.align_stats[name]).update({k: int(v) for k, v in a.items()})
        s.skipped.update({k: int(v) for k, v in counts["skipped"].items()})

    def _run(self) -> Iterator[Example]:
        s = self.stream
        while s.epochs is None or self._epoch < s.epochs:
            if self._join is not None:  # still reading this epoch's samples
                for sample in self._join:
                    ex = self._example(sample)
                    if ex is None:
                        continue
                    if s.shuffle_buffer <= 1:
                        self._yielded += 1
                        yield ex
                        continue
                    self._buf.append((sample.refs, ex))
                    if len(self._buf) >= s.shuffle_buffer:
                        _, out = self._buf.pop(self._rng.randrange(len(self._buf)))
                        self._yielded += 1
                        yield out
                self._join = None
                self._rng.shuffle(self._buf)  # the drain order; saved with the buffer, so it survives a resume
            while self._buf:
                _, out = self._buf.pop(0)
                self._yielded += 1
                yield out
            if self._yielded == 0:  # nothing usable: say why, rather than end (or loop) silently
                why = (
                    f"{s.where} got no usable samples in epoch {self._epoch} "
                    f"({', '.join(str(r.path) for r in s.readers)}; dropped so far: {s.skipped}, "
                    f"max_length={s.max_length})"
                )
                if s.epochs is None or s.epochs > 1:  # every further epoch would be empty too
                    raise ConfigError(f"{why}; use fewer processes, a larger cache or a larger max_length")
                log.warning("%s", why)
            else:
                log.info("%s: epoch %d yielded %d samples; dropped so far: %s", s.where, self._epoch,
                         self._yielded, s.skipped)  # fmt: skip
            self._epoch += 1
            self._yielded = 0
            self._rng = s.epoch_rng(self._epoch)
            self._join = s.join() if s.epochs is None or self._epoch < s.epochs else None

    def _example(self, sample: Sample) -> Example | None:
        s = self.stream
        if sample.ordinal % s.world_size != s.rank:
            return None
        ex = s.example(sample.rows)
        if ex is not None:
            ex.refs = sample.refs
        return ex
