"""One forward pass of the student on a collated batch: CE on the answer tokens plus each teacher's own
distillation term, combined (`train.weights`) into ``L = (1 - lambda) * CE + lambda * sum_s sum_r w_sr d_sr``.

Shared by training and evaluation so the numbers they report are computed the same way. The lm_head is applied
only at the positions that predict answer tokens: with a 49k-262k vocabulary the head dominates a small student's
compute, and prompt positions carry no loss, so the [B, L, V] logits are never materialized. On the fused path
(a GPU) the [M, V] answer logits are not materialized either: every teacher's term is computed in the same chunked
pass over the lm_head as the CE (`fusion_cache.kernels.fused_linear.fused_linear_terms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusion_cache.kernels.fused_linear import FusedTerm
from fusion_cache.kernels.fused_linear import fused_linear_terms
from fusion_cache.train.functional import resolve_backend
from fusion_cache.train.losses import DistillLoss


@dataclass
class StepOutput:
    """Loss terms of one batch (``loss`` carries the graph; the others are detached).

    Attributes:
        loss: (1 - lambda) * ce + lambda * kd.
        ce: token-mean cross-entropy over the answer tokens.
        kd: the combined distillation term, as weighted into the loss.
        answer_tokens: M.
        top1_hits, top1_total: student argmax == teacher top-1, over the rows of teachers with known ids.
        teacher_kd: [S] each teacher's own term (its loss, mean over its rows then over the batch's samples that
            have it), None where no sample of the batch has the teacher.
        ce_tokens: [M] each answer token's CE (detached; the dense path only, None on the fused one).
        gate_open: with ``kd_gate``, per teacher the share of its samples in the batch that it distilled (None where
            no sample has it); None without the gate.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    answer_tokens: int
    top1_hits: int
    top1_total: int
    teacher_kd: list[float | None]
    ce_tokens: torch.Tensor | None = None
    gate_open: list[float | None] | None = None


def gate_weights(
    weights: torch.Tensor, teacher_nll: torch.Tensor, student_nll: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kd_gate="student"`` on one teacher's rows: the rows of the samples where the teacher predicts the gold answer
    no better than the student get weight 0 (nothing moves to other teachers or rows).

    Args:
        weights: [N_s] the teacher's loss weights (the combine mode's).
        teacher_nll: [N_s] ``C_s,b`` of each row's sample: the teacher's answer cross-entropy in nats per byte.
        student_nll: [N_s] the student's cross-entropy on the same answer in nats per byte, at this step (detached).

    Returns:
        ([N_s] the gated weights, [N_s] bool: the rows kept).
    """
    keep = teacher_nll.to(student_nll.dtype) < student_nll
    return weights * keep.to(weights.dtype), keep


def gated_teachers(batch: dict, ce_tokens: torch.Tensor) -> tuple[list[dict | None], list[float | None]]:
    """The batch's teachers with `gate_weights` applied to their ``loss_weights``, and each one's share of samples
    kept.

    Args:
        batch: a `train.batch.collate` batch with ``answer_bytes`` [B] (each sample's answer in UTF-8 bytes, what
            the student's CE per byte divides by) and, per teacher, ``answer_nll`` [N_s].
        ce_tokens: [M] the student's CE of each answer token (detached).

    Raises:
        ValueError: the batch lacks ``answer_bytes`` or a teacher's ``answer_nll`` (a stream without
            ``answer_scores``, or a codec without the answer tokens' log-probs).
    """
    if "answer_bytes" not in batch:
        raise ValueError("kd_gate: the batch has no answer_bytes [B] (the student's CE per byte divides by them)")
    sample = batch["answer_sample"]
    per_sample = torch.zeros(len(batch["answer_bytes"]), dtype=torch.float64, device=ce_tokens.device)
    per_sample.index_add_(0, sample, ce_tokens.detach().double())
    student = per_sample / batch["answer_bytes"].double().clamp(min=1)  # [B] nats per answer byte
    out: list[dict | None] = []
    opened: list[float | None] = []
    for s, t in enumerate(batch["teachers"]):
        if t is None:
            out.append(None)
            opened.append(None)
            continue
        if "answer_nll" not in t:
            raise ValueError(f"kd_gate: teacher {s} has no answer_nll (its cross-entropy on the gold answer)")
        samples = sample[t["rows"]]  # [N_s] each row's sample: every row of a sample shares its gate
        w, keep = gate_weights(t["loss_weights"], t["answer_nll"], student[samples])
        out.append({**t, "loss_weights": w})
        opened.append(samples[keep].unique().numel() / max(samples.unique().numel(), 1))
    return out, opened


def answer_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[M, H] final hidden states at the positions that predict answer tokens (flat ``batch["answer_index"]``)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch["answer_index"]]


def answer_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Student logits at the positions that predict answer tokens.

    Returns:
        [M, V] logits, row m for flat position ``batch["answer_index"][m]`` of the [B * L] sequence positions.
    """
    rows = answer_hidden(model, batch)  # [M, H]
    logits = model.get_output_embeddings()(rows)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft-capping, as the model's own forward applies it
        logits = torch.tanh(logits / cap) * cap
    return logits


def _rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logits[rows] without a copy when ``rows`` is every row in order (a same-tokenizer teacher)."""
    if rows.numel() == logits.shape[0] and (rows.numel() == 0 or int(rows[-1]) == rows.numel() - 1):
        return logits
    return logits[rows]


def forward_losses(
    model: torch.nn.Module,
    batch: dict,
    losses: list[DistillLoss],
    *,
    lambda_: float,
    fused_linear: bool | None = None,
    kd_gate: bool = False,
) -> StepOutput:
    """L = (1 - lambda) * CE + lambda * KD for one `train.batch.collate` batch.

    Args:
        model: the student (a transformers causal LM).
        batch: a collated batch; ``batch["teachers"][s]`` is scored with ``losses[s]``.
        losses: [S] one loss per teacher (`train.losses.make_loss`).
        lambda_: the distillation weight. With lambda == 0 the teachers' terms are computed for the logs only,
            without a graph.
        fused_linear: take CE and every teacher's term in one chunked pass over the lm_head, so the [M, V] answer
            logits never exist whole. None (default): on where the loss backend is Triton (a GPU) and the model has
            no logit soft-capping; the dense path otherwise (CPU).
        kd_gate: distill each sample only from the teachers whose answer CE is below the student's at this step
            (`gated_teachers`; the batch needs ``answer_bytes`` and each teacher's ``answer_nll``).
    """
    if len(losses) != len(batch["teachers"]):
        raise ValueError(f"{len(losses)} losses for a batch of {len(batch['teachers'])} teachers")
    head = model.get_output_embeddings()
    soft_cap = getattr(model.config, "final_logit_softcapping", None)
    backend = resolve_backend(head.weight.device)
    if fused_linear is None:
        fused_linear = not soft_cap and backend == "triton"
    if fused_linear:
        if soft_cap:
            raise ValueError(f"fused_linear does not apply logit soft-capping (final_logit_softcapping={soft_cap})")
        return _fused(model, head, batch, losses, lambda_=lambda_, backend=backend, kd_gate=kd_gate)
    return loss_from_logits(answer_logits(model, batch), batch, losses, lambda_=lambda_, kd_gate=kd_gate)


def loss_from_logits(
    logits: torch.Tensor, batch: dict, losses: list[DistillLoss], *, lambda_: float, kd_gate: bool = False
) -> StepOutput:
    """`forward_losses` from logits a caller already has (its own model or training loop).

    Args:
        logits: [M, V] the student's logits at the answer positions, row m for flat position
            ``batch["answer_index"][m]`` of the [B * L] sequence positions (``model(...).logits.flatten(0, 1)[
            batch["answer_index"]]`` for a causal LM).
        batch: a `train.batch.collate` batch.
        losses: [S] one loss per teacher.
        lambda_: the distillation weight; with lambda == 0 the teachers' terms are computed without a graph.
        kd_gate: as in `forward_losses`.

    Example:
        >>> out = loss_from_logits(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ...                        .flatten(0, 1)[b["answer_index"]], b, [make_loss("kl")], lambda_=0.5)
        >>> out.loss.backward()
    """
    if len(losses) != len(batch["teachers"]):
        raise ValueError(f"{len(losses)} losses for a batch of {len(batch['teachers'])} teachers")
    ce_tokens = F.cross_entropy(logits.float(), batch["answer_targets"], reduction="none")  # [M]
    ce = ce_tokens.mean()
    kd = logits.new_zeros((), dtype=torch.float32)
    per_teacher: list[float | None] = []
    hits = total = 0
    teachers, opened = gated_teachers(batch, ce_tokens) if kd_gate else (batch["teachers"], None)
    for t, loss in zip(teachers, losses, strict=True):
        if t is None:
            per_teacher.append(None)
            continue
        rows = _rows(logits, t["rows"])  # [N_s, V]
        with torch.set_grad_enabled(lambda_ > 0 and torch.is_grad_enabled()):
            d = loss.rows(rows if lambda_ > 0 else rows.detach(), t)  # [N_s]
        kd = kd + (t["loss_weights"].to(d.dtype) * d).sum()
        per_teacher.append(float((t["log_weights"].to(d.dtype) * d.detach()).sum()))
        with torch.no_grad():
            known = t["top1"] >= 0
            hits += int((rows.argmax(-1) == t["top1"])[known].sum())
            total += int(known.sum())
    loss_value = (1.0 - lambda_) * ce + lambda_ * kd if lambda_ > 0 else ce
    return StepOutput(loss_value, ce.detach(), kd.detach(), int(batch["answer_targets"].numel()), hits, total,
                      per_teacher, ce_tokens.detach(), opened)  # fmt: skip


def _fused(model, head, batch, losses: list[DistillLoss], *, lambda_: float, backend: str, kd_gate: bool) -> StepOutput:
    """`forward_losses` through the chunked fused lm_head path: the same numbers, O(chunk x V) logits memory."""
    hidden = answer_hidden(model, batch)  # [M, H]
    teachers, opened = batch["teachers"], None
    if kd_gate:  # the gate needs the student's CE before the pass that weights the teachers: one more, without grad
        teachers, opened = gated_teachers(batch, _token_ce(hidden.detach(), head, batch["answer_targets"]))
    present = [(t, loss) for t, loss in zip(teachers, losses, strict=True) if t is not None]
    terms = [FusedTerm(t["rows"], t["loss_weights"].float(), loss.grad_fn(t, t["loss_weights"].float(), backend))
             for t, loss in present]  # fmt: skip
    out = fused_linear_terms(
        hidden, head.weight, terms, batch["answer_targets"], head.bias,
        ce_weight=1.0 - lambda_, kd_weight=lambda_, ce_backend=backend,
    )  # fmt: skip
    distances = iter(out.distances)
    per_teacher: list[float | None] = []
    hits = total = 0
    for t in teachers:
        if t is None:
            per_teacher.append(None)
            continue
        d = next(distances)
        per_teacher.append(float((t["log_weights"].to(d.dtype) * d).sum()))
        known = t["top1"] >= 0
        hits += int((out.argmax[t["rows"]] == t["top1"])[known].sum())
        total += int(known.sum())
    return StepOutput(out.loss, out.ce, out.kd, int(batch["answer_targets"].numel()), hits, total, per_teacher,
                      gate_open=opened)  # fmt: skip


@torch.no_grad()
def _token_ce(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[M] the CE of each answer token from [M, H] hidden states, ``chunk`` rows of logits at a time."""
    return torch.cat([F.cross_entropy(head(h).float(), y, reduction="none")
                      for h, y in zip(hidden.split(chunk), targets.split(chunk), strict=True)])  # fmt: skip
