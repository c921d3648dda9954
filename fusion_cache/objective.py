"""One forward pass of the student on a collated batch: CE on the answer tokens and ULD against the teacher.

Shared by training and evaluation so the numbers they report are computed the same way. The lm_head is applied
only at the positions that predict answer tokens: with a 49k-262k vocabulary the head dominates a small student's
compute, and prompt positions carry no loss, so the [B, L, V] logits are never materialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


def answer_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Student logits at the positions that predict answer tokens.

    Returns:
        [M, V] logits, row m for flat position ``batch["answer_index"][m]`` of the [B * L] sequence positions.
    """
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1])[batch["answer_index"]]  # [M, H]
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
) -> StepOutput:
    """L = (1 - lambda) * CE + lambda * ULD for one batch (see `fusion_cache.stream.collate` for the batch keys).

    With lambda == 0 the ULD term is still computed for the logs, without a graph.
    """
    logits = answer_logits(model, batch)  # [M, V]
    ce = F.cross_entropy(logits.float(), batch["answer_targets"])
    rows = logits[batch["uld_rows"]]  # [N, V] aligned with the teacher's rows
    opts = dict(
        row_weights=batch["row_weights"], reduction="sum", k=k, zscore=zscore, softmax=softmax, temperature=temperature
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
