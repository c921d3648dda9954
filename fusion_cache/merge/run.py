"""`fusion-cache merge`: merge fine-tuned pivots around their base pivot, one tensor at a time.

    fusion-cache merge --base ./student --models runs/a runs/b --method ties --out ./merged

Per tensor name: read the base and every model's tensor, form the task vectors in fp32, apply the method
(`fusion_cache.merge.methods`), add to the base and write the result in the base's dtype into a sharded
safetensors model. Peak memory is a few copies of the largest tensor, never whole models. The base's config,
generation config, tokenizer and chat template are copied, so transformers and vLLM load the result.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion_cache.errors import ConfigError
from fusion_cache.merge import methods
from fusion_cache.merge.config import METHODS
from fusion_cache.merge.config import MergeConfig
from fusion_cache.merge.io import DTYPES
from fusion_cache.merge.io import INDEX_FILE
from fusion_cache.merge.io import PlannedTensor
from fusion_cache.merge.io import SafetensorsModel
from fusion_cache.merge.io import ShardedWriter

log = logging.getLogger(__name__)

# config.json fields that must agree between the base and every model (shapes are checked tensor by tensor too).
ARCH_FIELDS = ("model_type", "architectures", "tie_word_embeddings", "vocab_size", "hidden_size", "num_hidden_layers")
# When embeddings are tied, transformers may or may not store lm_head.weight; it is never merged separately.
TIED_NAMES = ("lm_head.weight",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PROVENANCE = "merge_config.json"


def _open_base(base: str) -> SafetensorsModel:
    """The base pivot: a model directory, a run directory, or a preset name (resolved like `train --student`)."""
    if not Path(base).exists():
        from fusion_cache.teachers import PRESETS
        from fusion_cache.teachers import resolve_model

        if base in PRESETS:
            return SafetensorsModel(resolve_model(base).path)
    return SafetensorsModel(base)


def check_compatible(base: SafetensorsModel, models: list[SafetensorsModel]) -> list[str]:
    """Check architectures, tensor names and shapes; return the names to merge, in the base's order.

    Raises:
        ConfigError: naming the model and the config field, or the tensor and both shapes.
    """
    bcfg = base.config
    for m in models:
        mcfg = m.config
        for field in ARCH_FIELDS:
            if field in bcfg and field in mcfg and bcfg[field] != mcfg[field]:
                raise ConfigError(
                    f"{m.dir}: config.json {field}={mcfg[field]!r} differs from the base's {bcfg[field]!r} "
                    f"({base.dir}); only models fine-tuned from the same base merge"
                )
    tied = bool(bcfg.get("tie_word_embeddings", False))
    skip = set(TIED_NAMES) if tied else set()
    names = [n for n in base.infos if n not in skip]
    wanted = set(names)
    for m in models:
        have = set(m.infos) - skip
        if have != wanted:
            missing = sorted(wanted - have)
            extra = sorted(have - wanted)
            if missing:
                raise ConfigError(f"{m.dir}: tensor {missing[0]!r} of the base is missing ({len(missing)} missing)")
            raise ConfigError(f"{m.dir}: tensor {extra[0]!r} is not in the base {base.dir} ({len(extra)} extra)")
        for n in names:
            if m.infos[n].shape != base.infos[n].shape:
                raise ConfigError(
                    f"{m.dir}: tensor {n!r} has shape {list(m.infos[n].shape)}, "
                    f"the base has {list(base.infos[n].shape)}"
                )
    return names


def _is_float(code: str) -> bool:
    return code in ("F64", "F32", "F16", "BF16")


def model_change_rates(base: SafetensorsModel, models: list[SafetensorsModel], names: list[str]) -> list[float]:
    """Per model, ``||theta_s - theta_o|| / ||theta_o||`` over all floating tensors (RSAF's reference rate)."""
    base_sq = 0.0
    tau_sq = [0.0] * len(models)
    for n in names:
        if not _is_float(base.infos[n].dtype):
            continue
        b = base.tensor(n).double()
        base_sq += float(b.pow(2).sum())
        for s, m in enumerate(models):
            tau_sq[s] += float((m.tensor(n).double() - b).pow(2).sum())
    return [(t / base_sq) ** 0.5 if base_sq > 0 else 0.0 for t in tau_sq]


def merge_tensor(
    method: str, tau: torch.Tensor, base: torch.Tensor, name: str, opts: dict, rate_refs: list[float] | None
) -> torch.Tensor:
    """The merged task vector of one tensor. tau: [S, *shape] fp32; base: [*shape] fp32."""
    if method == "ta":
        return methods.task_arithmetic(tau, **opts)
    if method == "ties":
        return methods.ties(tau, **opts)
    if method == "dare":
        return methods.dare(tau, name=name, **opts)
    if method == "sce":
        return methods.sce(tau, **opts)
    if method == "rsaf":
        return methods.rsaf(tau, base, rate_refs=rate_refs, **opts)
    raise ConfigError(f"method: unknown value {method!r}; valid values: {', '.join(METHODS)}")


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config, tokenizer files and chat template (everything but weights and markers)."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name == INDEX_FILE or f.name.endswith(WEIGHT_SUFFIXES):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"out: {out} exists and is not empty; pass --overwrite to replace it")
    tmp = out.with_name(out.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def run_merge(cfg: MergeConfig, *, progress: bool = True) -> dict:
    """Merge ``cfg.models`` around ``cfg.base`` with ``cfg.method``; write the model to ``cfg.out``.

    Returns:
        A summary (also written to ``<out>/merge_config.json``): method, options, inputs, tensors, bytes read and
        written, seconds.

    Raises:
        ConfigError: a missing or non-safetensors model, different architectures, a tensor missing or of another
            shape (the message names it), or an ``out`` that holds something else.
    """
    t0 = time.perf_counter()
    base = _open_base(cfg.base)
    models = [SafetensorsModel(m) for m in cfg.models]
    tmp = None
    try:
        names = check_compatible(base, models)
        opts = cfg.method_options()
        rate_refs = model_change_rates(base, models, names) if cfg.method == "rsaf" else None
        out = Path(cfg.out)
        tmp = _prepare_out(out, cfg.overwrite)
        side_files = _copy_side_files(base.dir, tmp)
        plan = [PlannedTensor(n, DTYPES[base.infos[n].dtype], base.infos[n].shape) for n in names]
        bytes_read = 0
        with ShardedWriter(tmp, plan, cfg.max_shard_bytes, metadata={"merged_by": "fusion-cache"}) as writer:
            for n in tqdm(names, desc=f"merge {cfg.method}", unit="tensor", disable=not progress):
                b = base.tensor(n)
                bytes_read += base.infos[n].nbytes + sum(m.infos[n].nbytes for m in models)
                if not _is_float(base.infos[n].dtype):
                    writer.write(n, b)  # integer buffers (e.g. position ids) are not task vectors: keep the base's
                    continue
                b32 = b.float()
                tau = torch.empty((len(models), *b32.shape), dtype=torch.float32)
                for s, m in enumerate(models):  # filled in place: no per-model fp32 copy, no stack
                    tau[s].copy_(m.tensor(n)).sub_(b32)
                merged = b32.add_(merge_tensor(cfg.method, tau, b32, n, opts, rate_refs))
                del tau
                writer.write(n, merged.to(b.dtype))
        summary = {
            "method": cfg.method,
            "options": opts,
            "base": str(base.dir),
            "models": [str(m.dir) for m in models],
            "tensors": len(names),
            "rate_refs": rate_refs,
            "shards": len(writer.files),
            "bytes_read": bytes_read,
            "bytes_written": sum(p.nbytes for p in plan),
            "copied": side_files,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / PROVENANCE).write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written model behind
        raise
    finally:
        base.close()
        for m in models:
            m.close()
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    summary["out"] = str(out)
    return summary
