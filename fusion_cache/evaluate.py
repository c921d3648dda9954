"""Held-out metrics of a student against a teacher cache: answer CE, teacher top-1 agreement, ULD.

from fusion_cache.evaluate import evaluate_model
evaluate_model(model, tokenizer, "cache/heldout")  # {"answer_ce": ..., "top1_agreement": ..., ...}
"""

from __future__ import annotations

import math
from collections.abc import Collection

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


@torch.no_grad()
def evaluate_teachers(
    model: torch.nn.Module,
    tokenizer,
    cache_dirs: list[str],
    *,
    align_mode: str = "bytes",
    batch_size: int = 8,
    max_length: int = 1024,
    k: int = 10,
    sample_ids: Collection[str] | None = None,
) -> dict:
    """Held-out metrics against several teachers' caches of the same rows (joined on sample_id), in one pass.

    The student's tokens are a same-tokenizer teacher's (else its own rendering); each teacher's answer rows are
    paired with the student's as in unified training (`fusion_cache.unified.UnifiedStream`, ``align_mode``).
    ``sample_ids``: evaluate only these samples (e.g. train rows a run never saw, as a validation split).

    Returns:
        {"answer_ce", "answer_ppl", "top1_agreement" (from same-tokenizer teachers; None if there is none),
        "uld": {teacher: mean over its samples of the per-sample mean ULD}, "answer_tokens", "samples",
        "aligned": {teacher: aligned answer rows}}.
    """
    from fusion_cache.unified import UnifiedStream
    from fusion_cache.unified import collate_unified
    from fusion_cache.unified import unified_losses

    was_training = model.training
    model.eval()
    stream = UnifiedStream(
        list(cache_dirs),
        tokenizer,
        chat_template=has_chat_template(tokenizer),
        max_length=max_length,
        align_mode=align_mode,
        k=k,
        epochs=1,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = stream.n_teachers
    ce_sum = 0.0
    uld_sum = [0.0] * n
    uld_n = [0] * n
    tokens = hits = total = samples = 0
    batch: list = []

    def flush():
        nonlocal ce_sum, tokens, hits, total, samples
        out = unified_losses(model, collate_unified(batch, pad, n, "mean"), lambda_=0.0, k=k)
        ce_sum += float(out.ce) * out.answer_tokens
        tokens += out.answer_tokens
        hits += out.top1_hits
        total += out.top1_total
        samples += len(batch)
        for s, v in enumerate(out.teacher_uld):
            if v is not None:  # v is the mean over the batch's samples that have teacher s
                have = sum(e.teachers[s] is not None for e in batch)
                uld_sum[s] += v * have
                uld_n[s] += have
        batch.clear()

    for ex in stream:
        if sample_ids is not None and ex.sample_id not in sample_ids:
            continue
        batch.append(ex)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    ce = ce_sum / max(tokens, 1)
    counts = stream.counts()["align"]
    return {
        "answer_ce": ce,
        "answer_ppl": math.exp(min(ce, 50.0)),
        "top1_agreement": hits / total if total else None,
        "uld": {name: (uld_sum[s] / uld_n[s] if uld_n[s] else None) for s, name in enumerate(stream.names)},
        "answer_tokens": tokens,
        "samples": samples,
        "aligned": {name: c.get("aligned") for name, c in counts.items()},
    }
