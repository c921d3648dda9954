"""Held-out metrics of a student against a teacher cache: answer CE, teacher top-1 agreement, ULD.

from fusion_cache.evaluate import evaluate_model
evaluate_model(model, tokenizer, "cache/heldout")  # {"answer_ce": ..., "top1_agreement": ..., ...}
"""

from __future__ import annotations

import math

import torch

from fusion_cache.objective import forward_losses
from fusion_cache.render import has_chat_template
from fusion_cache.stream import CacheStream
from fusion_cache.stream import collate


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module, tokenizer, cache_dir: str, *, batch_size: int = 8, max_length: int = 1024, k: int = 10
) -> dict:
    """Token-weighted answer CE and top-1 agreement over every row of ``cache_dir`` (one pass, cache order).

    Returns:
        {"answer_ce", "answer_ppl", "top1_agreement" (None across tokenizers), "uld", "answer_tokens", "samples"}.
    """
    was_training = model.training
    model.eval()
    stream = CacheStream(cache_dir, tokenizer, chat_template=has_chat_template(tokenizer), max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ce_sum = uld_sum = 0.0
    tokens = hits = total = samples = 0
    batch: list = []

    def flush():
        nonlocal ce_sum, uld_sum, tokens, hits, total, samples
        out = forward_losses(model, collate(batch, pad), lambda_=0.0, k=k)
        ce_sum += float(out.ce) * out.answer_tokens
        uld_sum += float(out.uld) * len(batch)
        tokens += out.answer_tokens
        hits += out.top1_hits
        total += out.top1_total
        samples += len(batch)
        batch.clear()

    for ex in stream:
        batch.append(ex)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    ce = ce_sum / max(tokens, 1)
    return {
        "answer_ce": ce,
        "answer_ppl": math.exp(min(ce, 50.0)),
        "top1_agreement": hits / total if total else None,
        "uld": uld_sum / max(samples, 1),
        "answer_tokens": tokens,
        "samples": samples,
    }
