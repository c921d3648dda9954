"""One forward pass of the student on a collated batch: CE on the answer tokens and ULD against the teacher.

Shared by training and evaluation so the numbers they report are computed the same way. The lm_head is applied
only at the positions that predict answer tokens: with a 49k-262k vocabulary the head dominates a small student's
compute, and prompt positions carry no loss, so the [B, L, V] logits are never materialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusion_cache.losses import fused_linear_uld
from fusion_cache.losses import resolve_backend
from fusion_cache.losses import uld_loss


@dataclass
class StepOutput:
    """Loss terms of one batch (tensors; ``loss`` carries the graph)."""

    loss: torch.Tensor
    ce: torch.Tensor  # token-mean cross-entropy over answer tokens
    uld: torch.Tensor  # mean over each sample's aligned positions, then over the batch
    answer_tokens: int
    top1_hits: int  # student argmax == teacher top-1 (same-tokenizer caches)
    top1_total: int


def answer_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[M, H] final hidden states at the positions that predict answer tokens (flat ``batch["answer_index"]``)."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[batch["answer_index"]]


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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


def forward_losses(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    lambda_: float,
    k: int,
    zscore: bool = True,
    softmax: bool = True,
    temperature: float = 1.0,
    tail: bool = False,
    fused_linear: bool | None = None,
) -> StepOutput:
    """L = (1 - lambda) * CE + lambda * ULD for one batch (see `fusion_cache.stream.collate` for the batch keys).

    With lambda == 0 the ULD term is still computed for the logs, without a graph.

    ``fused_linear``: take CE and ULD in one chunked pass over the lm_head (`losses.fused_linear_uld`), so the
    [M, V] answer logits never exist whole. None (default): on where the loss backend is Triton (a GPU) and the
    model has no logit soft-capping; the dense path otherwise (CPU).
    """
    head = model.get_output_embeddings()
    soft_cap = getattr(model.config, "final_logit_softcapping", None)
    if fused_linear is None:
        fused_linear = not soft_cap and resolve_backend(head.weight.device) == "triton"
    if fused_linear:
        if soft_cap:
            raise ValueError(f"fused_linear does not apply logit soft-capping (final_logit_softcapping={soft_cap})")
        return _fused_losses(model, head, batch, lambda_=lambda_, k=k, zscore=zscore, softmax=softmax,
                             temperature=temperature, tail=tail)  # fmt: skip
    logits = answer_logits(model, batch)  # [M, V]
    ce = F.cross_entropy(logits.float(), batch["answer_targets"])
    rows = logits[batch["uld_rows"]]  # [N, V] aligned with the teacher's rows
    opts = dict(
        row_weights=batch["row_weights"],
        reduction="sum",
        k=k,
        zscore=zscore,
        softmax=softmax,
        temperature=temperature,
        tail=tail,
    )
    if lambda_ > 0:
        uld = uld_loss(rows, batch["teacher_values"], **opts)
        loss = (1.0 - lambda_) * ce + lambda_ * uld
    else:
        with torch.no_grad():
            uld = uld_loss(rows.detach(), batch["teacher_values"], **opts)
        loss = ce
    with torch.no_grad():
        known = batch["teacher_top1"] >= 0
        hits = int((rows.argmax(-1) == batch["teacher_top1"])[known].sum())
    return StepOutput(loss, ce, uld, int(batch["answer_targets"].numel()), hits, int(known.sum()))


def _fused_losses(
    model, head, batch, *, lambda_: float, k: int, zscore: bool, softmax: bool, temperature: float, tail: bool
):
    """`forward_losses` through the chunked fused lm_head path: the same numbers, O(chunk x V) logits memory."""
    rows = answer_hidden(model, batch)  # [M, H]
    m = rows.shape[0]
    uld_rows = batch["uld_rows"]
    teacher = batch["teacher_values"]
    # the teacher rows live on a subset of the M answer rows (collate gives each at most one)
    teacher_full = teacher.new_zeros(m, teacher.shape[1]).index_copy(0, uld_rows, teacher)
    mask = torch.zeros(m, dtype=torch.bool, device=rows.device).index_fill(0, uld_rows, True)
    weights = batch["row_weights"].new_zeros(m).index_copy(0, uld_rows, batch["row_weights"])
    out = fused_linear_uld(
        rows, head.weight, teacher_full, mask, weights, batch["answer_targets"], head.bias,
        k=k, zscore=zscore, softmax=softmax, temperature=temperature, tail=tail, reduction="sum",
        ce_weight=1.0 - lambda_, uld_weight=lambda_,
    )  # fmt: skip
    known = batch["teacher_top1"] >= 0
    hits = int((out.argmax[uld_rows] == batch["teacher_top1"])[known].sum())
    return StepOutput(out.loss, out.ce, out.uld, int(batch["answer_targets"].numel()), hits, int(known.sum()))
