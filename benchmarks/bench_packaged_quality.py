"""The packaged teachers on gold answers (issue 17 item 4b): does KD from smollm2-135m and gemma3-270m, alone or
fused, beat SFT when the answers are written by the data generators instead of sampled from a teacher?

    PYTHONPATH=. python benchmarks/bench_packaged_quality.py [--work /tmp/fc-packaged] [--jobs 2] [--lock FILE]
    PYTHONPATH=. python benchmarks/bench_packaged_quality.py --table

Data: the bundled demo prompts with their gold answers (`fusion_cache.recipes.demo_data.gold_rows`: HumanEval's
canonical solutions, the arithmetic templates' worked steps). The train split loses a validation split
(`VAL_PER_DOMAIN` rows per domain, the smallest sha256 of ``validation/<id>``); the held-out split is the bundled
one. Both packaged teachers capture all three (`--engine vllm` by default, K=64, `--codec raw` or `full`), under
``<work>/cache/<teacher>/<split>``. The student is smollm2-135m pruned to 24 of its 30 layers
(`fusion_cache.models.prune.make_layer_subset_student`), the same start for every run.

Arms (`ARMS`): SFT (lambda 0); KD from gemma3-270m alone with ``uld``, ``mapped_kl`` and ``hybrid``, and with
``mapped_kl`` behind the student gate (``kd_gate``); KD from smollm2-135m alone with ``kl``; unified fusion of both
with ``kd_loss`` [kl, mapped_kl] and combine ``mean`` and ``uncertainty``. Lower tiers run first. Every run goes
through the library (`TrainConfig`, `run_train`) and is scored with `fusion_cache.eval.evaluate.evaluate_rows` on
per-domain files (answer CE per student token; the overall number is the token-weighted mean of the two domains).

Settings are chosen on the validation split only: SFT's (steps, lr) over `--grid` (seed 0), then each KD arm's
lambda over `--lambdas` at those (seed 0); each arm then runs the other seeds at its choice. Every run records its
validation and its held-out numbers; the choice reads the validation numbers only, and the table shows the held-out
numbers of the chosen settings only (the seed-0 run of the choice is the grid's).

Resumable: one JSON line per finished run is appended to benchmarks/results/fusion_quality.jsonl with ``"setting":
"packaged"`` (the testbed's lines, `benchmarks/bench_fusion_quality.py`, share the file); a run already there is
skipped. Every run uses one torch thread in its own process, ``--jobs 2`` runs two side by side, and ``--lock FILE``
holds an flock on FILE (a shared machine's CPU lock) for each teacher's capture and for each round of ``--jobs``
runs, so other work interleaves. ``--hours`` stops starting rounds after that much wall time.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing
import os
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench_fusion_quality import mean_sd  # the table helpers of both fusion benchmarks, written once
from bench_fusion_quality import paired

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fusion_quality.jsonl"
SETTING = "packaged"
T1, T2 = "smollm2-135m", "gemma3-270m"  # the student's own tokenizer; another one (262k SentencePiece)
DOMAINS = ("humaneval", "arithmetic")
SPLITS = ("train", "validation", "heldout")
VAL_PER_DOMAIN = 20
SEEDS = (0, 1, 2)
GRID = ((20, 1e-4), (20, 3e-4), (20, 1e-3), (40, 3e-4))  # SFT's (steps, lr) candidates
LAMBDAS = (0.2, 0.5, 0.8)  # each KD arm's lambda candidates
STUDENT_LAYERS = 24
CACHE_K = 64
ULD_K = 10
BATCH_SIZE = 4
MAX_LENGTH = 512


@dataclass(frozen=True)
class Arm:
    """One row of the comparison.

    Attributes:
        name: the arm's label in the results.
        teachers: the presets whose train caches the run reads.
        losses: ``kd_loss`` per teacher (SFT: the loss is never used, lambda is 0).
        combine: how several teachers combine.
        tier: the arms of a lower tier run first (SFT and gemma, the issue's target, are tier 0).
        kd_gate: `TrainConfig.kd_gate` ("student": the teacher distills a row only while it beats the student there).
    """

    name: str
    teachers: tuple[str, ...]
    losses: tuple[str, ...]
    combine: str = "mean"
    tier: int = 0
    kd_gate: str = "none"

    @property
    def sft(self) -> bool:
        return self.name == "sft"

    @property
    def single(self) -> bool:
        """KD from one teacher alone: the baselines fusion must beat."""
        return not self.sft and len(self.teachers) == 1


ARMS = (
    Arm("sft", (T1,), ("kl",)),
    Arm("kd-gemma-uld", (T2,), ("uld",)),
    Arm("kd-gemma-mapped_kl", (T2,), ("mapped_kl",)),
    Arm("kd-gemma-hybrid", (T2,), ("hybrid",)),
    # the student gate: gemma distills a row only while its answer CE is below the student's (docs/fusion.md)
    Arm("kd-gemma-mapped_kl+gate", (T2,), ("mapped_kl",), kd_gate="student", tier=3),
    Arm("kd-smollm2-kl", (T1,), ("kl",), tier=1),
    Arm("unified-mean-kl+mapped_kl", (T1, T2), ("kl", "mapped_kl"), "mean", tier=2),
    Arm("unified-uncertainty-kl+mapped_kl", (T1, T2), ("kl", "mapped_kl"), "uncertainty", tier=2),
)
START = "student-start"  # the untrained student, scored once (a line with steps 0)


@dataclass(frozen=True)
class Job:
    arm: str
    seed: int
    steps: int
    lr: float
    lambda_: float

    @property
    def key(self) -> tuple:
        return (SETTING, self.arm, self.seed, self.steps, self.lr, self.lambda_)


def line_key(line: dict) -> tuple:
    return (line["setting"], line["arm"], line["seed"], line["steps"], line["lr"], line["lambda"])


# ---------------------------------------------------------------------------------------------------------------
# data, caches, student


@dataclass(frozen=True)
class Paths:
    """Where everything of ``work`` lives."""

    work: Path

    def data(self, split: str, domain: str | None = None) -> Path:
        return self.work / "data" / (f"{split}.jsonl" if domain is None else f"{split}-{domain}.jsonl")

    def cache(self, teacher: str, split: str) -> Path:
        return self.work / "cache" / teacher / split

    @property
    def student(self) -> Path:
        return self.work / f"student-init-{STUDENT_LAYERS}l"


def split_rows() -> dict[str, list[dict]]:
    """{split: gold rows}: the bundled train split minus the validation rows, the validation rows, the held-out
    split. Validation: per domain the `VAL_PER_DOMAIN` train rows whose ``validation/<id>`` has the smallest sha256
    (stable when rows are added, independent of the bundled file's own split hash)."""
    from fusion_cache.recipes.demo_data import gold_rows

    train = gold_rows("train")
    val_ids = set()
    for domain in DOMAINS:
        ids = sorted(
            (r["id"] for r in train if r["source"] == domain),
            key=lambda i: hashlib.sha256(f"validation/{i}".encode()).hexdigest(),
        )
        val_ids.update(ids[:VAL_PER_DOMAIN])
    return {
        "train": [r for r in train if r["id"] not in val_ids],
        "validation": [r for r in train if r["id"] in val_ids],
        "heldout": gold_rows("heldout"),
    }


def write_data(paths: Paths) -> dict[str, int]:
    """Write every split and, for validation and held-out, one file per domain (same bytes every time, so a
    cache's dataset hash holds). Returns {file stem: rows}."""
    counts = {}
    for split, rows in split_rows().items():
        groups = {None: rows} | (
            {d: [r for r in rows if r["source"] == d] for d in DOMAINS} if split != "train" else {}
        )
        for domain, group in groups.items():
            path = paths.data(split, domain)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in group)
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                path.write_text(text, encoding="utf-8")
            counts[path.stem] = len(group)
    return counts


@contextmanager
def cpu_lock(path: Path | None, what: str):
    """Hold an exclusive flock on ``path`` (the shared machine's CPU lock; nothing when None)."""
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        t = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        print(f"[bench] lock after {time.perf_counter() - t:.0f} s: {what}", flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_caches(paths: Paths, args) -> dict[str, float]:
    """Capture each teacher's top-K over the three splits (one lock hold per teacher; a built cache is kept).

    Returns:
        {teacher: seconds} of the captures run now.
    """
    from fusion_cache.capture.build import run_build
    from fusion_cache.capture.config import BuildConfig
    from fusion_cache.capture.engines import make_engine
    from fusion_cache.models.hardware import default_dtype
    from fusion_cache.models.presets import resolve_model

    dtype = default_dtype()
    seconds = {}
    for teacher in (T1, T2):
        cfgs = [
            BuildConfig.create(
                teacher=teacher,
                data=str(paths.data(split)),
                out=str(paths.cache(teacher, split)),
                top_k=CACHE_K,
                engine=args.engine,
                codec=args.codec,
                max_length=MAX_LENGTH,
                dtype=dtype,
                overwrite=True,
            )
            for split in SPLITS
        ]
        built = all((Path(c.out) / "manifest.json").exists() for c in cfgs)
        with cpu_lock(args.lock, f"capture {teacher}"):
            t = time.perf_counter()
            engine = None
            if not built:
                extra = {"max_model_len": 2048, "max_k": CACHE_K} if args.engine == "vllm" else {}
                engine = make_engine(args.engine, resolve_model(teacher).path, dtype=dtype, **extra)
            try:
                for cfg in cfgs:
                    # without an engine run_build is a no-op on the same build (and starts one for another build)
                    m = run_build(cfg, engine=engine, progress=False)
                    print(
                        f"[bench] {teacher} {Path(cfg.out).name}: {m.stats.rows} rows, "
                        f"{m.stats.answer_tokens} answer tokens, {m.stats.wall_seconds:.0f} s",
                        flush=True,
                    )
            finally:
                if engine is not None:
                    engine.close()
            if not built:
                seconds[teacher] = round(time.perf_counter() - t, 1)
    return seconds


# ---------------------------------------------------------------------------------------------------------------
# one run, in a worker process


def _scores(model, tok, paths: Paths, split: str) -> dict:
    """Answer CE per domain and overall (token-weighted) on ``split``'s per-domain files."""
    from fusion_cache.eval.evaluate import evaluate_rows

    per = {d: evaluate_rows(model, tok, str(paths.data(split, d)), max_length=MAX_LENGTH) for d in DOMAINS}
    tokens = sum(x["answer_tokens"] for x in per.values())
    return {
        "answer_ce": sum(x["answer_ce"] * x["answer_tokens"] for x in per.values()) / tokens,
        "per_domain": {d: x["answer_ce"] for d, x in per.items()},
        "answer_tokens": {d: x["answer_tokens"] for d, x in per.items()},
    }


def run_job(job: Job, work: str) -> dict:
    """Train as ``job`` says (or only load the start), then score on validation and held-out."""
    import torch

    from fusion_cache.models.load import load_student
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    torch.set_num_threads(1)
    paths = Paths(Path(work))
    t0 = time.perf_counter()
    extra: dict = {}
    if job.arm == START:
        model, tok, _ = load_student(str(paths.student))
        arm = None
    else:
        arm = next(a for a in ARMS if a.name == job.arm)
        out = paths.work / "runs" / f"{arm.name}-seed{job.seed}-s{job.steps}-lr{job.lr}-l{job.lambda_}"
        cfg = TrainConfig.create(
            student=str(paths.student),
            shards=[str(paths.cache(t, "train")) for t in arm.teachers],
            out=str(out),
            **{"lambda": job.lambda_},
            kd_loss=list(arm.losses),
            combine=arm.combine,
            kd_gate=arm.kd_gate,
            top_k=ULD_K,
            lr=job.lr,
            batch_size=BATCH_SIZE,
            max_steps=job.steps,
            max_length=MAX_LENGTH,
            seed=job.seed,
            save=False,
        )
        res = run_train(cfg, progress=False)
        model, tok = res.model, res.tokenizer
        extra["final_step"] = res.summary.get("final")  # the last step's loss, CE, KD and each teacher's term
    train_s = time.perf_counter() - t0
    t = time.perf_counter()
    val, held = _scores(model, tok, paths, "validation"), _scores(model, tok, paths, "heldout")
    return {
        "setting": SETTING,
        "arm": job.arm,
        "seed": job.seed,
        "loss": {}
        if arm is None
        else {t: (None if arm.sft else x) for t, x in zip(arm.teachers, arm.losses, strict=True)},
        "combine": None if arm is None or len(arm.teachers) == 1 else arm.combine,
        "lambda": job.lambda_,
        "lr": job.lr,
        "steps": job.steps,
        "batch_size": BATCH_SIZE,
        "heldout_answer_ce": held["answer_ce"],
        "heldout_answer_ce_per_domain": held["per_domain"],
        "validation_answer_ce": val["answer_ce"],
        "validation_answer_ce_per_domain": val["per_domain"],
        "answer_tokens": {"validation": val["answer_tokens"], "heldout": held["answer_tokens"]},
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - t, 1),
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# planning: the grid, the choice, the comparison


def load_lines(path: Path = RESULTS) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if x["setting"] == SETTING]


def choose(lines: list[dict], grid, lambdas) -> dict[str, tuple[int, float, float]]:
    """{arm: (steps, lr, lambda)} of lowest validation CE at seed 0 (the held-out numbers are not read); an arm
    whose candidates have not all run is left out."""
    val = {line_key(x)[1:]: x["validation_answer_ce"] for x in lines}

    def best(arm: str, cands: list[tuple]) -> tuple | None:
        if not all((arm, 0, *c) in val for c in cands):
            return None
        return min(cands, key=lambda c: val[(arm, 0, *c)])

    sft = best("sft", [(s, lr, 0.0) for s, lr in grid])
    if sft is None:
        return {}
    steps, lr, _ = sft
    out = {"sft": sft}
    for arm in ARMS:
        if not arm.sft and (c := best(arm.name, [(steps, lr, lam) for lam in lambdas])) is not None:
            out[arm.name] = c
    return out


def plan(lines: list[dict], grid, lambdas, seeds, arm_names) -> list[Job]:
    """The jobs that can run now and have not run, in priority order: SFT's grid; then per tier the lambda grids,
    then the seeds of the choices; the student start after tier 0's grids."""
    done = {line_key(x) for x in lines}
    todo: list[tuple] = []  # (priority, job)
    for s, lr in grid:
        todo.append(((-1, 0), Job("sft", 0, s, lr, 0.0)))
    chosen = choose(lines, grid, lambdas)
    if "sft" in chosen:
        steps, lr, _ = chosen["sft"]
        todo.append(((0, 1), Job(START, 0, 0, 0.0, 0.0)))
        for arm in ARMS:
            if arm.name not in arm_names:
                continue
            if not arm.sft:
                todo += [((arm.tier, 0), Job(arm.name, 0, steps, lr, lam)) for lam in lambdas]
            if arm.name in chosen:
                todo += [((arm.tier, 2), Job(arm.name, seed, *chosen[arm.name])) for seed in seeds]
    jobs = []
    for _, job in sorted(todo, key=lambda x: x[0]):  # stable: arms keep their order within a priority
        if job.key not in done and job not in jobs:
            jobs.append(job)
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# the table


def table(lines: list[dict], grid=GRID, lambdas=LAMBDAS) -> str:
    """Markdown: per arm at its chosen setting the held-out answer CE (mean ± sd over seeds), the paired difference
    (same seed) against SFT and against the best single-teacher arm, overall and per domain; then the grid."""
    chosen = choose(lines, grid, lambdas)
    runs: dict[str, list[dict]] = {}
    for x in lines:
        if x["arm"] in chosen and line_key(x)[3:] == chosen[x["arm"]]:
            runs.setdefault(x["arm"], []).append(x)
    cols = {"all": lambda x: x["heldout_answer_ce"]} | {
        d: (lambda x, d=d: x["heldout_answer_ce_per_domain"][d]) for d in DOMAINS
    }
    per = {arm: {c: {x["seed"]: f(x) for x in xs} for c, f in cols.items()} for arm, xs in runs.items()}
    singles = [a.name for a in ARMS if a.single and a.name in per]
    # the strongest baseline per column: the single-teacher arm of lowest mean held-out CE in that column
    best = {c: min(singles, key=lambda a: statistics.mean(per[a][c].values())) for c in cols} if singles else {}
    out = [
        "| arm | seeds | steps, lr, lambda | held-out CE | vs SFT | vs best single | HumanEval CE | vs SFT | "
        "vs best single | arithmetic CE | vs SFT | vs best single | val CE | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    start = [x for x in lines if x["arm"] == START]
    if start:
        x = start[0]
        cells = [f"{x['heldout_answer_ce']:.4f}", "", ""]
        for d in DOMAINS:
            cells += [f"{x['heldout_answer_ce_per_domain'][d]:.4f}", "", ""]
        out.append(f"| {START} | - | - | " + " | ".join(cells) + f" | {x['validation_answer_ce']:.4f} | 0 |")
    for arm in ARMS:
        xs = runs.get(arm.name)
        if not xs:
            out.append(f"| {arm.name} | 0 | not run | | | | | | | | | | | |")
            continue
        cells = []
        for c in cols:
            vals = per[arm.name][c]
            vs_sft = paired(vals, per["sft"][c]) if "sft" in per and not arm.sft else ""
            vs_best = paired(vals, per[best[c]][c]) if best and arm.name != best[c] else ""
            cells += [mean_sd(list(vals.values())), vs_sft, vs_best]
        steps, lr, lam = chosen[arm.name]
        val = mean_sd([x["validation_answer_ce"] for x in xs])
        secs = statistics.mean(x["train_seconds"] for x in xs)
        out.append(
            f"| {arm.name} | {len(xs)} | {steps}, {lr:g}, {lam:g} | " + " | ".join(cells) + f" | {val} | {secs:.0f} |"
        )
    named = ", ".join(f"{c}: {a}" for c, a in best.items())
    out += [
        "",
        f"Best single-teacher arm per column (lowest mean held-out CE): {named or 'none run'}. Differences are paired "
        "by seed (arm minus baseline; negative is better), mean ± sd over the shared seeds; * marks a mean beyond "
        "twice its sd with n >= 3. Anything without * is a tie.",
    ]
    grid_lines = [x for x in lines if x["seed"] == 0 and x["arm"] != START]
    if grid_lines:
        out += ["", "Validation (seed 0; the choice reads this column only):", ""]
        out += [
            "| arm | steps | lr | lambda | val CE | val HumanEval CE | val arithmetic CE | chosen |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in sorted(grid_lines, key=lambda x: ([a.name for a in ARMS].index(x["arm"]), line_key(x)[3:])):
            pd = x["validation_answer_ce_per_domain"]
            mark = "yes" if chosen.get(x["arm"]) == line_key(x)[3:] else ""
            out.append(
                f"| {x['arm']} | {x['steps']} | {x['lr']:g} | {x['lambda']:g} | "
                f"{x['validation_answer_ce']:.4f} | {pd['humaneval']:.4f} | {pd['arithmetic']:.4f} | {mark} |"
            )
    return "\n".join(out)


def teacher_table(paths: Paths, split: str = "heldout") -> str:
    """How each teacher sees the gold answers of ``split``, per domain, from its cache alone: answer NLL in bits per
    byte (comparable across tokenizers) and how often the gold token is its top-1."""
    import numpy as np

    from fusion_cache.cache.reader import CacheReader
    from fusion_cache.capture.inputs import read_conversations

    domain_of = {c.sample_id: d for d in DOMAINS for c in read_conversations(paths.data(split, d))}
    out = ["| teacher | domain | answer tokens | bits/byte | gold token is top-1 |", "|---|---|---|---|---|"]
    for teacher in (T1, T2):
        acc = {d: np.zeros(4) for d in DOMAINS}  # nll, bytes, tokens, top-1 hits
        for row in CacheReader(str(paths.cache(teacher, split))).iter_rows():
            a, n = row.answer_start, len(row.target_logprobs)
            if n == 0:
                continue
            hits = float((row.topk_ids[:, 0] == row.input_ids[a : a + n]).sum())  # row t predicts token a + t
            nbytes = float(row.token_byte_end[a + n - 1] - row.token_byte_start[a])
            acc[domain_of[row.sample_id]] += [-float(np.sum(row.target_logprobs)), nbytes, n, hits]
        for d, (nll, nbytes, tokens, hits) in acc.items():
            out.append(
                f"| {teacher} | {d} | {int(tokens)} | {nll / max(nbytes, 1) / np.log(2):.3f} | "
                f"{hits / max(tokens, 1):.3f} |"
            )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# running


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _parse_grid(items: list[str]) -> tuple[tuple[int, float], ...]:
    try:
        return tuple((int(s), float(lr)) for s, lr in (x.split(":") for x in items))
    except ValueError:
        raise SystemExit(f"--grid: expected STEPS:LR items, got {items}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fc-packaged"), help="data, caches and student start")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the finished runs and exit")
    ap.add_argument("--teachers", action="store_true", help="with --table: also how each teacher sees the answers")
    ap.add_argument("--engine", default="vllm", choices=("vllm", "hf"), help="capture engine")
    ap.add_argument("--codec", default="raw", choices=("raw", "full"), help="cache codec (both keep ids)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of the comparison")
    ap.add_argument("--arms", nargs="+", default=None, help="only these arms (SFT always runs: it sets steps, lr)")
    ap.add_argument("--grid", nargs="+", default=[f"{s}:{lr:g}" for s, lr in GRID], help="SFT's STEPS:LR candidates")
    ap.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS), help="each KD arm's lambda candidates")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="runs side by side, one torch thread each")
    ap.add_argument("--lock", type=Path, default=None, help="flock this file for each capture and round of runs")
    ap.add_argument("--hours", type=float, default=None, help="start no round after this much wall time")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSONL file of finished runs")
    args = ap.parse_args()
    grid, lambdas = _parse_grid(args.grid), tuple(args.lambdas)
    names = [a.name for a in ARMS]
    if args.arms and (unknown := sorted(set(args.arms) - set(names))):
        raise SystemExit(f"--arms: unknown {unknown}; known: {names}")
    arm_names = {"sft", *(args.arms or names)}
    paths = Paths(args.work)
    if args.table:
        print(table(load_lines(args.results), grid, lambdas))
        if args.teachers:
            print("\n" + teacher_table(paths))
        return

    import torch

    from fusion_cache.models.presets import resolve_model
    from fusion_cache.models.prune import make_layer_subset_student

    t_start = time.perf_counter()
    counts = write_data(paths)
    print(f"[bench] data: {counts}", flush=True)
    build_s = build_caches(paths, args)
    make_layer_subset_student(resolve_model(T1).path, paths.student, STUDENT_LAYERS)
    common = {
        "engine": args.engine,
        "codec": args.codec,
        "k": CACHE_K,
        "uld_k": ULD_K,
        "max_length": MAX_LENGTH,
        "student_layers": STUDENT_LAYERS,
        "commit": _commit(),
        "torch": torch.__version__,
        "torch_threads": 1,
        "jobs": args.jobs,
        "rows": counts,
        "build_seconds": build_s or None,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: one thread, no inherited state
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        while jobs := plan(load_lines(args.results), grid, lambdas, tuple(args.seeds), arm_names):
            if args.hours is not None and time.perf_counter() - t_start > args.hours * 3600:
                print(f"[bench] --hours {args.hours} reached; {len(jobs)} runnable job(s) left", flush=True)
                break
            batch = jobs[: args.jobs]
            what = "; ".join(f"{j.arm} seed {j.seed} steps {j.steps} lr {j.lr:g} lambda {j.lambda_:g}" for j in batch)
            with cpu_lock(args.lock, what):
                t = time.perf_counter()
                print(f"[bench] running {what} (load {os.getloadavg()[0]:.1f})", flush=True)
                futures = [pool.submit(run_job, j, str(args.work)) for j in batch]
                for fut in futures:
                    line = fut.result() | common | {"round_seconds": None}
                    line["round_seconds"] = round(time.perf_counter() - t, 1)
                    line["loadavg"] = os.getloadavg()
                    line["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                    with args.results.open("a") as fh:
                        fh.write(json.dumps(line) + "\n")
                    print(
                        f"[bench] {line['arm']} seed {line['seed']} lambda {line['lambda']:g}: val CE "
                        f"{line['validation_answer_ce']:.4f}, held-out CE {line['heldout_answer_ce']:.4f}, "
                        f"train {line['train_seconds']:.0f} s, eval {line['eval_seconds']:.0f} s",
                        flush=True,
                    )
    print(table(load_lines(args.results), grid, lambdas))


if __name__ == "__main__":
    main()
