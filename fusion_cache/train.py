"""Stage two: train a student (pivot) by streaming a teacher cache with (1 - lambda) * CE + lambda * ULD.

    fusion-cache train --student ./student --shards ./cache/smollm2 --out ./runs/kd --lambda 0.5

AdamW, linear warmup then cosine decay, gradient accumulation and clipping, metrics to ``<out>/metrics.jsonl``,
and the final model saved as safetensors (with its tokenizer) in ``<out>/model``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion_cache.cache.reader import CacheReader
from fusion_cache.config import TrainConfig
from fusion_cache.objective import forward_losses
from fusion_cache.render import has_chat_template
from fusion_cache.stream import CacheStream
from fusion_cache.stream import collate
from fusion_cache.unified import TeacherTerms
from fusion_cache.unified import make_unified_stream
from fusion_cache.unified import unified_step

log = logging.getLogger(__name__)


def load_student(name_or_path: str, dtype: str | None = None):
    """(model, tokenizer, resolved path) for a preset, local directory or HF id; never trusts remote code."""
    from transformers import AutoModelForCausalLM
    from transformers import AutoTokenizer

    from fusion_cache.hardware import torch_dtype
    from fusion_cache.teachers import resolve_model

    resolved = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=torch_dtype(dtype or "float32"), trust_remote_code=False
    )
    return model, tokenizer, resolved.path


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup to 1, then cosine decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class TrainResult:
    """What a run produced: the summary written to ``<out>/summary.json`` and the trained model in memory."""

    summary: dict
    model: torch.nn.Module
    tokenizer: object


def run_train(cfg: TrainConfig, *, progress: bool = True) -> TrainResult:
    """Train as ``cfg`` says and return the summary and the trained model."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, student_path = load_student(cfg.student, cfg.dtype)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache_dir = cfg.shards[0]
    unified = cfg.mode == "unified"  # several caches joined on sample_id: fusion_cache/unified.py
    rows = max(CacheReader(d).manifest.stats.rows for d in cfg.shards)
    per_step = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * rows / per_step))
    epochs_needed = math.ceil(total_steps * per_step / max(rows, 1)) + 1
    stream = CacheStream(
        cache_dir,
        tokenizer,
        chat_template=has_chat_template(tokenizer),
        max_length=cfg.max_length,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        epochs=epochs_needed,
    )
    if unified:
        stream = make_unified_stream(cfg, tokenizer, epochs_needed)
    examples = iter(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup))
    (out / "train_config.json").write_text(json.dumps(cfg.model_dump(by_alias=True), indent=2) + "\n")
    metrics_path = out / "metrics.jsonl"
    teacher_terms = TeacherTerms(stream.names) if unified else None
    model.train()
    t0 = time.perf_counter()
    seen_tokens = 0
    bar = tqdm(total=total_steps, unit="step", disable=not progress, desc=f"train λ={cfg.lambda_}", dynamic_ncols=True)
    with open(metrics_path, "w") as metrics:
        for step in range(total_steps):
            acc = {"loss": 0.0, "ce": 0.0, "uld": 0.0}
            for _ in range(cfg.grad_accum):
                batch = list(islice(examples, cfg.batch_size))
                if not batch:
                    raise RuntimeError("the cache stream ended early")  # epochs_needed guarantees enough rows
                o = (
                    unified_step(model, batch, pad, cfg, stream)
                    if unified
                    else forward_losses(
                        model,
                        collate(batch, pad),
                        lambda_=cfg.lambda_,
                        k=cfg.top_k,
                        zscore=cfg.zscore,
                        softmax=cfg.softmax,
                        temperature=cfg.temperature,
                    )
                )
                (o.loss / cfg.grad_accum).backward()
                seen_tokens += o.answer_tokens
                if teacher_terms is not None:
                    teacher_terms.add(o.teacher_uld)
                for key in acc:
                    acc[key] += float(getattr(o, key).detach()) / cfg.grad_accum
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            record = {
                "step": step + 1,
                **acc,
                **(teacher_terms.pop() if teacher_terms is not None else {}),
                "lr": sched.get_last_lr()[0],
                "grad_norm": grad_norm,
                "answer_tokens": seen_tokens,
                "elapsed_s": round(elapsed, 3),
            }
            metrics.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:
                metrics.flush()
            bar.update(1)
            bar.set_postfix(ce=f"{acc['ce']:.3f}", uld=f"{acc['uld']:.3f}", tok_s=f"{seen_tokens / elapsed:.0f}")
    bar.close()
    summary = {
        "steps": total_steps,
        "answer_tokens": seen_tokens,
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "final": record,
        "student": student_path,
        "cache": cache_dir,
    }
    if unified:
        summary.update(cache=list(cfg.shards), teachers=stream.names, fusion=stream.counts())
        log.info("unified fusion counts: %s", json.dumps(stream.counts()))
    if cfg.save:
        model.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        summary["model_dir"] = str(out / "model")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return TrainResult(summary, model, tokenizer)
