"""The `fusion-cache` command line: thin wrappers that validate settings and call the library.

fusion-cache run demo                          (a whole recipe: capture, train, merge, evaluate; see docs/recipes.md)
fusion-cache run my-recipe.yaml --set train.max_steps=100
fusion-cache teachers
fusion-cache build --config build.yaml [--flag value ...]   (every command reads its settings from YAML too)
fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2 [--resume]
fusion-cache build ... --out ./cache/smollm2 --num-shards 4 --shard-index 0   (one of 4 parts; then `combine`)
fusion-cache combine --cache ./cache/smollm2
fusion-cache generate --model smollm2-135m --data prompts.jsonl --out responses.jsonl [--n 2] [--temperature 0.8]
fusion-cache inspect --cache ./cache/smollm2      (or hf://datasets/org/name, s3://bucket/cache: every --cache)
fusion-cache check --student smollm2-135m ./cache/smollm2 ./cache/gemma3 [--kd-loss auto] [--json]
fusion-cache push ./cache/smollm2 team/smollm2-topk [--revision v1] [--private]   (one Hub commit; docs/sharing.md)
fusion-cache pull team/smollm2-topk ./caches/smollm2 [--revision v1]   (downloads and verifies; refuses a bad cache)
fusion-cache verify --cache ./cache/smollm2 [--trusted-key team.pub]
fusion-cache keygen --out ~/.keys/team && fusion-cache sign --cache ./cache/smollm2 --key ~/.keys/team
fusion-cache train --student ./student --cache ./cache/smollm2 --out ./runs/kd
fusion-cache train --config ./runs/kd/config.yaml --out ./runs/kd2   (a run's config.yaml replays it)
fusion-cache train --mode pairwise --student ./student --cache ./cache/a --cache ./cache/b --out ./runs
fusion-cache merge --base ./student --models ./runs/a --models ./runs/b --method ties --out ./merged
fusion-cache fuse --student ./student --cache ./cache/a --cache ./cache/b --out ./fused
fusion-cache eval --model ./runs/kd --data heldout.jsonl [--cache ./cache/heldout] [--humaneval] [--limit N]
fusion-cache report ./runs/kd [./runs/sft ...]
fusion-cache demo

Errors are one line with a hint (`fusion_cache.cli.errors`); ``-v`` (before or after the command) shows INFO logs,
the libraries' own logs and tracebacks. Old spellings (``--shards``, ``train --top-k``, ``--merge-seed`` of merge,
``--max-tokens`` of generate, a positional cache) still work for this release, with a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import typer

from fusion_cache import __version__
from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines import ENGINE_NAMES
from fusion_cache.cli.errors import ErrorBoundary
from fusion_cache.cli.logs import configure_logging
from fusion_cache.cli.logs import quiet_library_progress
from fusion_cache.cli.options import Flag
from fusion_cache.cli.options import common_options
from fusion_cache.cli.options import config_options
from fusion_cache.errors import ConfigError
from fusion_cache.errors import FusionCacheError
from fusion_cache.eval import PROMPT_STYLES
from fusion_cache.merge.config import MergeConfig
from fusion_cache.recipes.pairwise import PAIRWISE
from fusion_cache.recipes.pairwise import TRAIN_MODES
from fusion_cache.train.align import ALIGN_MODES
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.losses import LOSS_CHOICES
from fusion_cache.train.weights import COMBINE_MODES
from fusion_cache.train.weights import KD_GATES

app = typer.Typer(
    name="fusion-cache",
    help="Multi-teacher LLM distillation from compact, shareable Top-K logit caches (InfiFusion).",
    cls=ErrorBoundary,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _warn(message: str) -> None:
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"fusion-cache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="INFO logs, the libraries' logs, tracebacks"),
    version: bool = typer.Option(
        False, "--version", help="print the version and exit", is_eager=True, callback=_show_version
    ),
) -> None:
    configure_logging(verbose=verbose)


def _cache_argument(cache: str | None, old: str | None, command: str) -> str:
    """``--cache``, or the positional cache of earlier releases (with a warning)."""
    if cache is not None and old is not None and cache != old:
        raise ConfigError(f"{command}: give the cache once, as --cache (got --cache {cache} and {old})")
    if cache is None and old is None:
        raise ConfigError(f"{command}: give the cache: --cache DIR_OR_URL")
    if cache is None:
        _warn(f"`fusion-cache {command} CACHE` is deprecated; use `fusion-cache {command} --cache CACHE`")
    return cache or old


CACHE_HELP = "cache directory or fsspec URL"


def _old_cache():
    """The positional cache of earlier releases: hidden, still accepted (with a warning)."""
    return typer.Argument(None, hidden=True, help="the cache (deprecated: use --cache)")


@app.command()
@common_options
def teachers() -> None:
    """List the teacher and pivot presets (any local model directory or HF id works too)."""
    from fusion_cache.models.presets import list_presets

    for p in list_presets():
        where = "packaged (offline)" if p.source == "packaged" else p.hf_id
        typer.echo(f"{p.name:<16} {p.role:<8} {where:<44} {p.description}")


@app.command()
@config_options(BuildConfig, into="settings")
def build(
    settings: dict,
    ray: bool = typer.Option(
        False, "--ray", help="run all --num-shards parts as Ray tasks (pip install ray)", metavar=""
    ),  # fmt: skip
    ray_address: str = typer.Option(None, help="Ray cluster to join (e.g. auto); default: start a local Ray"),
) -> None:
    """Run a teacher over a dataset once and write its top-K log-probs to a cache.

    The resolved settings go to <out>/config.yaml, which `build --config` replays.

    Example: fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2
    """
    from fusion_cache.capture.build import build_summary
    from fusion_cache.capture.build import run_build

    quiet_library_progress()
    cfg = BuildConfig.create(**settings)
    before = _manifest_or_none(cfg.out) if cfg.num_shards == 1 else None
    if ray:
        from fusion_cache.capture.ray import run_build_ray

        m = run_build_ray(cfg, address=ray_address)
    else:
        m = run_build(cfg)
    if before is not None and before == m.model_dump():
        # the same build was there already: nothing ran, and the numbers below would be the old build's
        typer.echo(
            f"nothing to do: {cfg.out} already holds this build (fingerprint {m.fingerprint[:16]}, built "
            f"{m.created_at} in {m.stats.wall_seconds:.1f} s); change a setting or --out to build again"
        )
        return
    typer.echo(build_summary(m, cfg.out))
    if cfg.num_shards > 1 and not ray:
        _echo_parts_status(cfg.out, cfg.num_shards)


def _manifest_or_none(out: str) -> dict | None:
    from fusion_cache.cache.manifest import load_manifest
    from fusion_cache.errors import FusionCacheError

    try:
        return load_manifest(out).model_dump()
    except FusionCacheError:
        return None


def _echo_parts_status(out: str, count: int) -> None:
    """After a part build: whether the last part has combined them all."""
    from fusion_cache.cache.manifest import load_manifest
    from fusion_cache.errors import FusionCacheError

    try:
        top = load_manifest(out)
    except FusionCacheError:
        top = None
    if top is not None and top.parts is not None and len(top.parts) == count:
        typer.echo(f"combined all {count} parts into {out}: {top.stats.rows} rows, fingerprint {top.fingerprint[:16]}")
    else:
        typer.echo(f"{out}: waiting for the other parts (the last one to finish combines them)")


@app.command()
@common_options
def combine(
    cache: str = typer.Option(None, "--cache", help="the --out of a distributed build (holds part-*-of-*/)"),
    old: str = _old_cache(),
) -> None:
    """Write the combined manifest of a distributed build's parts (the last part to finish does this too)."""
    from fusion_cache.cache.parts import combine_parts

    out = _cache_argument(cache, old, "combine")
    m = combine_parts(out)
    typer.echo(
        f"combined {len(m.parts)} parts into {out}: {m.stats.rows} rows, {len(m.shards)} shard(s), "
        f"fingerprint {m.fingerprint[:16]}"
    )


@app.command()
@common_options
def generate(
    model: str = typer.Option(..., help="the model that answers: preset name, local model dir or HF id"),
    data: str = typer.Option(..., help="rows with `prompt` (+`system`) or `messages`: JSONL/Parquet or a Hub id"),
    out: Path = typer.Option(..., help="JSONL to write: the rows with the answers, valid `build --data` input"),
    engine: Literal[ENGINE_NAMES] = typer.Option("vllm", help="teacher engine (fusion_cache/capture/engines)"),
    max_new_tokens: int = typer.Option(256, help="new tokens per answer, at most"),
    temperature: float = typer.Option(0.8, help="sampling temperature; 0 for greedy"),
    n: int = typer.Option(1, help="answers per prompt (vllm: one request with n outputs; hf: sample j uses seed + j)"),
    seed: int = typer.Option(0, help="sampling seed"),
    limit: int = typer.Option(None, help="use only the first N rows"),
    dtype: str = typer.Option(None, help="model dtype (default: from the hardware)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out", metavar=""),
    max_tokens: int = typer.Option(None, "--max-tokens", hidden=True, help="deprecated: --max-new-tokens"),
) -> None:
    """Have a model write the answers first (teacher-generated answers are the standard distillation recipe).

    Example: fusion-cache generate --model smollm2-135m --data prompts.jsonl --out responses.jsonl --n 2
    """
    from fusion_cache.capture.generate import run_generate

    if max_tokens is not None:
        _warn("--max-tokens is deprecated; use --max-new-tokens")
        max_new_tokens = max_tokens
    quiet_library_progress()
    meta = run_generate(
        model=model,
        data=data,
        out=str(out),
        engine=engine,
        max_tokens=max_new_tokens,
        temperature=temperature,
        n=n,
        seed=seed,
        limit=limit,
        dtype=dtype,
        overwrite=overwrite,
        progress=True,
    )
    typer.echo(f"wrote {out}: {meta['rows_written']} answers to {meta['data']['rows']} prompts ({out}.meta.json)")


@app.command()
@common_options
def inspect(
    cache: str = typer.Option(None, "--cache", help=CACHE_HELP),
    old: str = _old_cache(),
    as_json: bool = typer.Option(False, "--json", help="the manifest as JSON", metavar=""),
):
    """Show what a cache holds: teacher, license, K, rows, answer tokens, bytes per token, shards, meta, fingerprint."""
    from fusion_cache.cache.manifest import load_manifest

    cache = _cache_argument(cache, old, "inspect")
    m = load_manifest(cache)
    if as_json:
        typer.echo(json.dumps(m.model_dump(), indent=2))
        return
    t, s = m.teacher, m.stats
    lines = [
        ("cache", str(cache)),
        ("teacher", f"{t.name} (revision {t.revision}, {t.engine}, {t.dtype})"),
        ("license", m.license or "not recorded"),
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
        *([("meta", json.dumps(m.meta, sort_keys=True, ensure_ascii=False))] if m.meta else []),
        ("fingerprint", m.fingerprint),
    ]
    for key, value in lines:
        typer.echo(f"{key:<15} {value}")


@app.command()
@common_options
def coverage(
    cache: str = typer.Option(None, "--cache", help=CACHE_HELP),
    old: str = _old_cache(),
    student: str = typer.Option(..., help="the student (its tokenizer): preset, local dir or HF id"),
    limit: int = typer.Option(None, help="look at the first N rows only"),
    as_json: bool = typer.Option(False, "--json", help="the report as JSON", metavar=""),
) -> None:
    """How a cache serves a student of another tokenizer.

    Where the teacher's top-K mass goes through the vocabulary map (exact, prefix, special, unmapped, tail) and
    which student rows get a target.

    Example: fusion-cache coverage --cache ./cache/gemma3 --student smollm2-135m --limit 100
    """
    from fusion_cache.models.load import load_tokenizer
    from fusion_cache.train.vocab import coverage_report

    cache = _cache_argument(cache, old, "coverage")
    report = coverage_report(cache, load_tokenizer(student), limit=limit)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"teacher {report['teacher']} ({report['teacher_vocab']} tokens) onto a student of "
               f"{report['student_vocab']} tokens, {report['samples']} samples")  # fmt: skip
    typer.echo("vocabulary: " + ", ".join(f"{k} {v:.1%}" for k, v in report["map"].items()))
    typer.echo("teacher top-K mass: " + ", ".join(f"{k} {v:.1%}" for k, v in report["mass"].items()))
    r = report["rows"]
    n = max(r["student_rows"], 1)
    typer.echo(
        f"student answer rows: {r['student_rows']}; with a target at a shared boundary {r['boundary'] / n:.1%}, "
        f"inside a teacher token {r['inside_teacher_token'] / n:.1%}, none {r['no_target'] / n:.1%}"
    )


@app.command()
@common_options
def check(
    caches: list[str] = typer.Argument(None, help="teacher caches (directories or fsspec URLs), in training order"),
    cache: list[str] = typer.Option(None, "--cache", help=CACHE_HELP + " (repeat; the same as the arguments)"),
    student: str = typer.Option(..., help="the student: preset, local dir, HF id or saved adapter, as train takes it"),
    kd_loss: list[str] = typer.Option(
        None,
        "--kd-loss",
        help=f"the loss train would use ({', '.join(LOSS_CHOICES)}), one for every teacher or one "
        "per cache (repeat); default: report which losses each cache allows",
    ),  # fmt: skip
    align: Literal[ALIGN_MODES] = typer.Option(
        TrainConfig.model_fields["align"].default, help=TrainConfig.model_fields["align"].description
    ),
    max_length: int = typer.Option(
        TrainConfig.model_fields["max_length"].default, help=TrainConfig.model_fields["max_length"].description
    ),
    limit: int = typer.Option(1000, help="align the first N samples of the join (0: all of them)"),
    as_json: bool = typer.Option(False, "--json", help="the report as JSON", metavar=""),
) -> None:
    """Check a student against teacher caches before training: tokenizer and template, alignment, losses, rows.

    Loads the tokenizers and the student's config only, never weights. Exits with status 2 when the combination
    cannot train (the reason on the last line; with --json, in "problems").

    Example: fusion-cache check --student smollm2-135m ./cache/smollm2 ./cache/gemma3 --kd-loss auto
    """
    from fusion_cache.models.load import load_tokenizer
    from fusion_cache.train.check import check_caches
    from fusion_cache.train.check import check_json
    from fusion_cache.train.check import student_vocab_size

    given = list(caches or []) + list(cache or [])
    if not given:
        raise ConfigError("check: give the caches: fusion-cache check --student S CACHE [CACHE ...]")
    report = check_caches(given, load_tokenizer(student), student=student, student_vocab=student_vocab_size(student),
                          kd_loss=kd_loss or None, align=align, max_length=max_length, limit=limit or None)  # fmt: skip
    typer.echo(check_json(report) if as_json else report.table())
    if report.problems:
        raise typer.Exit(code=2)


@app.command()
@common_options
def verify(
    cache: str = typer.Option(None, "--cache", help=CACHE_HELP),
    old: str = _old_cache(),
    trusted_key: list[str] = typer.Option(
        None, "--trusted-key", help="public key (OpenSSH .pub or PEM): also require its valid signature (repeat)"
    ),
) -> None:
    """Check every shard's checksum, schema, row count, lengths and the content of every row, the manifest's
    fingerprints, and with --trusted-key a signature of one of those keys over the fingerprint."""
    from fusion_cache.cache.reader import CacheReader

    cache = _cache_argument(cache, old, "verify")
    reader = CacheReader(cache)
    problems = reader.verify(progress=True)
    signer = None
    if trusted_key:
        from fusion_cache.cache.signature import verify_signature

        try:
            signer = verify_signature(cache, trusted_key, fingerprint=reader.manifest.fingerprint)
        except FusionCacheError as e:
            problems.append(str(e))
    if problems:
        for p in problems:
            typer.secho(f"BAD {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    m = reader.manifest
    signed = f", signed by key {signer}" if signer else ""
    typer.echo(f"OK {cache}: {len(m.shards)} shard(s), {m.stats.rows} rows, fingerprint {m.fingerprint[:16]}{signed}")


TOKEN_HELP = "Hugging Face token (default: $HF_TOKEN, else the stored `hf auth login`)"


@app.command()
@common_options
def push(
    cache: str = typer.Argument(..., help="the local cache directory to publish"),
    repo: str = typer.Argument(..., help="Hub dataset repo, org/name (created if missing; org/name@BRANCH)"),
    revision: str = typer.Option(None, "--revision", help="branch to commit to (created from main); default main"),
    private: bool = typer.Option(False, "--private", help="create the repo private", metavar=""),
    message: str = typer.Option(None, "--message", help="commit message (default: teacher, K, rows, fingerprint)"),
    token: str = typer.Option(None, "--token", envvar="HF_TOKEN", show_envvar=False, help=TOKEN_HELP),
) -> None:
    """Publish a cache as a Hub dataset repo in ONE commit (shards, card, manifest last), after verifying it.

    A rerun after an interruption uploads only what the Hub does not hold yet; an unchanged cache makes no commit.

    Example: fusion-cache push ./cache/smollm2 team/smollm2-topk --private
    """
    from fusion_cache.cache.hub import push_cache

    r = push_cache(cache, repo, revision=revision, private=private, token=token, message=message, progress=True)
    what = f"commit {r.commit[:12]}" if r.committed else f"unchanged at commit {r.commit[:12]}, no new commit"
    typer.echo(f"pushed {cache} to {r.url} ({r.revision}, {what}, {r.files} files); "
               f"pull it with: fusion-cache pull {r.repo}@{r.revision} DIR")  # fmt: skip


@app.command()
@common_options
def pull(
    repo: str = typer.Argument(..., help="Hub dataset repo, org/name or org/name@REVISION"),
    out: Path = typer.Argument(..., help="local directory to create (the local copy)"),
    revision: str = typer.Option(None, "--revision", help="branch, tag or commit; default main"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a DIR that holds something else", metavar=""),
    token: str = typer.Option(None, "--token", envvar="HF_TOKEN", show_envvar=False, help=TOKEN_HELP),
) -> None:
    """Download a cache from the Hub and verify its fingerprints and every shard; a cache that does not verify is
    deleted and refused.

    Example: fusion-cache pull team/smollm2-topk ./caches/smollm2 && fusion-cache train --cache ./caches/smollm2 ...
    """
    from fusion_cache.cache.hub import pull_cache

    r = pull_cache(repo, out, revision=revision, token=token, overwrite=overwrite)
    m = r.manifest
    done = "verified" if r.downloaded else "already there"
    typer.echo(f"pulled {repo} (commit {r.commit[:12]}) into {r.directory}: {len(m.shards)} shard(s), {m.stats.rows} "
               f"rows, fingerprint {m.fingerprint[:16]}, {done}")  # fmt: skip


@app.command()
@common_options
def keygen(out: Path = typer.Option(..., help="private key file to write (mode 0600); the public key goes to OUT.pub")):
    """Make an ed25519 key pair for signing caches (needs the `sign` extra: the cryptography package).

    Example: fusion-cache keygen --out ~/.keys/team-a   (share team-a.pub; keep team-a)
    """
    from fusion_cache.cache.signature import generate_key

    private, public = generate_key(out)
    typer.echo(f"wrote {private} (private: keep it) and {public} (public: give it to whoever trusts your caches)")


@app.command()
@common_options
def sign(
    cache: str = typer.Option(None, "--cache", help=CACHE_HELP),
    old: str = _old_cache(),
    key: Path = typer.Option(..., help="private ed25519 key (PEM or OpenSSH; fusion-cache keygen)"),
) -> None:
    """Sign a cache's fingerprint (after verifying it), so that `verify --trusted-key` and `train
    --require-signature` accept it; the signature goes to <cache>/signatures.json.

    Example: fusion-cache sign --cache ./cache/smollm2 --key ~/.keys/team-a
    """
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.cache.signature import sign_cache

    cache = _cache_argument(cache, old, "sign")
    problems = CacheReader(cache).verify()  # vouch only for an intact cache
    if problems:
        more = f" (and {len(problems) - 1} more: run fusion-cache verify)" if len(problems) > 1 else ""
        typer.secho(f"not signed: {problems[0]}{more}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    entry = sign_cache(cache, key)
    typer.echo(f"signed {cache}: fingerprint {entry['fingerprint'][:16]} by key {entry['key_id']}")


# Flags that differ from the field names. train: `--cache` for caches as everywhere, `--loss-k` for the K a loss
# reads (not the K a cache holds, build's --top-k); their old spellings stay as hidden aliases for a release.
TRAIN_FLAGS = {"shards": Flag(aliases=("--shards",)), "top_k": Flag(aliases=("--top-k",))}
# merge: the shard size in MiB; fuse names the merge's seed --merge-seed beside train's --seed
MERGE_FLAGS = {"seed": Flag(aliases=("--merge-seed",)), "max_shard_bytes": Flag("--max-shard-mb", scale=1024**2,
                                                                                unit="MiB")}  # fmt: skip
FUSE_MERGE_FLAGS = {**MERGE_FLAGS, "seed": Flag("--merge-seed")}


@app.command()
@config_options(TrainConfig, into="settings", flags=TRAIN_FLAGS)
def train(
    settings: dict,
    mode: Literal[TRAIN_MODES] = typer.Option(
        "unified",
        help="unified: one run against every cache, joined on sample_id (one cache: single-teacher KD); single: the "
        f"same, refusing more than one cache; {PAIRWISE}: one run per cache into <out>/<cache-name>/ (then merge)",
    ),
) -> None:
    """Train a student by streaming teacher caches with (1-lambda)*CE + lambda*KD (each teacher its own loss).

    The resolved settings go to <out>/config.yaml (`train --config <out>/config.yaml` replays the run).

    Example: fusion-cache train --student ./student --cache ./cache/smollm2 --out ./runs/kd --lambda 0.5

    Data parallel: torchrun --nproc-per-node 2 -m fusion_cache train --student ... (the same flags).
    """
    from fusion_cache.train.trainer import run_train

    quiet_library_progress()
    caches = settings.get("cache", [])
    if mode == PAIRWISE:
        from fusion_cache.recipes.pairwise import train_pairwise

        settings = dict(settings)
        shards, out = settings.pop("cache", None), settings.pop("out", None)
        if not shards or out is None:
            raise ConfigError("train --mode pairwise: give the caches (--cache, one per teacher) and --out")
        runs = train_pairwise(shards, out, **settings)
        typer.echo(f"trained {len(runs)} pivots: " + ", ".join(str(r / "model") for r in runs))
        return
    if mode == "single" and len(caches) > 1:
        raise ConfigError(f"--mode single takes one cache, got {len(caches)}; use unified (one run against all of "
                          "them) or pairwise (one run per cache, then merge)")  # fmt: skip
    cfg = TrainConfig.create(**settings)
    result = run_train(cfg, on_check=lambda report: typer.echo(report.line()))
    f = result.summary["final"]
    if f is None or os.environ.get("RANK", "0") != "0":  # nothing left to train, or not torchrun's rank 0
        return
    typer.echo(
        f"trained {result.summary['steps']} steps in {result.summary['wall_seconds']:.0f} s: "
        f"ce {f['ce']:.4f}, kd {f['kd']:.4f}; model in {Path(cfg.out) / 'model'}"
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


@app.command()
@config_options(MergeConfig, into="settings", flags=MERGE_FLAGS)
def merge(settings: dict) -> None:
    """Merge fine-tuned pivots around their base with task vectors, one tensor at a time (docs/merge.md).

    Example: fusion-cache merge --base ./student --models runs/a --models runs/b --method ties --out ./merged
    """
    from fusion_cache.merge.run import merge_summary
    from fusion_cache.merge.run import run_merge

    quiet_library_progress()
    typer.echo(merge_summary(run_merge(MergeConfig.create(**settings))))


@app.command()
@config_options(
    MergeConfig,
    into="merge_settings",
    skip={
        "base": "the pivot, --student",
        "models": "the pivots fuse trains, <out>/runs/*",
        "overwrite": "fuse's --overwrite replaces the runs and the merged model",
    },
    flags=FUSE_MERGE_FLAGS,
    section="merge",
)
@config_options(
    TrainConfig,
    into="train_settings",
    skip={"shards": "the caches, fuse's --cache", "out": "fuse's --out (<out>/runs/<cache-name>)"},
    flags={"top_k": TRAIN_FLAGS["top_k"]},
    section="train",
)
def fuse(
    train_settings: dict,
    merge_settings: dict,
    cache: list[str] = typer.Option(
        None, "--cache", help="teacher cache directory or fsspec URL (repeat, one per teacher)"
    ),  # fmt: skip
    out: Path = typer.Option(..., help="<out>/runs/<cache-name>/ per teacher, <out>/merged/ the result"),
    mode: Literal[(PAIRWISE,)] = typer.Option(PAIRWISE, help="pairwise: train per teacher, then merge"),
    shards: list[str] = typer.Option(None, "--shards", hidden=True, help="deprecated: --cache"),
) -> None:
    """Pairwise fusion in one go: train one pivot per teacher cache, then merge them.

    In a --config file the settings of the runs go under `train:` and those of the merge under `merge:`.

    Example: fusion-cache fuse --student ./student --cache ./cache/a --cache ./cache/b --out ./fused --method ties
    """
    from fusion_cache.recipes.pairwise import fuse_pairwise

    if shards:
        _warn("--shards is deprecated; use --cache")
    caches = list(cache or []) + list(shards or [])
    if not caches:
        raise ConfigError("fuse: give the teacher caches, --cache once per teacher")
    quiet_library_progress()
    if "overwrite" in train_settings:
        merge_settings = {**merge_settings, "overwrite": train_settings["overwrite"]}
    runs, summary = fuse_pairwise(caches, out, train=train_settings, merge=merge_settings)
    typer.echo(f"trained {len(runs)} pivots in {out / 'runs'}; merged with {summary['method']} into {summary['out']}")


def demo_settings(
    quick: bool, kd_loss: list[str] | None, second_teacher: str | None, combine: list[str] | None, kd_gate: str = "none"
):
    """The `DemoSettings` of `fusion-cache demo`'s options (repeated values are kept once, in order)."""
    from dataclasses import replace

    from fusion_cache.recipes.demo import KD_NAMES
    from fusion_cache.recipes.demo import DemoSettings

    settings = DemoSettings.quick() if quick else DemoSettings()
    if kd_loss:
        bad = [k for k in kd_loss if k not in KD_NAMES]
        if bad:
            raise ConfigError(f"--kd-loss: unknown value(s) {bad}; valid values: {', '.join(KD_NAMES)}")
        settings = replace(settings, kd_losses=tuple(dict.fromkeys(kd_loss)))
    if combine and not second_teacher:
        raise ConfigError(f"--combine {combine}: unified runs need a --second-teacher")
    if second_teacher:
        extra = {"combines": tuple(dict.fromkeys(combine))} if combine else {}
        settings = replace(settings, second_teacher=second_teacher, **extra)  # DemoSettings checks the values
    return replace(settings, kd_gate=kd_gate)


@app.command()
@common_options
def report(
    runs: list[Path] = typer.Argument(..., help="`fusion-cache train` run directories (several: overlaid)"),
    out: Path = typer.Option(None, help="PNG to write (default: <run>/report.png; several runs: in their parent)"),
) -> None:
    """Plot the runs' curves, held-out results marked (PNG), and summarize them (markdown table).

    Panels: answer CE per token and per byte, the distillation terms, the total loss (runs of one objective), lr,
    grad norm.

    Example: fusion-cache report ./runs/kd ./runs/sft --out ./runs/compare.png
    """
    from fusion_cache.eval.report import write_report

    png, md, table = write_report([str(r) for r in runs], None if out is None else str(out))
    typer.echo(table)
    typer.echo(f"wrote {png} and {md}")


@app.command(name="eval")
@common_options
def eval_(
    model: str = typer.Option(..., help="model: preset, local dir, HF id, or a `train` run dir (its model/)"),
    data: str = typer.Option(None, help="input rows (JSONL/Parquet, `build --data` format) or a cache: answer CE"),
    cache: str = typer.Option(None, help="teacher cache: answer CE, teacher top-1 agreement (same tokenizer), ULD"),
    humaneval: bool = typer.Option(
        False, "--humaneval", help="HumanEval pass@1 (greedy, sandboxed execution)", metavar=""
    ),  # fmt: skip
    limit: int = typer.Option(None, help="only the first N rows / HumanEval problems"),
    max_new_tokens: int = typer.Option(384, help="HumanEval: longest completion"),
    timeout: float = typer.Option(10.0, help="HumanEval: seconds (wall) each program may run"),
    humaneval_prompt: Literal[PROMPT_STYLES] = typer.Option(
        "raw", help="HumanEval: raw (continue the prompt, the standard harness) or chat (instruct models)"
    ),
    loss_k: int = typer.Option(10, "--loss-k", help="K of the reported ULD"),
    batch_size: int = typer.Option(8, help="samples per forward pass"),
    max_length: int = typer.Option(1024, help="longest sequence in the model's tokens"),
    out: Path = typer.Option(None, help="write the results as JSON here (default for a run dir: <run>/eval.json)"),
    top_k: int = typer.Option(None, "--top-k", hidden=True, help="deprecated: --loss-k"),
) -> None:
    """Held-out answer CE (per token and per byte), teacher top-1 agreement and HumanEval pass@1 of a model.

    Example: fusion-cache eval --model ./runs/kd --data heldout.jsonl --cache ./cache/heldout --humaneval --limit 20
    """
    from fusion_cache.eval.evaluate import eval_table
    from fusion_cache.eval.evaluate import run_eval

    if top_k is not None:
        _warn("eval --top-k is deprecated; use --loss-k")
        loss_k = top_k
    quiet_library_progress()
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
        k=loss_k,
        out=None if out is None else str(out),
        progress=True,
        on_check=lambda report: typer.echo(report.line(top1=True)),
    )
    typer.echo(f"model {result['model']}")
    typer.echo(eval_table(result))
    if "written_to" in result:
        typer.echo(f"wrote {result['written_to']}")


@app.command()
@common_options
def run(
    recipe: str = typer.Argument(None, help="a recipe file (YAML), or the name of a shipped recipe (--list)"),
    out: Path = typer.Option(None, help="where every stage writes (default: the recipe's out, else ./runs/<name>)"),
    set_: list[str] = typer.Option(
        None, "--set", help="override a setting, KEY=VALUE (repeat): train.max_steps=100, teachers.0.top_k=32"
    ),
    list_: bool = typer.Option(False, "--list", help="list the shipped recipes", metavar=""),
) -> None:
    """Run a whole recipe: capture every teacher, train (unified or pairwise, then merge), evaluate.

    A rerun skips the stages already done with the same settings and continues an interrupted one (docs/recipes.md).

    Example: fusion-cache run demo --out ./demo-recipe
    """
    from fusion_cache.recipes.run import load_recipe
    from fusion_cache.recipes.run import recipe_summary
    from fusion_cache.recipes.run import run_recipe
    from fusion_cache.recipes.run import shipped_recipes

    if list_:
        for name, path in sorted(shipped_recipes().items()):
            typer.echo(f"{name:<20} {recipe_summary(path)}")
        return
    if recipe is None:
        raise ConfigError("run: give a recipe file or a shipped recipe's name (fusion-cache run --list)")
    quiet_library_progress()
    run_recipe(load_recipe(recipe, set_), out=out, say=lambda m: typer.echo(f"[run] {m}"))


@app.command()
@common_options
def demo(
    out: Path = typer.Option(Path("demo-out"), help="working directory of the demo"),
    quick: bool = typer.Option(False, help="a much smaller run (a smoke test, not a result)", metavar=""),
    kd_loss: list[str] = typer.Option(
        None,
        "--kd-loss",
        help="KD runs from the first teacher to compare with SFT (repeat): kl (default: top-K KL), uld (InfiFusion's "
        "ULD), mapped_kl, hybrid (each run adds ~4 minutes on 2 cores)",
    ),
    second_teacher: str | None = typer.Option(
        None,
        "--second-teacher",
        help="a second teacher (e.g. gemma3-270m): captures the same rows and adds KD from it alone (mapped KL) and "
        "unified fusion of both teachers (kl + mapped_kl) to the table (each run adds ~4-8 minutes on 2 cores)",
    ),
    combine: list[str] = typer.Option(
        None, "--combine", help="with --second-teacher: unified runs to add (repeat): " + ", ".join(COMBINE_MODES)
    ),
    kd_gate: Literal[KD_GATES] = typer.Option(
        "none",
        "--kd-gate",
        help="student: every KD and unified run distills a sample from a teacher only while the teacher's answer CE "
        "is below the student's (as `train --kd-gate`)",
    ),
) -> None:
    """Build a cache from the embedded SmolLM2 teacher, train a student with KD and with plain SFT, compare."""
    from fusion_cache.recipes.demo import run_demo

    settings = demo_settings(quick, kd_loss, second_teacher, combine, kd_gate)
    quiet_library_progress()
    run_demo(out, settings=settings)


if __name__ == "__main__":
    app()
