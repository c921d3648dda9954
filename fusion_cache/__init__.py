"""fusion-cache: multi-teacher LLM distillation from compact, shareable Top-K logit caches (InfiFusion).

Stage one (`fusion_cache.capture`) runs each teacher once and stores its top-K log-probs in Arrow shards
(`fusion_cache.cache`); stage two (`fusion_cache.train`) streams S >= 1 caches into a student, each teacher with its
own distillation loss; `fusion_cache.merge` merges pivots trained against different teachers. The names below are
the public API (docs/api.md); each is imported on first use, so ``import fusion_cache`` never imports torch, vLLM or
Triton.

    import fusion_cache as fc
    fc.run_build(fc.BuildConfig.create(teacher="smollm2-135m", data="rows.jsonl", out="cache/smollm2"))
    stream = fc.DistillStream(["cache/smollm2"], tokenizer, chat_template=True, max_length=1024)
    batch = fc.collate(examples, pad_id, n_teachers=1)
    collator = fc.PaddedCollator.for_stream(stream, pad_id)  # batches that accelerate may split along dim 0
    out = fc.loss_from_logits(logits, batch, [fc.make_loss("kl")], lambda_=0.5)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (the one list of the API; docs/api.md documents each)
_EXPORTS: dict[str, str] = {
    # stage one: build a cache
    "BuildConfig": "fusion_cache.capture.config",
    "run_build": "fusion_cache.capture.build",
    "build_summary": "fusion_cache.capture.build",
    "run_generate": "fusion_cache.capture.generate",
    # the cache: open, read, check
    "CacheReader": "fusion_cache.cache.reader",
    "CacheRow": "fusion_cache.cache.row",
    "Manifest": "fusion_cache.cache.manifest",
    "load_manifest": "fusion_cache.cache.manifest",
    "load_cache": "fusion_cache.hf",
    "decode_dataset": "fusion_cache.hf",
    "push_cache": "fusion_cache.cache.hub",
    "pull_cache": "fusion_cache.cache.hub",
    # stage two: stream, collate, losses, train
    "DistillStream": "fusion_cache.train.stream",
    "Example": "fusion_cache.train.stream",
    "TeacherTarget": "fusion_cache.train.stream",
    "collate": "fusion_cache.train.batch",
    "PaddedCollator": "fusion_cache.train.batch",
    "LOSSES": "fusion_cache.train.losses",
    "DistillLoss": "fusion_cache.train.losses",
    "make_loss": "fusion_cache.train.losses",
    "uld_loss": "fusion_cache.train.functional",
    "topk_kl_loss": "fusion_cache.train.functional",
    "loss_from_logits": "fusion_cache.train.objective",
    "forward_losses": "fusion_cache.train.objective",
    "StepOutput": "fusion_cache.train.objective",
    "TrainConfig": "fusion_cache.train.config",
    "check_caches": "fusion_cache.train.check",
    "run_train": "fusion_cache.train.trainer",
    # merge pivots
    "MergeConfig": "fusion_cache.merge.config",
    "run_merge": "fusion_cache.merge.run",
    "METHODS": "fusion_cache.merge.config",
    "train_pairwise": "fusion_cache.recipes.pairwise",
    "fuse_pairwise": "fusion_cache.recipes.pairwise",
    # evaluate
    "evaluate_model": "fusion_cache.eval.evaluate",
    "evaluate_teachers": "fusion_cache.eval.evaluate",
    "evaluate_rows": "fusion_cache.eval.evaluate",
    # models
    "load_student": "fusion_cache.models.load",
    "resolve_model": "fusion_cache.models.presets",
    # errors
    "FusionCacheError": "fusion_cache.errors",
    "ConfigError": "fusion_cache.errors",
    "DataError": "fusion_cache.errors",
    "ShardFormatError": "fusion_cache.errors",
    "FingerprintError": "fusion_cache.errors",
    "MissingDependencyError": "fusion_cache.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fusion_cache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
