"""One forward pass of the student on a collated batch: CE on the answer tokens and the distillation term against
the teacher (InfiFusion's ULD, or the identity-aware top-K KL for students that share the teacher's vocabulary).

Shared by training and evaluation so the numbers they report are computed the same way. The lm_head is applied
only at the positions that predict answer tokens: with a 49k-262k vocabulary the head dominates a small student's
compute, and prompt positions carry no loss, so the [B, L, V] logits are never materialized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusion_cache.train.losses import fused_linear_uld
from fusion_cache.train.losses import resolve_backend
from fusion_cache.train.losses import topk_kl_loss
from fusion_cache.train.losses import uld_loss


@dataclass
class StepOutput:
    """Loss terms of one batch (tensors; ``loss`` carries the graph)."""

    loss: torch.Tensor
    ce: torch.Tensor  # token-mean cross-entropy over answer tokens
    uld: torch.Tensor  # mean over each sample's aligned positions, then over the batch
    answer_tokens: int
    top1_hits: int  # student argmax == teacher top-1 (same-tokenizer caches)
    top1_total: int
    kl: torch.Tensor | None = None  # top-K KL, when it is the distillation term (kd_loss="kl")


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
    kd_loss: str = "uld",
    fused_linear: bool | None = None,
) -> StepOutput:
    """L = (1 - lambda) * CE + lambda * KD for one batch (see `fusion_cache.train.stream.collate` for the batch keys).

    ``kd_loss``: "uld" (InfiFusion's sorted ULD, any tokenizer) or "kl" (KL over every cached top-K entry plus a tail
    bucket; ``k`` applies to ULD only; needs the
    teacher's token ids in the student's vocabulary, i.e. a same-tokenizer student and a cache with ids). The ULD
    term is always computed and reported; with lambda == 0, or when KL is the distillation term, without a graph.

    ``fused_linear``: take CE and ULD in one chunked pass over the lm_head (`losses.fused_linear_uld`), so the
    [M, V] answer logits never exist whole. None (default): on where the loss backend is Triton (a GPU) and the
    model has no logit soft-capping; the dense path otherwise (CPU).
    """
    head = model.get_output_embeddings()
    soft_cap = getattr(model.config, "final_logit_softcapping", None)
    if kd_loss not in ("uld", "kl"):
        raise ValueError(f"kd_loss must be 'uld' or 'kl', got {kd_loss!r}")
    if fused_linear is None:
        fused_linear = kd_loss == "uld" and not soft_cap and resolve_backend(head.weight.device) == "triton"
    if fused_linear:
        if kd_loss != "uld":
            raise ValueError(f"the fused lm_head path computes ULD only, got kd_loss={kd_loss!r}")
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
    kl = None
    if kd_loss == "kl":
        if "teacher_ids" not in batch:
            raise ValueError(
                "kd_loss='kl' needs the teacher's token ids in the student's vocabulary: a student with the "
                "teacher's tokenizer and chat template, and a cache whose codec stores ids (raw or full)"
            )
        kl = topk_kl_loss(
            rows, batch["teacher_ids"], batch["teacher_values"], row_weights=batch["row_weights"], reduction="sum"
        )
    if lambda_ > 0 and kd_loss == "uld":
        uld = uld_loss(rows, batch["teacher_values"], **opts)
        loss = (1.0 - lambda_) * ce + lambda_ * uld
    else:
        with torch.no_grad():
            uld = uld_loss(rows.detach(), batch["teacher_values"], **opts)
        loss = (1.0 - lambda_) * ce + lambda_ * kl if kl is not None and lambda_ > 0 else ce
    with torch.no_grad():
        known = batch["teacher_top1"] >= 0
        hits = int((rows.argmax(-1) == batch["teacher_top1"])[known].sum())
    return StepOutput(loss, ce, uld, int(batch["answer_targets"].numel()), hits, int(known.sum()), kl)


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
