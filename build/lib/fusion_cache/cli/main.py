"""The `fusion-cache` command line: thin wrappers that validate settings and call the library.

fusion-cache teachers
fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2 [--resume]
fusion-cache build ... --out ./cache/smollm2 --num-shards 4 --shard-index 0   (one of 4 parts; then `combine`)
fusion-cache combine ./cache/smollm2
fusion-cache generate --model smollm2-135m --data prompts.jsonl --out responses.jsonl [--n 2] [--temperature 0.8]
fusion-cache inspect ./cache/smollm2
fusion-cache verify ./cache/smollm2
fusion-cache train --student ./student --shards ./cache/smollm2 --out ./runs/kd
fusion-cache train --mode pairwise --student ./student --shards ./cache/a --shards ./cache/b --out ./runs
fusion-cache train --mode unified --student ./student --shards ./cache/a --shards ./cache/b --out ./runs/u
fusion-cache merge --base ./student --models ./runs/a --models ./runs/b --method ties --out ./merged
fusion-cache fuse --mode pairwise --student ./student --shards ./cache/a --shards ./cache/b --out ./fused
fusion-cache eval --model ./runs/kd --data heldout.jsonl [--cache ./cache/heldout] [--humaneval] [--limit N]
fusion-cache report ./runs/kd [./runs/sft ...]
fusion-cache demo
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

from fusion_cache.errors import ConfigError
from fusion_cache.errors import FusionCacheError

app = typer.Typer(
    name="fusion-cache",
    help="Multi-teacher LLM distillation from compact, shareable Top-K logit caches (InfiFusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log at INFO level")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def teachers() -> None:
    """List the teacher and pivot presets (any local model directory or HF id works too)."""
    from fusion_cache.models.presets import list_presets

    for p in list_presets():
        where = "packaged (offline)" if p.source == "packaged" else p.hf_id
        typer.echo(f"{p.name:<16} {p.role:<8} {where:<44} {p.description}")


@app.command()
def build(
    teacher: str = typer.Option(..., help="preset name (see `fusion-cache teachers`), local model dir or HF id"),
    data: Path = typer.Option(..., help="JSONL/Parquet with `messages` or `prompt`+`response`, or a datasets dir"),
    out: str = typer.Option(..., help="cache directory to create: a path or an fsspec URL (s3://, gs://, hf://...)"),
    top_k: int = typer.Option(64, "--top-k", help="teacher log-probs kept per answer token"),
    engine: str = typer.Option("vllm", help="vllm (fast) or hf (transformers reference)"),
    codec: str = typer.Option(
        "raw",
        help="full (ids + quantized values, zstd), values (sorted values only), shape (the values' standardized "
        "shape only: z-scored ULD training only), raw",
    ),
    value_bits: int = typer.Option(None, help="bits per value code of the full/values/shape codecs (default 6/8/8)"),
    max_length: int = typer.Option(2048, help="longest rendered sequence in teacher tokens"),
    overlong: str = typer.Option("truncate", help="truncate or skip sequences longer than --max-length"),
    dtype: str = typer.Option(None, help="teacher dtype (default: from the hardware; fp32 on CPUs without bf16)"),
    batch_tokens: int = typer.Option(8192, help="token budget of one engine call"),
    shard_rows: int = typer.Option(1000, help="rows per shard"),
    limit: int = typer.Option(None, help="use only the first N rows"),
    overwrite: bool = typer.Option(False, help="replace a different cache (or an interrupted build) in --out"),
    resume: bool = typer.Option(False, help="continue an interrupted build (same settings) where it stopped"),
    num_shards: int = typer.Option(1, help="split the input into N contiguous parts, each built on its own"),
    shard_index: int = typer.Option(0, help="the part this process builds, 0..N-1 (into <out>/part-I-of-N/)"),
    ray: bool = typer.Option(False, "--ray", help="run all --num-shards parts as Ray tasks (pip install ray)"),
    ray_address: str = typer.Option(None, help="Ray cluster to join (e.g. auto); default: start a local Ray"),
) -> None:
    """Run a teacher over a dataset once and write its top-K log-probs to a cache.

    Example: fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2
    """
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig

    try:
        cfg = BuildConfig.create(
            teacher=teacher,
            data=str(data),
            out=str(out),
            top_k=top_k,
            engine=engine,
            codec=codec,
            value_bits=value_bits,
            max_length=max_length,
            overlong=overlong,
            dtype=dtype,
            batch_tokens=batch_tokens,
            shard_rows=shard_rows,
            limit=limit,
            overwrite=overwrite,
            resume=resume,
            num_shards=num_shards,
            shard_index=shard_index,
        )
        if ray:
            from fusion_cache.capture.ray import run_build_ray

            m = run_build_ray(cfg, address=ray_address)
        else:
            m = run_build(cfg)
    except FusionCacheError as e:
        _fail(e)
    from fusion_cache.capture.build import build_summary

    typer.echo(build_summary(m, str(out)))
    if num_shards > 1 and not ray:
        _echo_parts_status(str(out), num_shards)


def _echo_parts_status(out: str, count: int) -> None:
    """After a part build: whether the last part has combined them all."""
    from fusion_cache.cache.manifest import load_manifest

    try:
        top = load_manifest(out)
    except FusionCacheError:
        top = None
    if top is not None and top.parts is not None and len(top.parts) == count:
        typer.echo(f"combined all {count} parts into {out}: {top.stats.rows} rows, fingerprint {top.fingerprint[:16]}")
    else:
        typer.echo(f"{out}: waiting for the other parts (the last one to finish combines them)")


@app.command()
def combine(out: str = typer.Argument(..., help="the --out of a distributed build (holds part-*-of-*/)")) -> None:
    """Write the combined manifest of a distributed build's parts (the last part to finish does this too)."""
    from fusion_cache.cache.parts import combine_parts

    try:
        m = combine_parts(out)
    except FusionCacheError as e:
        _fail(e)
    typer.echo(
        f"combined {len(m.parts)} parts into {out}: {m.stats.rows} rows, {len(m.shards)} shard(s), "
        f"fingerprint {m.fingerprint[:16]}"
    )


@app.command()
def generate(
    model: str = typer.Option(..., help="the model that answers: preset name, local model dir or HF id"),
    data: Path = typer.Option(..., help="JSONL/Parquet with `prompt` (+`system`) or `messages` per row"),
    out: Path = typer.Option(..., help="JSONL to write: the rows with the answers, valid `build --data` input"),
    engine: str = typer.Option("vllm", help="vllm (fast) or hf (transformers reference)"),
    max_tokens: int = typer.Option(256, help="new tokens per answer, at most"),
    temperature: float = typer.Option(0.8, help="sampling temperature; 0 for greedy"),
    n: int = typer.Option(1, help="answers per prompt (vllm: one request with n outputs; hf: sample j uses seed + j)"),
    seed: int = typer.Option(0, help="sampling seed"),
    limit: int = typer.Option(None, help="use only the first N rows"),
    dtype: str = typer.Option(None, help="model dtype (default: from the hardware)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
) -> None:
    """Have a model write the answers first (teacher-generated answers are the standard distillation recipe).

    Example: fusion-cache generate --model smollm2-135m --data prompts.jsonl --out responses.jsonl --n 2
    """
    from fusion_cache.capture.generate import run_generate

    try:
        meta = run_generate(
            model=model,
            data=str(data),
            out=str(out),
            engine=engine,
            max_tokens=max_tokens,
            temperature=temperature,
            n=n,
            seed=seed,
            limit=limit,
            dtype=dtype,
            overwrite=overwrite,
        )
    except FusionCacheError as e:
        _fail(e)
    typer.echo(f"wrote {out}: {meta['rows_written']} answers to {meta['data']['rows']} prompts ({out}.meta.json)")


@app.command()
def inspect(
    cache: str = typer.Argument(..., help="cache directory or fsspec URL"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Show what a cache holds: teacher, K, rows, answer tokens, bytes per token, shards, fingerprint."""
    from fusion_cache.cache.manifest import load_manifest

    try:
        m = load_manifest(cache)
    except FusionCacheError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(m.model_dump(), indent=2))
        return
    t, s = m.teacher, m.stats
    lines = [
        ("cache", str(cache)),
        ("teacher", f"{t.name} (revision {t.revision}, {t.engine}, {t.dtype})"),
        ("tokenizer hash", t.tokenizer_hash[:16]),
        ("chat template", "yes" if t.chat_template else "no (plain text)"),
        ("dataset", f"{m.dataset.source} (sha256 {m.dataset.hash[:16]}, {m.dataset.rows_read} rows read)"),
        (
            "K / codec",
            f"{m.k} / {m.codec.get('name')}" + "".join(f", {key}={v}" for key, v in m.codec.items() if key != "name"),
        ),
        ("schema", f"version {m.schema_version}"),
        ("rows", f"{s.rows} (skipped {s.skipped}, truncated {s.truncated})"),
        ("tokens", f"{s.tokens} ({s.answer_tokens} answer tokens)"),
        ("bytes", f"{s.payload_bytes} ({m.bytes_per_answer_token:.1f} per answer token)"),
        (
            "shards",
            f"{len(m.shards)}: "
            + ", ".join(f"{x.path} ({x.rows} rows)" for x in m.shards[:4])
            + (" ..." if len(m.shards) > 4 else ""),
        ),
        ("built", f"{m.created_at} by fusion-cache {m.fusion_cache_version} in {s.wall_seconds:.1f} s"),
        *(
            [("part", f"{m.part.index} of {m.part.count} (input rows {m.part.row_start}..{m.part.row_end - 1})")]
            if m.part
            else []
        ),
        *(
            [
                (
                    "parts",
                    f"{len(m.parts)} combined: "
                    + ", ".join(f"{p.path} ({p.rows} rows)" for p in m.parts[:4])
                    + (" ..." if len(m.parts) > 4 else ""),
                )
            ]
            if m.parts
            else []
        ),
        ("fingerprint", m.fingerprint),
    ]
    for key, value in lines:
        typer.echo(f"{key:<15} {value}")


@app.command()
def verify(cache: str = typer.Argument(..., help="cache directory or fsspec URL")) -> None:
    """Check every shard's checksum, schema, row count and lengths, and the manifest's fingerprint chain."""
    from fusion_cache.cache.reader import CacheReader

    try:
        reader = CacheReader(cache)
        problems = reader.verify()
    except FusionCacheError as e:
        _fail(e)
    if problems:
        for p in problems:
            typer.secho(f"BAD {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    m = reader.manifest
    typer.echo(f"OK {cache}: {len(m.shards)} shard(s), {m.stats.rows} rows, fingerprint {m.fingerprint[:16]}")


# Training options shared by `train` and `fuse`.
_LAMBDA = typer.Option(0.5, "--lambda", help="L = (1-lambda)*CE + lambda*KD; 0 = plain SFT")
_TOP_K = typer.Option(10, "--top-k", help="K of the KD loss")
_LR = typer.Option(5e-5, help="peak learning rate (AdamW, warmup + cosine)")
_BATCH = typer.Option(4, help="samples per micro-batch")
_ACCUM = typer.Option(1, help="micro-batches per optimizer step")
_MAX_STEPS = typer.Option(None, help="optimizer steps per run (default: --epochs over the cache)")
_EPOCHS = typer.Option(1.0, help="passes over the cache when --max-steps is not given")
_MAX_LEN = typer.Option(1024, help="longest student sequence")
_TRAIN_SEED = typer.Option(0, help="training seed (shuffle, the same for every run)")


def _train_settings(student, lambda_, top_k, lr, batch_size, grad_accum, max_steps, epochs, max_length, seed) -> dict:
    """The `TrainConfig` fields that `train` and `fuse` share, from their common options."""
    return dict(
        student=student,
        **{"lambda": lambda_},
        top_k=top_k,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        epochs=epochs,
        max_length=max_length,
        seed=seed,
    )


@app.command()
def train(
    student: str = typer.Option(..., help="student (pivot) model: preset, local dir or HF id"),
    shards: list[str] = typer.Option(..., help="teacher cache directory or fsspec URL (repeat for pairwise/unified)"),
    out: Path = typer.Option(..., help="run directory (metrics.jsonl, model/)"),
    lambda_: float = _LAMBDA,
    top_k: int = _TOP_K,
    lr: float = _LR,
    batch_size: int = _BATCH,
    grad_accum: int = _ACCUM,
    max_steps: int = _MAX_STEPS,
    epochs: float = _EPOCHS,
    max_length: int = _MAX_LEN,
    seed: int = _TRAIN_SEED,
    no_zscore: bool = typer.Option(False, "--no-zscore", help="compare top-K values without standardizing"),
    kd_loss: list[str] = typer.Option(
        ["uld"],
        "--kd-loss",
        help="distillation loss, once for every teacher or once per --shards in order: uld (InfiFusion, any "
        "tokenizer), kl (top-K KL; same tokenizer, cache with ids), auto (kl where allowed, else uld)",
    ),
    tail: bool = typer.Option(
        False, "--tail", help="compare true top-K probabilities plus the tail mass (needs --no-zscore)"
    ),
    mode: str = typer.Option(
        "unified",
        help="unified (default): one run against every cache, joined on sample_id (one cache: single-teacher KD); "
        "pairwise: one run per cache into <out>/<cache-name>/ (then merge); single: like unified, one cache only",
    ),
    checkpoint_every: int = typer.Option(None, help="write <out>/checkpoints/step-N every N optimizer steps"),
    keep_checkpoints: int = typer.Option(3, help="newest checkpoints to keep"),
    resume: bool = typer.Option(False, "--resume", help="continue exactly from the newest checkpoint in --out"),
    device: str = typer.Option("auto", help="auto (this rank's GPU if any, else CPU), cpu or cuda"),
    autocast: str = typer.Option("none", help="none or bf16 (autocast of the forward pass; never the default)"),
    grad_checkpointing: bool = typer.Option(
        False, "--grad-checkpointing", help="recompute activations in the backward pass to save memory"
    ),
    fsdp: bool = typer.Option(False, "--fsdp", help="under torchrun: shard the student with FSDP2 instead of DDP"),
    combine: str = typer.Option("mean", help="several teachers: mean | sum | uncertainty (per-token entropy weights)"),
    align: str = typer.Option("bytes", help="another tokenizer: bytes (tokens ending at the same byte) | index"),
    uncertainty_temperature: float = typer.Option(1.0, help="combine uncertainty: T of softmax_s(-H_s,t / T)"),
    join_window: int = typer.Option(1024, help="reads a sample may wait for its partners (caches of other inputs)"),
) -> None:
    """Train a student by streaming teacher caches with (1-lambda)*CE + lambda*KD (each teacher its own loss).

    Example: fusion-cache train --student ./student --shards ./cache/smollm2 --out ./runs/kd --lambda 0.5

    Data parallel: torchrun --nproc-per-node 2 -m fusion_cache train --student ... (the same flags).
    """
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    settings = _train_settings(
        student, lambda_, top_k, lr, batch_size, grad_accum, max_steps, epochs, max_length, seed
    ) | dict(
        zscore=not no_zscore,
        tail=tail,
        kd_loss=kd_loss,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints,
        resume=resume,
        device=device,
        autocast=autocast,
        grad_checkpointing=grad_checkpointing,
        fsdp=fsdp,
    )
    if mode == "pairwise":
        from fusion_cache.recipes.pairwise import train_pairwise

        try:
            runs = train_pairwise([str(s) for s in shards], out, **settings)
        except FusionCacheError as e:
            _fail(e)
        typer.echo(f"trained {len(runs)} pivots: " + ", ".join(str(r / "model") for r in runs))
        return
    if mode not in ("single", "unified"):
        _fail(ValueError(f"--mode: unknown value {mode!r}; valid values: single, pairwise, unified"))
    if mode == "single" and len(shards) > 1:
        _fail(ValueError(f"--mode single takes one cache, got {len(shards)}; use unified (one run against all of "
                         "them) or pairwise (one run per cache, then merge)"))  # fmt: skip
    settings.update(combine=combine, uncertainty_temperature=uncertainty_temperature, join_window=join_window,
                    align=align)  # fmt: skip
    try:
        cfg = TrainConfig.create(shards=[str(s) for s in shards], out=str(out), **settings)
        result = run_train(cfg)
    except FusionCacheError as e:
        _fail(e)
    f = result.summary["final"]
    if f is None or os.environ.get("RANK", "0") != "0":  # nothing left to train, or not torchrun's rank 0
        return
    typer.echo(
        f"trained {result.summary['steps']} steps in {result.summary['wall_seconds']:.0f} s: "
        f"ce {f['ce']:.4f}, kd {f['kd']:.4f}; model in {out / 'model'}"
    )
    if len(result.summary["teachers"]) > 1 or any(k != "uld" for k in result.summary["kd_loss"].values()):
        fusion = result.summary["fusion"]
        j = fusion["join"]
        typer.echo(
            f"joined {j['samples']} samples: {j['complete']} with every teacher, missing "
            + ", ".join(f"{n}: {c}" for n, c in j["missing"].items())
        )
        for name, a in fusion["align"].items():
            loss = result.summary["kd_loss"][name]
            last = f.get(f"{loss}_{name}")
            typer.echo(
                f"  {name}: last {loss} {'n/a' if last is None else f'{last:.4f}'}, aligned {a['aligned']} rows "
                f"({fusion['align_mode']}), "
                f"dropped {a['dropped_student']} student / {a['dropped_teacher']} teacher rows"
            )


def _merge_options(
    method,
    alpha,
    density,
    sign_election,
    drop_rate,
    seed,
    select_topk,
    rate_power,
    skew_strength,
    min_density,
    max_density,
    max_shard_mb,
    overwrite,
) -> dict:
    return dict(
        method=method,
        alpha=alpha,
        density=density,
        sign_election=sign_election,
        drop_rate=drop_rate,
        seed=seed,
        select_topk=select_topk,
        rate_power=rate_power,
        skew_strength=skew_strength,
        min_density=min_density,
        max_density=max_density,
        max_shard_bytes=max_shard_mb * 1024 * 1024,
        overwrite=overwrite,
    )


# Merge options shared by `merge` and `fuse` (None: the method's default, see docs/merge.md).
_METHOD = typer.Option("ta", help="ta | ties | dare | sce | rsaf")
_ALPHA = typer.Option(None, help="scale of the merged task vector (ta 0.3, ties 1.0, dare 0.3, rsaf 1.0)")
_DENSITY = typer.Option(None, help="ties/rsaf: fraction of each task vector kept (0.6)")
_SIGN = typer.Option(None, "--sign-election", help="ties/rsaf: sum (default) or count")
_DROP = typer.Option(None, "--drop-rate", help="dare: drop probability p (0.9)")
_SEED = typer.Option(None, "--merge-seed", help="dare: random seed (0)")
_SELECT = typer.Option(None, "--select-topk", help="sce: fraction of positions kept by variance (0.1)")
_RATE_POWER = typer.Option(None, help="rsaf: exponent of the relative change rate (0.5)")
_SKEW = typer.Option(None, help="rsaf: how much skewness lowers the ratio (0.5)")
_MIN_D = typer.Option(None, help="rsaf: lowest ratio (0.1)")
_MAX_D = typer.Option(None, help="rsaf: highest ratio (1.0)")
_SHARD_MB = typer.Option(2048, "--max-shard-mb", help="largest output shard in MiB")


@app.command()
def merge(
    base: str = typer.Option(..., help="the original pivot all models were fine-tuned from (dir or preset)"),
    models: list[str] = typer.Option(..., help="fine-tuned pivot: model dir or `train` run dir (repeat)"),
    out: Path = typer.Option(..., help="directory of the merged model"),
    method: str = _METHOD,
    alpha: float = _ALPHA,
    density: float = _DENSITY,
    sign_election: str = _SIGN,
    drop_rate: float = _DROP,
    seed: int = _SEED,
    select_topk: float = _SELECT,
    rate_power: float = _RATE_POWER,
    skew_strength: float = _SKEW,
    min_density: float = _MIN_D,
    max_density: float = _MAX_D,
    max_shard_mb: int = _SHARD_MB,
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    threads: int = typer.Option(
        0, help="torch threads for the merge (0: torch's default, capped by the cores the load average leaves idle)"
    ),
) -> None:
    """Merge fine-tuned pivots around their base with task vectors, one tensor at a time (docs/merge.md).

    Example: fusion-cache merge --base ./student --models runs/a --models runs/b --method ties --out ./merged
    """
    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import run_merge

    opts = _merge_options(
        method,
        alpha,
        density,
        sign_election,
        drop_rate,
        seed,
        select_topk,
        rate_power,
        skew_strength,
        min_density,
        max_density,
        max_shard_mb,
        overwrite,
    )
    try:
        summary = run_merge(MergeConfig.create(base=base, models=models, out=str(out), threads=threads, **opts))
    except FusionCacheError as e:
        _fail(e)
    typer.echo(
        f"merged {len(models)} models with {method} {summary['options']}: {summary['tensors']} tensors, "
        f"{summary['shards']} shard(s), {summary['seconds']:.1f} s; model in {out}"
    )


@app.command()
def fuse(
    student: str = typer.Option(..., help="the pivot: preset, local dir or HF id"),
    shards: list[str] = typer.Option(..., help="teacher cache directory or fsspec URL (repeat, one per teacher)"),
    out: Path = typer.Option(..., help="<out>/runs/<cache-name>/ per teacher, <out>/merged/ the result"),
    mode: str = typer.Option("pairwise", help="pairwise: train per teacher, then merge"),
    lambda_: float = _LAMBDA,
    top_k: int = _TOP_K,
    lr: float = _LR,
    batch_size: int = _BATCH,
    grad_accum: int = _ACCUM,
    max_steps: int = _MAX_STEPS,
    epochs: float = _EPOCHS,
    max_length: int = _MAX_LEN,
    seed: int = _TRAIN_SEED,
    method: str = _METHOD,
    alpha: float = _ALPHA,
    density: float = _DENSITY,
    sign_election: str = _SIGN,
    drop_rate: float = _DROP,
    merge_seed: int = _SEED,
    select_topk: float = _SELECT,
    rate_power: float = _RATE_POWER,
    skew_strength: float = _SKEW,
    min_density: float = _MIN_D,
    max_density: float = _MAX_D,
    max_shard_mb: int = _SHARD_MB,
    overwrite: bool = typer.Option(False, help="replace an existing <out>/merged"),
) -> None:
    """Pairwise fusion in one go: train one pivot per teacher cache, then merge them.

    Example: fusion-cache fuse --student ./student --shards ./cache/a --shards ./cache/b --out ./fused --method ties
    """
    from fusion_cache.recipes.pairwise import fuse_pairwise

    if mode != "pairwise":
        _fail(ValueError(f"--mode: unknown value {mode!r}; valid values: pairwise"))
    train_settings = _train_settings(
        student, lambda_, top_k, lr, batch_size, grad_accum, max_steps, epochs, max_length, seed
    )
    opts = _merge_options(
        method,
        alpha,
        density,
        sign_election,
        drop_rate,
        merge_seed,
        select_topk,
        rate_power,
        skew_strength,
        min_density,
        max_density,
        max_shard_mb,
        overwrite,
    )
    try:
        runs, summary = fuse_pairwise([str(s) for s in shards], out, train=train_settings, merge=opts)
    except FusionCacheError as e:
        _fail(e)
    typer.echo(f"trained {len(runs)} pivots in {out / 'runs'}; merged with {method} into {summary['out']}")


def demo_settings(quick: bool, kd_loss: list[str] | None, second_teacher: str | None, combine: list[str] | None):
    """The `DemoSettings` of `fusion-cache demo`'s options (repeated values are kept once, in order)."""
    from dataclasses import replace

    from fusion_cache.recipes.demo import DemoSettings

    settings = DemoSettings.quick() if quick else DemoSettings()
    if kd_loss:
        bad = [k for k in kd_loss if k not in ("kl", "uld")]
        if bad:
            raise ConfigError(f"--kd-loss: unknown value(s) {bad}; valid values: kl, uld")
        settings = replace(settings, kd_losses=tuple(dict.fromkeys(kd_loss)))
    if combine and not second_teacher:
        raise ConfigError(f"--combine {combine}: unified runs need a --second-teacher")
    if second_teacher:
        extra = {"combines": tuple(dict.fromkeys(combine))} if combine else {}
        settings = replace(settings, second_teacher=second_teacher, **extra)  # DemoSettings checks the values
    return settings


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="`fusion-cache train` run directories (several: overlaid)"),
    out: Path = typer.Option(None, help="PNG to write (default: <run>/report.png; several runs: in their parent)"),
) -> None:
    """Plot CE, per-teacher ULD, loss and lr over steps (PNG) and summarize the runs (markdown table).

    Example: fusion-cache report ./runs/kd ./runs/sft --out ./runs/compare.png
    """
    from fusion_cache.eval.report import write_report

    try:
        png, md, table = write_report([str(r) for r in runs], None if out is None else str(out))
    except FusionCacheError as e:
        _fail(e)
    except ImportError as e:  # matplotlib is an optional extra
        _fail(e)
    typer.echo(table)
    typer.echo(f"wrote {png} and {md}")


@app.command(name="eval")
def eval_(
    model: str = typer.Option(..., help="model: preset, local dir, HF id, or a `train` run dir (its model/)"),
    data: str = typer.Option(None, help="input rows (JSONL/Parquet, `build --data` format) or a cache: answer CE"),
    cache: str = typer.Option(None, help="teacher cache: answer CE, teacher top-1 agreement (same tokenizer), ULD"),
    humaneval: bool = typer.Option(False, "--humaneval", help="HumanEval pass@1 (greedy, sandboxed execution)"),
    limit: int = typer.Option(None, help="only the first N rows / HumanEval problems"),
    max_new_tokens: int = typer.Option(384, help="HumanEval: longest completion"),
    timeout: float = typer.Option(10.0, help="HumanEval: seconds (wall) each program may run"),
    humaneval_prompt: str = typer.Option(
        "raw", help="HumanEval: raw (continue the prompt, the standard harness) or chat (instruct models)"
    ),
    top_k: int = typer.Option(10, "--top-k", help="K of the reported ULD"),
    batch_size: int = typer.Option(8, help="samples per forward pass"),
    max_length: int = typer.Option(1024, help="longest sequence in the model's tokens"),
    out: Path = typer.Option(None, help="write the results as JSON here (default for a run dir: <run>/eval.json)"),
) -> None:
    """Held-out answer CE, teacher top-1 agreement and HumanEval pass@1 of a model.

    Example: fusion-cache eval --model ./runs/kd --data heldout.jsonl --cache ./cache/heldout --humaneval --limit 20
    """
    from fusion_cache.eval.evaluate import eval_table
    from fusion_cache.eval.evaluate import run_eval

    try:
        result = run_eval(
            model,
            data=data,
            cache=cache,
            humaneval=humaneval,
            limit=limit,
            max_new_tokens=max_new_tokens,
            timeout=timeout,
            prompt_style=humaneval_prompt,
            batch_size=batch_size,
            max_length=max_length,
            k=top_k,
            out=None if out is None else str(out),
            progress=True,
        )
    except FusionCacheError as e:
        _fail(e)
    typer.echo(f"model {result['model']}")
    typer.echo(eval_table(result))
    if "written_to" in result:
        typer.echo(f"wrote {result['written_to']}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="working directory of the demo"),
    quick: bool = typer.Option(False, help="a much smaller run (a smoke test, not a result)"),
    kd_loss: list[str] = typer.Option(
        None,
        "--kd-loss",
        help="KD runs to compare with SFT (repeat): kl (default: top-K KL) and/or uld (InfiFusion's ULD; "
        "each run adds ~4 minutes on 2 cores)",
    ),
    second_teacher: str | None = typer.Option(
        None,
        "--second-teacher",
        help="a second teacher (e.g. gemma3-270m): captures the same rows and adds KD from it alone and unified "
        "fusion of both teachers to the table (each run adds ~4-8 minutes on 2 cores)",
    ),
    combine: list[str] = typer.Option(
        None, "--combine", help="with --second-teacher: unified runs to add (repeat): mean (default), sum, uncertainty"
    ),
) -> None:
    """Build a cache from the embedded SmolLM2 teacher, train a student with KD and with plain SFT, compare."""
    from fusion_cache.recipes.demo import run_demo

    try:
        run_demo(out, settings=demo_settings(quick, kd_loss, second_teacher, combine))
    except FusionCacheError as e:
        _fail(e)


if __name__ == "__main__":
    app()
