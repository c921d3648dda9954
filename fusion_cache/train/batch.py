"""Collate a batch of `stream.Example`: the student's padded tokens, its answer positions, and each teacher's rows.

    batch = collate(examples, pad_id, n_teachers=2, combine="mean")
    batch["teachers"][s]   # teacher s: rows [N_s] into the M answer rows, values [N_s, Kt], weights, ...

Every distillation loss reads the same layout, whatever the number of teachers (one is the single-teacher case).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fusion_cache.train.weights import sample_row_weights


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
        input_ids [B, L], attention_mask [B, L], answer_index [M], answer_targets [M] as `pad_answers`, and
        ``teachers``: per teacher, None (no sample of the batch has it) or a dict with
        rows [N_s] int64 (indices into the M answer rows, strictly increasing), values [N_s, Kt] float32,
        ids [N_s, Kt] int64 (only when every sample that has the teacher carries its ids), counts [N_s, Kt] float32
        (a sampled cache's draws, `stream.TeacherTarget.counts`),
        loss_weights [N_s] (the combine mode's: the loss adds sum_r w_r d_r), log_weights [N_s] (the teacher's own
        term, logged: mean over its rows, then over the batch's samples that have it) and top1 [N_s] (-1 where
        unknown).
    """
    b = len(examples)
    batch, starts = pad_answers(examples, pad_id)
    keys = ("rows", "values", "ids", "counts", "w", "log", "top1")
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
        if all(c is not None for c in p["counts"]):  # a sampled cache's draws (train.losses.SampledKL)
            t["counts"] = torch.from_numpy(np.concatenate(p["counts"])).float()
        teachers.append(t)
    return {**batch, "teachers": teachers}
