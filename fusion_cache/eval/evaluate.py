"""Held-out metrics of a student: answer CE, and against teacher caches teacher top-1 agreement and ULD.

from fusion_cache.eval.evaluate import evaluate_model, evaluate_rows, evaluate_teachers
evaluate_model(model, tokenizer, "cache/heldout")  # {"answer_ce": ..., "top1_agreement": ..., "uld": ...}
evaluate_teachers(model, tokenizer, ["cache/a", "cache/b"])  # the same, "uld" per teacher
evaluate_rows(model, tokenizer, "heldout.jsonl")  # answer CE of the rows of an input file (no teacher)

Every number comes from the training objective (`train.objective.loss_from_logits` at lambda 0) over the training
stream (`train.stream.DistillStream`), so evaluation pairs a student with its teachers exactly as training does.
Besides the CE per answer token (nats), ``answer_ce_per_byte`` divides the same sum by the UTF-8 bytes of the
answers' text: per-token CE depends on the tokenizer, per-byte CE compares students of different tokenizers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fusion_cache.capture.inputs import read_conversations
from fusion_cache.capture.render import has_chat_template
from fusion_cache.capture.render import render
from fusion_cache.eval.calibration import ECE_BINS
from fusion_cache.eval.calibration import ece_bin_sums
from fusion_cache.eval.calibration import ece_from_bins
from fusion_cache.eval.calibration import tail_mass_outside
from fusion_cache.eval.calibration import top1_calibration_inputs
from fusion_cache.train.batch import answer_text_bytes
from fusion_cache.train.batch import collate
from fusion_cache.train.guards import check_examples
from fusion_cache.train.guards import student_vocab
from fusion_cache.train.losses import ULD
from fusion_cache.train.objective import answer_logits
from fusion_cache.train.objective import loss_from_logits
from fusion_cache.train.stream import DistillStream
from fusion_cache.train.stream import Example


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    cache_dir: str,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    k: int = 10,
    align_mode: str = "bytes",
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """Token-weighted answer CE, top-1 agreement and ULD over the rows of one cache (one pass, cache order).

    Args:
        align_mode: how a student of another tokenizer is paired with the teacher (as in training).
        limit: only the first N usable rows (None: every row).
        progress: show a progress bar over the samples.

    Returns:
        {"answer_ce", "answer_ppl", "answer_ece", "top1_agreement" (None across tokenizers), "uld", "tail_mass"
        (the student's mean probability outside the teacher's cached top-K; None across tokenizers), "answer_tokens",
        "samples", "aligned"}.
    """
    r = evaluate_teachers(model, tokenizer, [cache_dir], batch_size=batch_size, max_length=max_length, k=k,
                          align_mode=align_mode, limit=limit, progress=progress)  # fmt: skip
    one = {key: next(iter(r[key].values())) for key in ("uld", "tail_mass", "aligned")}
    return r | one


@torch.no_grad()
def evaluate_rows(
    model: torch.nn.Module,
    tokenizer,
    data: str,
    *,
    batch_size: int = 8,
    max_length: int = 1024,
    limit: int | None = None,
    token_classes: dict[str, np.ndarray] | None = None,
    progress: bool = False,
) -> dict:
    """Token-weighted answer CE over the rows of an input file (``build --data`` rows, no teacher).

    Each row is rendered for ``tokenizer`` (its chat template, else plain text) as training would render it; rows
    with an empty answer, or with no answer token left after ``max_length`` truncation, are skipped.

    Args:
        token_classes: {name: bool [V]} classes of the student's tokens; each adds ``answer_ce_<name>`` (the CE over
            the answer tokens of that class) and ``tokens_<name>`` (e.g. `train.vocab.digit_tokens`: the numerals).

    Returns:
        `evaluate_model`'s dict with "top1_agreement" and "uld" None (there is no teacher to compare with).
    """
    chat = has_chat_template(tokenizer)

    def examples():
        for conv in read_conversations(data):
            if not conv.response:
                continue  # as `build` does: an empty answer has nothing to score
            r = render(tokenizer, conv.messages, chat_template=chat)
            ids = r.input_ids.astype(np.int64)[:max_length]
            if len(ids) - r.answer_start < 1:
                continue
            yield Example(conv.sample_id, ids, r.answer_start, [])  # no teacher: only CE counts

    rows = _bar(islice(examples(), limit), progress, "eval rows", total=limit)
    out = _score(model, tokenizer, rows, [], batch_size=batch_size, token_classes=token_classes)
    return out | {"uld": None, "tail_mass": None}


def _bar(examples: Iterable[Example], progress: bool, desc: str, total: int | None = None) -> Iterable[Example]:
    """``examples`` counted by a progress bar (samples) when ``progress``."""
    if not progress:
        return examples
    return tqdm(examples, desc=desc, unit="sample", total=total, dynamic_ncols=True)


def _score(model: torch.nn.Module, tokenizer, examples: Iterable[Example], names: list[str], *, batch_size: int,
           k: int = 10, token_classes: dict[str, np.ndarray] | None = None) -> dict:  # fmt: skip
    """The one evaluation loop: `loss_from_logits` (lambda 0, ULD to each teacher) over batches, token-weighted CE.

    Returns:
        {"answer_ce", "answer_ppl", "answer_ece" (`eval.calibration`), "answer_ce_per_byte" (the CE sum over the
        answers' UTF-8 bytes), "top1_agreement" (None without a same-tokenizer teacher), "uld": {teacher: mean over
        its samples of the per-sample mean ULD}, "tail_mass": {teacher: the student's probability outside the
        teacher's cached top-K ids, mean over the teacher's rows; None where the batch holds no ids of the teacher in
        the student's vocabulary}, "answer_tokens", "answer_bytes", "samples"}.
    """
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(names)
    losses = [ULD(k=k)] * n
    ce_sum = 0.0
    uld_sum, uld_n = [0.0] * n, [0] * n
    tail_sum, tail_n = [0.0] * n, [0] * n  # the student's mass outside each teacher's top-K, summed over rows
    tokens = hits = total = samples = answer_bytes = 0
    classes = {name: torch.as_tensor(np.asarray(mask, dtype=bool)) for name, mask in (token_classes or {}).items()}
    class_sum, class_n = dict.fromkeys(classes, 0.0), dict.fromkeys(classes, 0)
    batch: list = []
    ece_sums = torch.zeros(ECE_BINS, dtype=torch.float64)

    def flush():
        nonlocal ce_sum, tokens, hits, total, samples, answer_bytes
        collated = collate(batch, pad, n)
        logits = answer_logits(model, collated)  # [M, V]
        out = loss_from_logits(logits, collated, losses, lambda_=0.0)
        ece_sums.add_(ece_bin_sums(*top1_calibration_inputs(logits, collated["answer_targets"])))
        for name, mask in classes.items():
            sel = mask[collated["answer_targets"].clamp_max(len(mask) - 1)] & (collated["answer_targets"] < len(mask))
            class_sum[name] += float(out.ce_tokens[sel].sum())
            class_n[name] += int(sel.sum())
        ce_sum += float(out.ce) * out.answer_tokens
        tokens += out.answer_tokens
        answer_bytes += sum(answer_text_bytes(tokenizer, ex) for ex in batch)
        hits += out.top1_hits
        total += out.top1_total
        samples += len(batch)
        for s, t in enumerate(collated["teachers"]):
            if t is not None and "ids" in t:  # ids in the student's vocabulary: a same-tokenizer teacher
                tail_sum[s] += float(tail_mass_outside(logits[t["rows"]], t["ids"]).sum())
                tail_n[s] += int(t["rows"].numel())
        for s, v in enumerate(out.teacher_kd):
            if v is not None:  # v is the mean over the batch's samples that have teacher s
                have = sum(e.teachers[s] is not None for e in batch)
                uld_sum[s] += v * have
                uld_n[s] += have
        batch.clear()

    try:
        for ex in examples:
            batch.append(ex)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    finally:
        model.train(was_training)
    ce = ce_sum / max(tokens, 1)
    return {
        "answer_ce": ce,
        "answer_ppl": math.exp(min(ce, 50.0)),
        "answer_ece": ece_from_bins(ece_sums, tokens),  # `eval.calibration`: 15 equal-width top-1 bins
        "answer_ce_per_byte": ce_sum / answer_bytes if answer_bytes else None,
        "top1_agreement": hits / total if total else None,
        "uld": {name: (uld_sum[s] / uld_n[s] if uld_n[s] else None) for s, name in enumerate(names)},
        "tail_mass": {name: (tail_sum[s] / tail_n[s] if tail_n[s] else None) for s, name in enumerate(names)},
        "answer_tokens": tokens,
        "answer_bytes": answer_bytes,
        "samples": samples,
        **{f"answer_ce_{c}": (class_sum[c] / class_n[c] if class_n[c] else None) for c in classes},
        **{f"tokens_{c}": class_n[c] for c in classes},
    }


def resolve_eval_model(model: str) -> tuple[str, Path | None]:
    """(model to load, run directory or None): a `fusion-cache train` run directory means its ``model/`` (a full
    model, or a LoRA adapter saved without merging)."""
    p = Path(model)
    saved = any((p / "model" / f).exists() for f in ("config.json", "adapter_config.json"))
    if saved and not (p / "config.json").exists():
        return str(p / "model"), p
    return model, None


def is_cache(path: str) -> bool:
    return (Path(path) / "manifest.json").exists()


def run_eval(
    model: str,
    *,
    data: str | None = None,
    cache: str | None = None,
    humaneval: bool = False,
    limit: int | None = None,
    max_new_tokens: int = 384,
    timeout: float = 10.0,
    prompt_style: str = "raw",
    batch_size: int = 8,
    max_length: int = 1024,
    k: int = 10,
    out: str | None = None,
    progress: bool = False,
    on_check=None,
) -> dict:
    """`fusion-cache eval`: what was asked for, as one JSON-ready dict (also written to ``out`` when given).

    ``model`` is a preset, model directory, HF id or a train run directory (its ``model/``; the results then go to
    ``<run>/eval.json`` unless ``out`` says otherwise, where `fusion-cache report` finds them). ``data`` is an input
    file (answer CE of its rows) or a cache (treated as ``cache``); ``cache`` a teacher cache (answer CE, teacher
    top-1 agreement when the tokenizers match, ULD). ``limit`` takes the first N rows and HumanEval problems.
    ``progress`` shows progress bars over the samples and the HumanEval problems. With a cache, the model is first
    checked against it (`train.check`, tokenizer and config only) and refused before it loads when it cannot be
    evaluated; ``on_check`` gets that report.
    """
    from fusion_cache.errors import ConfigError
    from fusion_cache.models.load import load_student

    if data is not None and is_cache(data):
        if cache is not None:
            raise ConfigError(f"data: {data} is a cache and --cache {cache} was given too; pass one cache")
        data, cache = None, data
    from fusion_cache.eval import PROMPT_STYLES

    if prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"humaneval prompt: unknown value {prompt_style!r}; valid values: {', '.join(PROMPT_STYLES)}")
    if data is None and cache is None and not humaneval:
        raise ConfigError("nothing to evaluate: give --data FILE, --cache DIR and/or --humaneval")
    if data is not None and not Path(data).exists():
        raise ConfigError(f"data: {data} does not exist")
    if cache is not None and not is_cache(cache):
        raise ConfigError(f"cache: {cache} holds no manifest.json (not a fusion-cache cache)")
    path, run_dir = resolve_eval_model(model)
    t0 = time.perf_counter()
    check = _check(path, cache, max_length) if cache is not None else None
    if check is not None and on_check is not None:
        on_check(check)
    net, tok, resolved = load_student(path)
    result: dict = {"model": str(resolved), "limit": limit}
    if data is not None:
        result["data"] = {"path": str(data)} | evaluate_rows(
            net, tok, data, batch_size=batch_size, max_length=max_length, limit=limit, progress=progress
        )
    if cache is not None:
        result["cache"] = {"path": str(cache), "k": k} | evaluate_model(
            net, tok, cache, batch_size=batch_size, max_length=max_length, k=k, limit=limit, progress=progress
        )
        result["cache"]["top1_note"] = check.top1_note()
    if humaneval:
        from fusion_cache.eval.humaneval import evaluate_humaneval

        result["humaneval"] = evaluate_humaneval(
            net,
            tok,
            limit=limit,
            max_new_tokens=max_new_tokens,
            timeout=timeout,
            prompt_style=prompt_style,
            progress=progress,
        )
    result["wall_seconds"] = round(time.perf_counter() - t0, 2)
    target = out if out is not None else (run_dir / "eval.json" if run_dir is not None else None)
    if target is not None:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(result, indent=2) + "\n")
        result["written_to"] = str(target)
    return result


def _check(model: str, cache: str, max_length: int):
    """`train.check` of a model against the cache it is evaluated on, from its tokenizer and config (ConfigError for
    what cannot be evaluated, e.g. ids beyond its vocabulary)."""
    from fusion_cache.models.load import load_tokenizer
    from fusion_cache.train.check import check_caches
    from fusion_cache.train.check import student_vocab_size

    report = check_caches([cache], load_tokenizer(model), student=model, student_vocab=student_vocab_size(model),
                          max_length=max_length, coverage=False)  # fmt: skip
    report.refuse()
    return report


def eval_table(result: dict) -> str:
    """A markdown table of `run_eval`'s numbers."""
    lines = ["| metric | value |", "|---|---|"]
    for key, name in (("data", "rows"), ("cache", "cache")):
        r = result.get(key)
        if r is None:
            continue
        lines.append(f"| answer CE ({name} {r['path']}, {r['samples']} samples, {r['answer_tokens']} tokens) | "
                     f"{r['answer_ce']:.4f} |")  # fmt: skip
        if r.get("answer_ece") is not None:
            lines.append(f"| answer ECE ({name}, top-1, {ECE_BINS} equal-width bins) | {r['answer_ece']:.4f} |")
        if r.get("answer_ce_per_byte") is not None:
            lines.append(f"| answer CE per byte ({name}, {r['answer_bytes']} bytes) | {r['answer_ce_per_byte']:.4f} |")
        if r.get("top1_agreement") is not None:
            lines.append(f"| teacher top-1 agreement ({name}) | {r['top1_agreement']:.4f} |")
        elif r.get("top1_note"):
            lines.append(f"| teacher top-1 agreement ({name}) | n/a: {r['top1_note']} |")
        if r.get("uld") is not None:
            lines.append(f"| ULD to teacher ({name}, K={r['k']}) | {r['uld']:.4f} |")
        if r.get("tail_mass") is not None:
            lines.append(f"| student mass outside the teacher's cached top-K ({name}) | {r['tail_mass']:.4f} |")
    h = result.get("humaneval")
    if h is not None:
        score = "n/a" if h["pass@1"] is None else f"{h['pass@1']:.4f} ({h['passed']} passed)"
        style = h.get("prompt_style", "raw")
        lines.append(f"| HumanEval pass@1 (greedy, {style} prompt, {h['problems']} problems) | {score} |")
    lines.append(f"| wall time | {result['wall_seconds']:.1f} s |")
    return "\n".join(lines)


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
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """Held-out metrics against S >= 1 teachers' caches of the same rows (joined on sample_id), in one pass.

    The student's tokens are a same-tokenizer teacher's (else its own rendering); each teacher's answer rows are
    paired with the student's as in training (`train.stream.DistillStream`, ``align_mode``). ``sample_ids``:
    evaluate only these samples (e.g. train rows a run never saw, as a validation split); ``limit``: the first N.

    Returns:
        {"answer_ce", "answer_ppl", "answer_ece", "top1_agreement" (from same-tokenizer teachers; None if there is
        none), "uld": {teacher: mean over its samples of the per-sample mean ULD}, "tail_mass": {teacher: the
        student's mean probability outside its cached top-K, None across tokenizers}, "answer_tokens", "samples",
        "aligned": {teacher: aligned answer rows}}.
    """
    stream = DistillStream(
        list(cache_dirs), tokenizer, chat_template=has_chat_template(tokenizer), max_length=max_length,
        align_mode=align_mode, epochs=1, rank=0, world_size=1,
    )  # fmt: skip
    vocab = student_vocab(model)

    def examples():
        for ex in stream:
            if sample_ids is None or ex.sample_id in sample_ids:
                check_examples([ex], vocab, "evaluation", stream)  # a cache's ids must index the student's embedding
                yield ex

    rows = _bar(islice(examples(), limit), progress, "eval cache", total=limit)
    out = _score(model, tokenizer, rows, stream.names, batch_size=batch_size, k=k)
    counts = stream.counts()["align"]
    return out | {"aligned": {name: c.get("aligned") for name, c in counts.items()}}
