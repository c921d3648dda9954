"""`fusion-cache merge`: merge fine-tuned pivots around their base pivot, one tensor at a time.

    fusion-cache merge --base ./student --models runs/a runs/b --method ties --out ./merged

Per tensor name: read the base and every model's tensor, form the task vectors in fp32, apply the method
(`fusion_cache.merge.methods`), add to the base and write the result in the base's dtype into a sharded
safetensors model. Peak memory is a few copies of the largest tensor, never whole models. The base's config,
generation config, tokenizer and chat template are copied, so transformers and vLLM load the result; the resolved
settings go to ``<out>/config.yaml`` (``fusion-cache merge --config <out>/config.yaml`` replays the merge). A model
saved as a LoRA adapter (`fusion_cache.models.lora`) is first merged onto the base in a scratch directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fusion_cache.config import write_config_yaml
from fusion_cache.errors import ConfigError
from fusion_cache.merge import methods
from fusion_cache.merge.config import MergeConfig
from fusion_cache.merge.io import DTYPES
from fusion_cache.merge.io import INDEX_FILE
from fusion_cache.merge.io import PlannedTensor
from fusion_cache.merge.io import SafetensorsModel
from fusion_cache.merge.io import ShardedWriter
from fusion_cache.merge.registry import get_method

log = logging.getLogger(__name__)

# config.json fields that must agree between the base and every model (shapes are checked tensor by tensor too).
ARCH_FIELDS = ("model_type", "architectures", "tie_word_embeddings", "vocab_size", "hidden_size", "num_hidden_layers")
# When embeddings are tied, transformers may or may not store lm_head.weight; it is never merged separately.
TIED_NAMES = ("lm_head.weight",)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
PROVENANCE = "merge_config.json"
# Entries per chunk of RSAF's pass over the models (`model_stats`): a multiple of methods.REDUCE_CHUNK, so its
# float64 blocks do not depend on it; 65536 was the fastest of 32768-262144 (1 thread, 3 models).
STATS_CHUNK = 2 * methods.REDUCE_CHUNK


def _open_base(base: str) -> SafetensorsModel:
    """The base pivot: a model directory, a run directory, or a preset name (resolved like `train --student`)."""
    if not Path(base).exists():
        from fusion_cache.models.presets import PRESETS
        from fusion_cache.models.presets import resolve_model

        if base in PRESETS:
            return SafetensorsModel(resolve_model(base, role="base").path)
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


class Buffers:
    """Named buffers reused from tensor to tensor, each grown to the largest request and kept.

    A merge allocates its working memory once: a fresh 100 MB tensor costs more in page faults (notably in a VM
    that hands freed memory back to the host) than the arithmetic done on it.
    """

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A 1-D ``dtype`` tensor of ``numel`` elements, a view of buffer ``name`` (contents undefined)."""
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < nbytes:
            self._bufs.pop(name, None)  # free the old one first
            buf = self._bufs[name] = torch.empty(max(nbytes, 8) + (-max(nbytes, 8) % 8), dtype=torch.uint8)
        return buf[:nbytes].view(dtype)

    def reserve(self, name: str, nbytes: int) -> None:
        """Grow buffer ``name`` to ``nbytes`` now, so later requests never reallocate it."""
        self.get(name, torch.uint8, nbytes)


def model_change_rates(
    base: SafetensorsModel, models: list[SafetensorsModel], names: list[str], buffers: Buffers | None = None
) -> list[float]:
    """Per model, ``||theta_s - theta_o|| / ||theta_o||`` over all floating tensors (RSAF's reference rate).

    `model_stats`' rates (its per-tensor sums are dropped). ``buffers`` is unused (kept for callers that pass one).
    """
    return model_stats(base, models, names)[0]


def model_stats(
    base: SafetensorsModel, models: list[SafetensorsModel], names: list[str]
) -> tuple[list[float], dict[str, methods.TensorStats]]:
    """RSAF's pass over the models: the model-wide change rates and every floating tensor's `methods.TensorStats`.

    Returns:
        (rates, stats): rates[s] = ``||theta_s - theta_o|| / ||theta_o||`` over all floating tensors; stats[name]
        holds sum(theta_o^2) and, per model, the power sums of |theta_s - theta_o| (`methods.power_sums`), from
        which `methods.rsaf_` takes the tensor's rate and skewness without another pass over it.

    Everything in float64 from the files' memory maps (`SafetensorsModel.view`: no read buffers), chunk by chunk
    with all models in one torch call per power: ``d = theta_s - theta_o`` (exact in float64), ``d^2``, ``|d|``,
    ``d^2 * |d|``, summed in `methods.block_sums`' fixed blocks. Per tensor the sums are `methods.grouped_total`
    of its blocks, the floats `methods.power_sums` and `methods.sum_sq` give on the fp32 task vector the merge forms
    (the same values wherever its fp32 subtraction is exact, as it is for bf16 inputs); the model-wide sums add the
    block groups tensor after tensor, `methods.sum_sq`'s grouping over the concatenated model. Thread-count
    independent.
    """
    base_sq = 0.0
    tau_sq = [0.0] * len(models)
    stats: dict[str, methods.TensorStats] = {}
    chunk = STATS_CHUNK
    s_count = len(models)
    # rows: theta_o^2, then per model d^2, |d|, |d|^3 (d = theta_s - theta_o): one block_sums call per chunk
    p64 = torch.empty(1 + 3 * s_count, chunk, dtype=torch.float64)
    b64 = torch.empty(chunk, dtype=torch.float64)
    for n in names:
        info = base.infos[n]
        if not _is_float(info.dtype):
            continue
        b = base.view(n).reshape(-1)  # mapped, not read into a buffer: the float64 copies below read the file
        ts = [m.view(n).reshape(-1) for m in models]
        blocks: list[list[float]] = [[] for _ in range(1 + 3 * s_count)]  # per row of p64
        for i in range(0, b.numel(), chunk):
            b_ = b64[: min(chunk, b.numel() - i)].copy_(b[i : i + chunk])
            m = b_.numel()
            p_ = p64[:, :m]
            torch.mul(b_, b_, out=p_[0])
            d, mag, cube = p_[1 : 1 + s_count], p_[1 + s_count : 1 + 2 * s_count], p_[1 + 2 * s_count :]
            for s, t in enumerate(ts):
                d[s].copy_(t[i : i + chunk])
            d.sub_(b_)  # theta_s - theta_o, all models (exact in float64)
            torch.abs(d, out=mag)
            torch.mul(d.square_(), mag, out=cube)
            sums = methods.block_sums(p_)  # row by row
            per = len(sums) // len(blocks)
            for r, bl in enumerate(blocks):
                bl += sums[r * per : (r + 1) * per]
        base_sq = methods.grouped_total(blocks[0], base_sq)
        sq, ab, cu = blocks[1 : 1 + s_count], blocks[1 + s_count : 1 + 2 * s_count], blocks[1 + 2 * s_count :]
        tau_sq = [methods.grouped_total(bl, t) for bl, t in zip(sq, tau_sq, strict=True)]
        g = methods.grouped_total
        stats[n] = methods.TensorStats(g(blocks[0]), [(g(ab[s]), g(sq[s]), g(cu[s])) for s in range(s_count)])
        for mdl in (base, *models):
            mdl.release(n)
    return [(t / base_sq) ** 0.5 if base_sq > 0 else 0.0 for t in tau_sq], stats


def merge_tensor(
    method: str, tau: torch.Tensor, base: torch.Tensor, name: str, opts: dict, rate_refs: list[float] | None
) -> torch.Tensor:
    """The merged task vector of one tensor; ``tau`` is left alone. tau: [S, *shape] fp32; base: [*shape] fp32."""
    return merge_tensor_(method, tau.clone(memory_format=torch.contiguous_format), base, name, opts, rate_refs)


def merge_tensor_(
    method: str,
    tau: torch.Tensor,
    base: torch.Tensor,
    name: str,
    opts: dict,
    rate_refs: list[float] | None,
    work: torch.Tensor | None = None,
    stats: methods.TensorStats | None = None,
) -> torch.Tensor:
    """`merge_tensor`, overwriting ``tau`` (contiguous [S, *shape] fp32); returns a view of tau[0].

    The method's kernel (`fusion_cache.merge.registry`) gets the inputs it takes. ``work``: fp32 scratch of
    >= tau[0].numel() elements for the methods that select by magnitude or variance. ``stats``: RSAF's sums for
    this tensor from `model_stats` (None: computed from ``tau`` and ``base``).

    Raises:
        ConfigError: an unknown method name (the message lists the registered ones).
    """
    return get_method(method).merge_(tau, opts, base=base, name=name, rate_refs=rate_refs, work=work, stats=stats)


def _read_fp32(model: SafetensorsModel, name: str, out: torch.Tensor) -> torch.Tensor:
    """Tensor ``name`` as fp32 in ``out``: read straight into it when stored as F32, else converted from the map."""
    info = model.infos[name]
    if info.dtype == "F32":
        return model.tensor(name, out=out)
    out = out.view(info.shape).copy_(model.view(name))  # converted straight from the file's mapped pages
    model.release(name)
    return out


def _check_finite(t: torch.Tensor, name: str, model: SafetensorsModel, base: SafetensorsModel) -> None:
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)  # NaN propagates into both; one pass, no full-size temporary
    if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        raise ConfigError(
            f"tensor {name!r}: {model.dir} minus the base {base.dir} has NaN or inf entries; "
            "a task vector must be finite to merge"
        )


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
    threads = torch.get_num_threads()
    chosen = cfg.threads or auto_threads(threads)
    if chosen != threads:
        log.info("merge: %d torch thread(s) (%s)", chosen, "--threads" if cfg.threads else "idle cores")
    torch.set_num_threads(chosen)
    try:
        return _run_merge(cfg, progress, t0)
    finally:
        torch.set_num_threads(threads)


def auto_threads(default: int) -> int:
    """Threads for a merge when the user gave none: torch's ``default``, capped by the cores the 1-minute load
    average leaves idle (at least 1).

    The merge's element-wise torch ops split every tensor across threads whose OpenMP workers spin-wait for each
    other; when the cores are taken by other jobs that wait costs far more than the work. Measured on 2 cores with
    three training jobs beside it (docs/merge.md): TA 29 s, TIES 109 s, RSAF 123 s at 2 threads against 1.0,
    2.4 and 2.7 s at 1.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return default
    idle = int((os.cpu_count() or 1) - load + 0.5)
    return max(1, min(default, idle))


def _adapter_dir(model: str) -> Path | None:
    """The adapter directory of a model given as an adapter (or a run directory whose model/ is one), else None."""
    from fusion_cache.models.lora import is_adapter_dir

    for candidate in (Path(model), Path(model) / "model"):
        if is_adapter_dir(candidate):
            return candidate
    return None


def _run_merge(cfg: MergeConfig, progress: bool, t0: float) -> dict:
    adapters = {m: d for m in cfg.models if (d := _adapter_dir(m)) is not None}
    if not adapters:
        return _merge_models(cfg, list(cfg.models), progress, t0)
    from fusion_cache.models.lora import merge_adapter_to_dir

    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapters-", dir=Path(cfg.out).parent) as scratch:
        paths = []
        for i, m in enumerate(cfg.models):
            if m in adapters:
                log.info("merge: %s is a LoRA adapter; merging it onto %s first", m, cfg.base)
                m = str(merge_adapter_to_dir(adapters[m], Path(scratch) / f"model-{i}", base=_base_path(cfg.base)))
            paths.append(m)
        # the summary names the models as given (the scratch copies are gone when it is read)
        return _merge_models(cfg, paths, progress, t0, labels=[str(m) for m in cfg.models])


def _base_path(base: str) -> str:
    """The base as a path or HF id the transformers loader takes (a run directory: its model/)."""
    p = Path(base)
    return str(p / "model") if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file() else base


def _merge_models(cfg: MergeConfig, model_paths: list[str], progress: bool, t0: float,
                  labels: list[str] | None = None) -> dict:  # fmt: skip
    base = _open_base(cfg.base)
    models = [SafetensorsModel(m) for m in model_paths]
    tmp = None
    try:
        names = check_compatible(base, models)
        opts = cfg.method_options()
        out = Path(cfg.out)
        tmp = _prepare_out(out, cfg.overwrite)
        side_files = _copy_side_files(base.dir, tmp)
        plan = [PlannedTensor(n, DTYPES[base.infos[n].dtype], base.infos[n].shape) for n in names]
        floats = [n for n in names if _is_float(base.infos[n].dtype)]
        s_count = len(models)
        max_numel = max((math.prod(base.infos[n].shape) for n in floats), default=0)
        bufs = Buffers()  # sized once to the largest tensor: (S + 2) fp32 copies plus raw reads
        bufs.reserve("tau", 4 * s_count * max_numel)
        bufs.reserve("base32", 4 * max_numel)
        method = get_method(cfg.method)
        if method.takes("work"):
            bufs.reserve("work", 4 * max_numel)
        rate_refs, stats = model_stats(base, models, names) if method.takes("rate_refs") else (None, {})
        bytes_read = 0
        with ShardedWriter(tmp, plan, cfg.max_shard_bytes, metadata={"merged_by": "fusion-cache"}) as writer:
            for n in tqdm(names, desc=f"merge {cfg.method}", unit="tensor", disable=not progress):
                info = base.infos[n]
                bytes_read += info.nbytes + sum(m.infos[n].nbytes for m in models)
                if not _is_float(info.dtype):
                    writer.write(n, base.tensor(n))  # integer buffers (e.g. position ids) are not task vectors
                    continue
                numel = math.prod(info.shape)
                b32 = _read_fp32(base, n, bufs.get("base32", torch.float32, numel))
                tau = bufs.get("tau", torch.float32, s_count * numel).view(s_count, *info.shape)
                for s, m in enumerate(models):  # tau_s = theta_s - theta_o, written in place
                    if m.infos[n].dtype == "F32":
                        m.tensor(n, out=tau[s]).sub_(b32)
                    else:  # converted straight from the mapped file (a mixed-dtype torch.sub is 3x slower)
                        tau[s].copy_(m.view(n))
                        m.release(n)
                        tau[s].sub_(b32)
                    _check_finite(tau[s], n, m, base)
                work = bufs.get("work", torch.float32, numel) if method.takes("work") else None
                merged = b32.add_(
                    method.merge_(tau, opts, base=b32, name=n, rate_refs=rate_refs, work=work, stats=stats.get(n))
                )
                if info.dtype != "F32":  # back to the base's dtype, in a reused buffer
                    out_dtype = DTYPES[info.dtype]
                    merged = bufs.get("model_raw", out_dtype, numel).view(info.shape).copy_(merged)
                writer.write(n, merged)
        summary = {
            "method": cfg.method,
            "options": opts,
            "base": str(base.dir),
            "models": labels or [str(m.dir) for m in models],
            "tensors": len(names),
            "rate_refs": rate_refs,
            "shards": len(writer.files),
            "bytes_read": bytes_read,
            "bytes_written": sum(p.nbytes for p in plan),
            "copied": side_files,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / PROVENANCE).write_text(json.dumps(summary, indent=2) + "\n")
        write_config_yaml(cfg, tmp, "merge")
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


def merge_summary(summary: dict) -> str:
    """The end-of-merge report (one line) of a `run_merge` summary."""
    return (
        f"merged {len(summary['models'])} models with {summary['method']} {summary['options']}: "
        f"{summary['tensors']} tensors, {summary['shards']} shard(s), {summary['seconds']:.1f} s; "
        f"model in {summary['out']}"
    )
