"""Collate a batch of `stream.Example`: the student's padded tokens, its answer positions, and each teacher's rows.

    batch = collate(examples, pad_id, n_teachers=2, combine="mean")
    batch["teachers"][s]   # teacher s: rows [N_s] into the M answer rows, values [N_s, Kt], weights, ...

Every distillation loss reads the same layout, whatever the number of teachers (one is the single-teacher case).

That layout is flat (``answer_index`` [M], a teacher's ``rows`` [N_s]), so it does not survive a split along dim 0:
accelerate's ``prepare``d DataLoader (and so HF ``Trainer`` and TRL) cuts every tensor of a batch along dim 0.
`PaddedCollator` is the collate_fn for those: every tensor has dim 0 = B and a fixed length L, and each process
turns its share back into the flat layout with ``unpad`` after the split:

    collator = PaddedCollator.for_stream(stream, pad_id)     # stream: rank=0, world_size=1 (accelerate splits)
    loader = accelerator.prepare(DataLoader(stream, batch_size=8, collate_fn=collator))
    for padded in loader:
        batch = collator.unpad(padded)                       # == collate(this process's examples)
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any

import numpy as np
import torch

from fusion_cache.errors import ConfigError
from fusion_cache.train.stream import Example
from fusion_cache.train.stream import TeacherTarget
from fusion_cache.train.weights import sample_row_weights


def answer_text_bytes(tokenizer, ex: Example) -> int:
    """UTF-8 bytes of an example's answer text (special tokens left out): what CE per byte divides by."""
    text = tokenizer.decode(ex.input_ids[ex.answer_start :].tolist(), skip_special_tokens=True)
    return len(text.encode("utf-8"))


def answer_bytes(tokenizer, examples: list[Example]) -> torch.Tensor:
    """[B] float64 `answer_text_bytes` of each example: a batch's ``answer_bytes``, what the student gate
    (``kd_gate``) divides the student's answer CE by."""
    return torch.tensor([answer_text_bytes(tokenizer, e) for e in examples], dtype=torch.float64)


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


def collate(
    examples: list, pad_id: int, n_teachers: int, combine: str = "mean", *, temperature: float = 1.0
) -> dict[str, Any]:
    """Pad a batch, index the answer positions and lay out each teacher's rows with their loss weights.

    Args:
        examples: `stream.Example` list (B samples).
        pad_id: the student's padding token.
        n_teachers: S.
        combine: how the teachers' terms combine into the loss (a name of `train.weights.COMBINES`).
        temperature: T of the uncertainty combine.

    Returns:
        input_ids [B, L], attention_mask [B, L], answer_index [M], answer_targets [M] as `pad_answers`,
        answer_sample [M] int64 (the sample of each answer row), and ``teachers``: per teacher, None (no sample of
        the batch has it) or a dict with
        rows [N_s] int64 (indices into the M answer rows, strictly increasing), values [N_s, Kt] float32,
        ids [N_s, Kt] int64 (only when every sample that has the teacher carries its ids), counts [N_s, Kt] float32
        (a sampled cache's draws, `stream.TeacherTarget.counts`),
        loss_weights [N_s] (the combine mode's: the loss adds sum_r w_r d_r), log_weights [N_s] (the teacher's own
        term, logged: mean over its rows, then over the batch's samples that have it), top1 [N_s] (-1 where
        unknown) and answer_nll [N_s] float64 (the teacher's answer CE of each row's sample, nats per byte, when the
        stream computed it: ``answer_scores``).
    """
    b = len(examples)
    batch, starts = pad_answers(examples, pad_id)
    n_answer = np.diff([*starts, len(batch["answer_targets"])])  # [B] each sample's answer rows
    batch["answer_sample"] = torch.from_numpy(np.repeat(np.arange(b, dtype=np.int64), n_answer))
    keys = ("rows", "values", "ids", "counts", "w", "log", "top1", "nll")
    per: list[dict[str, list]] = [{key: [] for key in keys} for _ in range(n_teachers)]
    have = [sum(e.teachers[s] is not None for e in examples) for s in range(n_teachers)]
    for e, m in zip(examples, starts, strict=True):
        rows = [t.student_rows if t is not None else None for t in e.teachers]
        ents = [t.entropy if t is not None else None for t in e.teachers]
        scores = [t.answer_nll if t is not None else None for t in e.teachers]
        weights = sample_row_weights(rows, ents, combine, b, temperature=temperature, scores=scores)
        for s, t in enumerate(e.teachers):
            if t is None:
                continue
            n = len(t.student_rows)
            p = per[s]
            p["rows"].append(m + t.student_rows)
            p["values"].append(t.values)
            p["ids"].append(t.ids)
            p["counts"].append(t.counts)
            p["w"].append(weights[s])
            p["log"].append(np.full(n, 1.0 / (have[s] * n), dtype=np.float32))
            p["top1"].append(t.top1 if t.top1 is not None else np.full(n, -1, dtype=np.int32))
            p["nll"].append(None if t.answer_nll is None else np.full(n, t.answer_nll, dtype=np.float64))
    teachers: list[dict | None] = []
    for s in range(n_teachers):
        if not have[s]:
            teachers.append(None)
            continue
        p = per[s]
        t = {
            "rows": torch.from_numpy(np.concatenate(p["rows"]).astype(np.int64)),
            "values": torch.from_numpy(np.concatenate(p["values"])).float(),
            "loss_weights": torch.from_numpy(np.concatenate(p["w"])),
            "log_weights": torch.from_numpy(np.concatenate(p["log"])),
            "top1": torch.from_numpy(np.concatenate(p["top1"]).astype(np.int64)),
        }
        if all(ids is not None for ids in p["ids"]):
            t["ids"] = torch.from_numpy(np.concatenate(p["ids"]).astype(np.int64))
        if all(x is not None for x in p["nll"]):  # the gate (``kd_gate``) compares them with the student's
            t["answer_nll"] = torch.from_numpy(np.concatenate(p["nll"]))
        if all(c is not None for c in p["counts"]):  # a sampled cache's draws (train.losses.SampledKL)
            t["counts"] = torch.from_numpy(np.concatenate(p["counts"])).float()
        teachers.append(t)
    return {**batch, "teachers": teachers}


@dataclass(frozen=True)
class PaddedCollator:
    """A collate_fn whose batch survives a split along dim 0 (accelerate, HF Trainer, TRL), and its inverse.

    ``collator(examples)`` gives a flat dict of tensors, every one with dim 0 = B and padded to fixed sizes, because
    accelerate concatenates several batches along dim 0 before it splits them:

    - ``input_ids`` [B, L] int64 (``pad_id`` after each sample), ``attention_mask`` [B, L], ``answer_start`` [B],
      ``sample_id`` [B, 16] uint8 (the 32-hex-char id as bytes);
    - per teacher s: ``teacher{s}_rows`` [B, L] bool (answer row r of the sample has teacher s's target; all False:
      the sample lacks the teacher), ``teacher{s}_values`` [B, L, Kt] float32, and when its targets carry ids
      ``teacher{s}_ids`` [B, L, Kt] int32 (-1 padding); ``teacher{s}_entropy`` [B, L] float64 and
      ``teacher{s}_answer_nll`` [B] float64 when the stream computes them (the uncertainty and min_ce combines);
    - ``answer_bytes`` [B] float64, each answer's UTF-8 bytes, with a ``tokenizer`` (`for_stream` gives it the
      stream's when the stream computes answer scores): what the student gate (``kd_gate``) divides the student's
      CE by, so that ``loss_from_logits(..., kd_gate=True)`` works on ``unpad``'s batch.

    Each teacher costs B x L x Kt x 8 bytes per batch (values and ids); ``unpad`` on each process rebuilds exactly
    what `collate` gives for the examples it received, with the combine weights of its own B samples.

    Attributes:
        pad_id: the student's padding token.
        length: L, every batch's padded length (at least the stream's ``max_length``).
        widths: [S] each teacher's Kt (its cache's K).
        ids: [S] whether teacher s's targets carry ids in the student's vocabulary.
        entropy: whether targets carry ``entropy``; answer_nll: whether they carry ``answer_nll``.
        tokenizer: the student's tokenizer, to count ``answer_bytes`` (None: the batch has none).
    """

    pad_id: int
    length: int
    widths: tuple[int, ...]
    ids: tuple[bool, ...]
    entropy: bool = False
    answer_nll: bool = False
    tokenizer: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def for_stream(cls, stream: Any, pad_id: int) -> PaddedCollator:
        """The layout of ``stream``'s examples (a `train.stream.DistillStream`).

        Raises:
            ConfigError: the stream keeps only one rank's part: under accelerate the main process reads the whole
                stream and dispatches it (or every process reads it and keeps a slice), so a split stream would
                lose the other ranks' samples.
        """
        if stream.world_size > 1:
            raise ConfigError(
                f"stream: rank {stream.rank} of {stream.world_size} reads only its part, but a PaddedCollator "
                "batch is split by accelerate; build the stream with rank=0, world_size=1"
            )
        n = stream.n_teachers
        ids = tuple(stream.has_ids(s) or (not stream.same_tokenizer[s] and stream.targets[s] != "values")
                    for s in range(n))  # fmt: skip
        widths = tuple(r.k for r in stream.readers)
        scores = stream.answer_scores
        return cls(pad_id, stream.max_length, widths, ids, stream.entropy_k is not None, scores,
                   stream.tokenizer if scores else None)  # fmt: skip

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        b, length = len(examples), self.length
        out = {
            "input_ids": torch.full((b, length), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((b, length), dtype=torch.long),
            "answer_start": torch.tensor([e.answer_start for e in examples], dtype=torch.long),
            "sample_id": torch.from_numpy(
                np.stack([np.frombuffer(bytes.fromhex(e.sample_id), np.uint8) for e in examples])
            ),  # fmt: skip
        }
        for i, e in enumerate(examples):
            if len(e.input_ids) > length:
                raise ConfigError(f"length: {length}, but sample {e.sample_id} has {len(e.input_ids)} tokens; "
                                  "use at least the stream's max_length")  # fmt: skip
            out["input_ids"][i, : len(e.input_ids)] = torch.from_numpy(e.input_ids)
            out["attention_mask"][i, : len(e.input_ids)] = 1
        if self.tokenizer is not None:
            out["answer_bytes"] = answer_bytes(self.tokenizer, examples)
        for s, kt in enumerate(self.widths):
            rows = np.zeros((b, length), dtype=bool)
            values = np.zeros((b, length, kt), dtype=np.float32)
            ids = np.full((b, length, kt), -1, dtype=np.int32) if self.ids[s] else None
            entropy = np.zeros((b, length), dtype=np.float64) if self.entropy else None
            nll = np.full(b, np.nan, dtype=np.float64) if self.answer_nll else None
            for i, e in enumerate(examples):
                t = e.teachers[s]
                if t is None:
                    continue
                assert t.values.shape[1] == kt, f"teacher {s}: Kt {t.values.shape[1]}, the layout says {kt}"
                rows[i, t.student_rows] = True
                values[i, t.student_rows] = t.values
                if ids is not None:
                    ids[i, t.student_rows] = t.ids
                if entropy is not None:
                    entropy[i, t.student_rows] = t.entropy
                if nll is not None:
                    nll[i] = t.answer_nll
            out[f"teacher{s}_rows"] = torch.from_numpy(rows)
            out[f"teacher{s}_values"] = torch.from_numpy(values)
            for name, a in (("ids", ids), ("entropy", entropy), ("answer_nll", nll)):
                if a is not None:
                    out[f"teacher{s}_{name}"] = torch.from_numpy(a)
        return out

    def examples(self, padded: dict[str, torch.Tensor]) -> list[Example]:
        """The `Example` list of a padded batch (or of one process's share of it)."""
        a = {k: v.detach().cpu().numpy() for k, v in padded.items() if isinstance(v, torch.Tensor)}
        out = []
        for i in range(len(a["input_ids"])):
            n = int(a["attention_mask"][i].sum())
            teachers: list[TeacherTarget | None] = []
            for s in range(len(self.widths)):
                rows = np.flatnonzero(a[f"teacher{s}_rows"][i])
                if not len(rows):
                    teachers.append(None)
                    continue
                ids = a.get(f"teacher{s}_ids")
                entropy = a.get(f"teacher{s}_entropy")
                nll = a.get(f"teacher{s}_answer_nll")
                teachers.append(
                    TeacherTarget(
                        student_rows=rows.astype(np.int64),
                        values=a[f"teacher{s}_values"][i, rows],
                        ids=None if ids is None else ids[i, rows],
                        entropy=None if entropy is None else entropy[i, rows],
                        answer_nll=None if nll is None else float(nll[i]),
                    )
                )
            sample_id = a["sample_id"][i].tobytes().hex()
            out.append(Example(sample_id, a["input_ids"][i, :n].copy(), int(a["answer_start"][i]), teachers))
        return out

    def unpad(self, padded: dict[str, torch.Tensor], combine: str = "mean", *, temperature: float = 1.0) -> dict:
        """The `collate` batch of a padded batch's examples, on the device ``padded`` is on.

        Args:
            padded: a batch of this collator (B samples, or this process's share after a split).
            combine, temperature: as in `collate`.

        Returns:
            the flat layout of `collate` (input_ids [B, L'] with L' the longest sample, answer_index [M], ...), and
            ``answer_bytes`` [B] float64 when the padded batch has them.
        """
        batch = collate(self.examples(padded), self.pad_id, len(self.widths), combine, temperature=temperature)
        if "answer_bytes" in padded:
            batch["answer_bytes"] = padded["answer_bytes"].detach().cpu().double()
        return _to(batch, padded["input_ids"].device)


def _to(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts and lists walked, None kept)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to(v, device) for v in batch]
    return batch
