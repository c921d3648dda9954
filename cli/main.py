"""The `fusion-cache` command line: thin wrappers that validate settings and call the library.

fusion-cache teachers
fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2 [--resume]
fusion-cache build ... --out ./cache/smollm2 --num-shards 4 --shard-index 0   (one of 4 parts; then `combine`)
fusion-cache combine ./cache/smollm2
fusion-cache generate --model smollm2-135m --data prompts.jsonl --out responses.jsonl [--n 2] [--temperature 0.8]
fusion-cache inspect ./cache/smollm2
fusion-cache verify ./cache/smollm2 [--trusted-key team.pub]
fusion-cache keygen --out ~/.keys/team && fusion-cache sign ./cache/smollm2 --key ~/.keys/team
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

from fusion_cache.capture.config import BuildConfig
from fusion_cache.capture.engines import ENGINE_NAMES
from fusion_cache.cli.options import Flag
from fusion_cache.cli.options import config_options
from fusion_cache.errors import ConfigError
from fusion_cache.errors import FusionCacheError
from fusion_cache.merge.config import MergeConfig
from fusion_cache.train.config import TrainConfig

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
@config_options(BuildConfig, into="settings")
def build(
    settings: dict,
    ray: bool = typer.Option(False, "--ray", help="run all --num-shards parts as Ray tasks (pip install ray)"),
    ray_address: str = typer.Option(None, help="Ray cluster to join (e.g. auto); default: start a local Ray"),
) -> None:
    """Run a teacher over a dataset once and write its top-K log-probs to a cache.

    Example: fusion-cache build --teacher smollm2-135m --data prompts.jsonl --out ./cache/smollm2
    """
    from fusion_cache.capture.build import build_summary
    from fusion_cache.capture.build import run_build

    try:
        cfg = BuildConfig.create(**settings)
        if ray:
            from fusion_cache.capture.ray import run_build_ray

            m = run_build_ray(cfg, address=ray_address)
        else:
            m = run_build(cfg)
    except FusionCacheError as e:
        _fail(e)
    typer.echo(build_summary(m, cfg.out))
    if cfg.num_shards > 1 and not ray:
        _echo_parts_status(cfg.out, cfg.num_shards)


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
    engine: str = typer.Option(
        "vllm", metavar="[" + "|".join(ENGINE_NAMES) + "]", help="teacher engine (fusion_cache/capture/engines)"
    ),
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
def coverage(
    cache: str = typer.Argument(..., help="cache directory or fsspec URL"),
    student: str = typer.Option(..., help="the student (its tokenizer): preset, local dir or HF id"),
    limit: int = typer.Option(None, help="look at the first N rows only"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """How a cache serves a student of another tokenizer: where the teacher's top-K mass goes through the
    vocabulary map (exact, prefix, special, unmapped, tail) and which student rows get a target.

    Example: fusion-cache coverage ./cache/gemma3 --student smollm2-135m --limit 100
    """
    from fusion_cache.models.load import load_tokenizer
    from fusion_cache.train.vocab import coverage_report

    try:
        report = coverage_report(cache, load_tokenizer(student), limit=limit)
    except FusionCacheError as e:
        _fail(e)
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
def verify(
    cache: str = typer.Argument(..., help="cache directory or fsspec URL"),
    trusted_key: list[str] = typer.Option(
        None, "--trusted-key", help="public key (OpenSSH .pub or PEM): also require its valid signature (repeat)"
    ),
) -> None:
    """Check every shard's checksum, schema, row count, lengths and the content of every row, the manifest's
    fingerprints, and with --trusted-key a signature of one of those keys over the fingerprint."""
    from fusion_cache.cache.reader import CacheReader

    try:
        reader = CacheReader(cache)
        problems = reader.verify()
        signer = None
        if trusted_key:
            from fusion_cache.cache.signature import verify_signature

            try:
                signer = verify_signature(cache, trusted_key, fingerprint=reader.manifest.fingerprint)
            except FusionCacheError as e:
                problems.append(str(e))
    except FusionCacheError as e:
        _fail(e)
    if problems:
        for p in problems:
            typer.secho(f"BAD {p}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1)
    m = reader.manifest
    signed = f", signed by key {signer}" if signer else ""
    typer.echo(f"OK {cache}: {len(m.shards)} shard(s), {m.stats.rows} rows, fingerprint {m.fingerprint[:16]}{signed}")


@app.command()
def keygen(out: Path = typer.Option(..., help="private key file to write (mode 0600); the public key goes to OUT.pub")):
    """Make an ed25519 key pair for signing caches (needs the `sign` extra: the cryptography package).

    Example: fusion-cache keygen --out ~/.keys/team-a   (share team-a.pub; keep team-a)
    """
    from fusion_cache.cache.signature import generate_key

    try:
        private, public = generate_key(out)
    except FusionCacheError as e:
        _fail(e)
    typer.echo(f"wrote {private} (private: keep it) and {public} (public: give it to whoever trusts your caches)")


@app.command()
def sign(
    cache: str = typer.Argument(..., help="cache directory or fsspec URL"),
    key: Path = typer.Option(..., help="private ed25519 key (PEM or OpenSSH; fusion-cache keygen)"),
) -> None:
    """Sign a cache's fingerprint (after verifying it), so that `verify --trusted-key` and `train
    --require-signature` accept it; the signature goes to <cache>/signatures.json.

    Example: fusion-cache sign ./cache/smollm2 --key ~/.keys/team-a
    """
    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.cache.signature import sign_cache

    try:
        problems = CacheReader(cache).verify()  # vouch only for an intact cache
        if problems:
            more = f" (and {len(problems) - 1} more: run fusion-cache verify)" if len(problems) > 1 else ""
            _fail(ValueError(f"not signed: {problems[0]}{more}"))
        entry = sign_cache(cache, key)
    except FusionCacheError as e:
        _fail(e)
    typer.echo(f"signed {cache}: fingerprint {entry['fingerprint'][:16]} by key {entry['key_id']}")


# `train --mode`: one run against every cache (S >= 1 teachers), the same with exactly one cache, or the pairwise
# recipe (one run per cache, then merge).
PAIRWISE = "pairwise"
TRAIN_MODES = ("unified", "single", PAIRWISE)
# Merge flags that differ from the field names: a seed beside train's --seed, a shard size in MiB.
MERGE_FLAGS = {"seed": Flag("--merge-seed"), "max_shard_bytes": Flag("--max-shard-mb", scale=1024**2, unit="MiB")}


@app.command()
@config_options(TrainConfig, into="settings")
def train(
    settings: dict,
    mode: str = typer.Option(
        "unified",
        metavar="[" + "|".join(TRAIN_MODES) + "]",
        help="unified: one run against every cache, joined on sample_id (one cache: single-teacher KD); single: the "
        f"same, refusing more than one cache; {PAIRWISE}: one run per cache into <out>/<cache-name>/ (then merge)",
    ),
) -> None:
    """Train a student by streaming teacher caches with (1-lambda)*CE + lambda*KD (each teacher its own loss).

    Example: fusion-cache train --student ./student --shards ./cache/smollm2 --out ./runs/kd --lambda 0.5

    Data parallel: torchrun --nproc-per-node 2 -m fusion_cache train --student ... (the same flags).
    """
    from fusion_cache.train.trainer import run_train

    if mode not in TRAIN_MODES:
        _fail(ValueError(f"--mode: unknown value {mode!r}; valid values: {', '.join(TRAIN_MODES)}"))
    if mode == PAIRWISE:
        from fusion_cache.recipes.pairwise import train_pairwise

        shards, out = settings.pop("shards"), settings.pop("out")
        try:
            runs = train_pairwise(shards, out, **settings)
        except FusionCacheError as e:
            _fail(e)
        typer.echo(f"trained {len(runs)} pivots: " + ", ".join(str(r / "model") for r in runs))
        return
    if mode == "single" and len(settings["shards"]) > 1:
        _fail(ValueError(f"--mode single takes one cache, got {len(settings['shards'])}; use unified (one run "
                         "against all of them) or pairwise (one run per cache, then merge)"))  # fmt: skip
    try:
        cfg = TrainConfig.create(**settings)
        result = run_train(cfg)
    except FusionCacheError as e:
        _fail(e)
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

    try:
        summary = run_merge(MergeConfig.create(**settings))
    except FusionCacheError as e:
        _fail(e)
    typer.echo(merge_summary(summary))


@app.command()
@config_options(
    MergeConfig,
    into="merge_settings",
    skip={"base": "the pivot, --student", "models": "the pivots fuse trains, <out>/runs/*"},
    flags=MERGE_FLAGS,
)
@config_options(TrainConfig, into="train_settings")
def fuse(
    train_settings: dict,
    merge_settings: dict,
    shards: list[str] = typer.Option(..., help="teacher cache directory or fsspec URL (repeat, one per teacher)"),
    out: Path = typer.Option(..., help="<out>/runs/<cache-name>/ per teacher, <out>/merged/ the result"),
    mode: str = typer.Option(PAIRWISE, metavar=f"[{PAIRWISE}]", help="pairwise: train per teacher, then merge"),
) -> None:
    """Pairwise fusion in one go: train one pivot per teacher cache, then merge them.

    Example: fusion-cache fuse --student ./student --shards ./cache/a --shards ./cache/b --out ./fused --method ties
    """
    from fusion_cache.recipes.pairwise import fuse_pairwise

    if mode != PAIRWISE:
        _fail(ValueError(f"--mode: unknown value {mode!r}; valid values: {PAIRWISE}"))
    try:
        runs, summary = fuse_pairwise(shards, out, train=train_settings, merge=merge_settings)
    except FusionCacheError as e:
        _fail(e)
    typer.echo(f"trained {len(runs)} pivots in {out / 'runs'}; merged with {summary['method']} into {summary['out']}")


def demo_settings(quick: bool, kd_loss: list[str] | None, second_teacher: str | None, combine: list[str] | None):
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
