"""One forward pass of the student on a collated batch: CE on the answer tokens and ULD against the teacher.

Shared by training and evaluation so the numbers they report are computed the same way.
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
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, L, V]
    vocab = logits.shape[-1]
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=-100)
    rows = logits.reshape(-1, vocab)[batch["uld_index"]]  # [N, V] student logits at the aligned positions
    opts = dict(k=k, zscore=zscore, softmax=softmax, temperature=temperature)
    if lambda_ > 0:
        uld = uld_loss(rows, batch["teacher_values"], row_weights=batch["row_weights"], reduction="sum", **opts)
        loss = (1.0 - lambda_) * ce + lambda_ * uld
    else:
        with torch.no_grad():
            uld = uld_loss(
                rows.detach(), batch["teacher_values"], row_weights=batch["row_weights"], reduction="sum", **opts
            )
        loss = ce
    with torch.no_grad():
        known = batch["teacher_top1"] >= 0
        hits = int((rows.argmax(-1) == batch["teacher_top1"])[known].sum())
    return StepOutput(loss, ce, uld, int((labels != -100).sum()), hits, int(known.sum()))
