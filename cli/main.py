"""The `fusion-cache` command line: thin wrappers that validate settings and call the library.

fusion-cache teachers
fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2
fusion-cache inspect ./cache/smollm2
fusion-cache verify ./cache/smollm2
fusion-cache train --student ./student --shards ./cache/smollm2 --out ./runs/kd
fusion-cache demo
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

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
    from fusion_cache.teachers import list_presets

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
    codec: str = typer.Option("raw", help="full (ids + quantized values, zstd), values (sorted values only), raw"),
    value_bits: int = typer.Option(None, help="bits per value code of the full/values codecs (default 6 / 8)"),
    max_length: int = typer.Option(2048, help="longest rendered sequence in teacher tokens"),
    overlong: str = typer.Option("truncate", help="truncate or skip sequences longer than --max-length"),
    dtype: str = typer.Option(None, help="teacher dtype (default: from the hardware; fp32 on CPUs without bf16)"),
    batch_tokens: int = typer.Option(8192, help="token budget of one engine call"),
    shard_rows: int = typer.Option(1000, help="rows per shard"),
    limit: int = typer.Option(None, help="use only the first N rows"),
    overwrite: bool = typer.Option(False, help="replace a different cache in --out"),
) -> None:
    """Run a teacher over a dataset once and write its top-K log-probs to a cache.

    Example: fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2
    """
    from fusion_cache.build import run_build
    from fusion_cache.config import BuildConfig

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
        )
        m = run_build(cfg)
    except FusionCacheError as e:
        _fail(e)
    s = m.stats
    typer.echo(
        f"wrote {out}: {s.rows} rows, {s.answer_tokens} answer tokens, {len(m.shards)} shard(s), "
        f"{m.bytes_per_answer_token:.0f} B/answer token, skipped {s.skipped}, truncated {s.truncated}, "
        f"{s.wall_seconds:.1f} s; fingerprint {m.fingerprint[:16]}"
    )


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


@app.command()
def train(
    student: str = typer.Option(..., help="student (pivot) model: preset, local dir or HF id"),
    shards: list[Path] = typer.Option(..., help="teacher cache directory"),
    out: Path = typer.Option(..., help="run directory (metrics.jsonl, model/)"),
    lambda_: float = typer.Option(0.5, "--lambda", help="L = (1-lambda)*CE + lambda*ULD; 0 = plain SFT"),
    top_k: int = typer.Option(10, "--top-k", help="K of the ULD loss"),
    lr: float = typer.Option(5e-5, help="peak learning rate (AdamW, warmup + cosine)"),
    batch_size: int = typer.Option(4, help="samples per micro-batch"),
    grad_accum: int = typer.Option(1, help="micro-batches per optimizer step"),
    max_steps: int = typer.Option(None, help="optimizer steps (default: --epochs over the cache)"),
    epochs: float = typer.Option(1.0, help="passes over the cache when --max-steps is not given"),
    max_length: int = typer.Option(1024, help="longest student sequence"),
    seed: int = typer.Option(0),
    no_zscore: bool = typer.Option(False, "--no-zscore", help="compare top-K values without standardizing"),
) -> None:
    """Train a student by streaming teacher caches with (1-lambda)*CE + lambda*ULD.

    Example: fusion-cache train --student ./student --shards ./cache/smollm2 --out ./runs/kd --lambda 0.5
    """
    from fusion_cache.config import TrainConfig
    from fusion_cache.train import run_train

    try:
        cfg = TrainConfig.create(
            student=student,
            shards=[str(s) for s in shards],
            out=str(out),
            **{"lambda": lambda_},
            top_k=top_k,
            lr=lr,
            batch_size=batch_size,
            grad_accum=grad_accum,
            max_steps=max_steps,
            epochs=epochs,
            max_length=max_length,
            seed=seed,
            zscore=not no_zscore,
        )
        result = run_train(cfg)
    except FusionCacheError as e:
        _fail(e)
    f = result.summary["final"]
    typer.echo(
        f"trained {result.summary['steps']} steps in {result.summary['wall_seconds']:.0f} s: "
        f"ce {f['ce']:.4f}, uld {f['uld']:.4f}; model in {out / 'model'}"
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="working directory of the demo"),
    quick: bool = typer.Option(False, help="a much smaller run (a smoke test, not a result)"),
) -> None:
    """Build a cache from the embedded SmolLM2 teacher, train a student with KD and with plain SFT, compare."""
    from fusion_cache.demo import run_demo

    try:
        run_demo(out, quick=quick)
    except FusionCacheError as e:
        _fail(e)


if __name__ == "__main__":
    app()
