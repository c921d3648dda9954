"""Fusion quality on the testbed (`fusion_cache.recipes.testbed`, issue 17 item 4a): does fusing two teachers with
different tokenizers and complementary skills beat SFT and each teacher alone?

    PYTHONPATH=. python benchmarks/bench_fusion_quality.py --tune [--work /tmp/fc-testbed] [--jobs 2] [--lock FILE]
    PYTHONPATH=. python benchmarks/bench_fusion_quality.py        [--work /tmp/fc-testbed] [--jobs 2] [--lock FILE]
    PYTHONPATH=. python benchmarks/bench_fusion_quality.py --table

Every run starts from the testbed's student start and trains on its mixed train split through the library's one
training path (`TrainConfig`, `run_train`), reading the train caches of the teachers its arm names; the model is
scored per domain (`testbed.domain_scores`: answer CE per student token; the mixed number is the token-weighted mean
of the two domains, which is what the mixed file gives). The arms are data (`arms`): a name, the teachers, the
`TrainConfig` overrides (``kd_loss`` per teacher, ``combine``, ``lambda``) and, for pairwise fusion, a merge method
(`fusion_cache.recipes.pairwise.train_pairwise`, then `fusion_cache.merge.run.run_merge` with the student start as
base). An arm whose loss is not in `fusion_cache.train.losses.LOSSES` is skipped with a message, so the
cross-tokenizer losses (``mapped_kl``, ``hybrid``) become arms as soon as they are registered.

Settings are chosen on the validation split only. ``--tune`` runs seed 0 over a grid and records validation numbers
only: steps x lr for SFT (`TUNE_STEPS_LR`; the best is then every arm's steps and lr), then lambda for every arm
that distills (`TUNE_LAMBDAS`; for pairwise arms the lambda of both pivots, judged on the merged model). The main
mode reads those lines and gives each arm the setting of lowest validation CE.

The numerals probe (item 4c) reads the same runs: the math answers' numbers are split digit by digit for the
student (and the code teacher) but merged by the math teacher's tokenizer, so KD from the math teacher alone with
``uld``, ``mapped_kl`` or ``hybrid`` differs exactly where X-Token says rank-sorted ULD fails. Every comparison run of
SFT and of those arms adds a line with ``setting`` "numerals" whose ``heldout_answer_ce`` is the held-out answer CE
over the math answers' digit tokens (`fusion_cache.train.vocab.digit_tokens`), ``digit_tokens`` their count.

Resumable: one JSON line per finished run in benchmarks/results/fusion_quality.jsonl (``setting`` "testbed" for the
comparison, "testbed-tune" for the grid); a run already there is skipped. Every run uses one torch thread; ``--jobs
2`` runs two at a time; ``--lock FILE`` holds an flock on FILE (a shared machine's CPU lock) for each round of
``--jobs`` runs only, so other work interleaves.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fusion_quality.jsonl"
SETTING, TUNE_SETTING, NUMERALS = "testbed", "testbed-tune", "numerals"
DOMAINS = ("math", "code")
SEEDS = (0, 1, 2)
MERGES = ("ties", "rsaf", "ta", "average")
# a merge arm's name -> (merge method, its options); "average" is the plain mean of the pivots (TA at alpha 1/2), the
# control for methods built for task vectors off a strong shared base
MERGE_METHODS = {"average": ("ta", {"alpha": 0.5})}
CODE_LOSS = "kl"  # the code teacher has the student's tokenizer: the top-K KL keeps token identity
MATH_LOSSES = ("uld", "mapped_kl", "hybrid")  # the math teacher's tokenizer is not the student's
TUNE_STEPS_LR = tuple((steps, lr) for steps in (150, 300, 600, 1200) for lr in (1e-3, 3e-3, 1e-2))
TUNE_LAMBDAS = (0.25, 0.5, 0.75)
# SFT and the arms the targets compare (the single-teacher baselines, min_ce, the gated arms) then choose their own lr
# at the grid's steps, from its lr and these (min_ce at lambda 0.5 and lr 3e-3 is at the edge of stable training:
# validation 0.812 / 0.799 / 0.843 at lambda 0.25 / 0.5 / 0.75). The other arms keep the grid's lr.
TUNE_ARM_LRS = (1e-3, 2e-3)
LR_TUNED = ("sft", "kd-code-kl", "kd-math-uld", "kd-math-mapped_kl", "unified-min_ce-kl+mapped_kl",
            "unified-min_ce-kl+uld", "kd-code-kl+gate", "kd-math-mapped_kl+gate",
            "unified-mean-kl+mapped_kl+gate")  # fmt: skip
BATCH_SIZE = 16


@dataclass(frozen=True)
class Arm:
    """One row of the comparison.

    Attributes:
        name: the arm's label in the results.
        teachers: the domains whose train caches the run reads, the code teacher (the student's tokenizer) first.
        overrides: `TrainConfig` fields: ``kd_loss`` (one per teacher), ``combine``, ``lambda`` (SFT: 0).
        merge: pairwise fusion: one pivot per teacher, merged with this method.
    """

    name: str
    teachers: tuple[str, ...]
    overrides: dict = field(default_factory=dict)
    merge: str | None = None

    @property
    def losses(self) -> list[str]:
        return list(self.overrides["kd_loss"])

    @property
    def tuned(self) -> bool:
        """Whether lambda is chosen on the validation split (every arm that distills)."""
        return "lambda" not in self.overrides

    @property
    def single(self) -> bool:
        """KD from one teacher alone: the baselines fusion must beat."""
        return self.tuned and len(self.teachers) == 1


def arms() -> list[Arm]:
    """Every arm, registered losses or not (`available` keeps the ones that can run)."""
    from fusion_cache.train.weights import COMBINE_MODES

    out = [
        Arm("sft", ("code",), {"lambda": 0.0, "kd_loss": [CODE_LOSS]}),
        Arm(f"kd-code-{CODE_LOSS}", ("code",), {"kd_loss": [CODE_LOSS]}),
    ]
    out += [Arm(f"kd-math-{loss}", ("math",), {"kd_loss": [loss]}) for loss in MATH_LOSSES]
    for loss in MATH_LOSSES:
        pair = {"kd_loss": [CODE_LOSS, loss]}
        out += [Arm(f"unified-{c}-{CODE_LOSS}+{loss}", ("code", "math"), pair | {"combine": c}) for c in COMBINE_MODES]
        out += [Arm(f"pairwise-{m}-{CODE_LOSS}+{loss}", ("code", "math"), pair, merge=m) for m in MERGES]
    # the student gate (``kd_gate``): a teacher distills a sample only while it predicts the gold answer better than
    # the student does; with one teacher it is the only thing that can keep a specialist off the other domain
    gate = {"kd_gate": "student"}
    out += [
        Arm(f"kd-code-{CODE_LOSS}+gate", ("code",), {"kd_loss": [CODE_LOSS]} | gate),
        Arm("kd-math-mapped_kl+gate", ("math",), {"kd_loss": ["mapped_kl"]} | gate),
        Arm(f"unified-mean-{CODE_LOSS}+mapped_kl+gate", ("code", "math"),
            {"kd_loss": [CODE_LOSS, "mapped_kl"], "combine": "mean"} | gate),
    ]  # fmt: skip
    return out


def available(all_arms: list[Arm], say=print) -> list[Arm]:
    """The arms whose losses are all registered; says which were skipped and why."""
    from fusion_cache.train.losses import LOSSES

    keep = []
    for arm in all_arms:
        missing = [x for x in arm.losses if x not in LOSSES]
        if missing:
            say(f"[bench] {arm.name}: skipped, loss {missing} is not registered (fusion_cache.train.losses.LOSSES)")
        else:
            keep.append(arm)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# one job, in a worker process


@dataclass(frozen=True)
class Job:
    """One unit of work: one arm's run, or one pairwise pair (its pivots, then one merge per arm in ``arms``)."""

    arms: tuple[Arm, ...]
    seed: int
    setting: str  # SETTING or TUNE_SETTING
    steps: int
    lr: float
    lambda_: float

    def out_dir(self, work: Path) -> Path:
        a = self.arms[0]
        name = a.name if a.merge is None else "pairwise-" + "+".join(a.losses)
        return work / "bench" / self.setting / name / f"seed{self.seed}-s{self.steps}-lr{self.lr}-l{self.lambda_}"


def result_key(setting: str, arm: str, seed: int, steps: int, lr: float, lam: float) -> tuple:
    """What identifies a run: its arm, seed and settings (a comparison run at another choice is another run)."""
    return (setting, arm, seed, steps, lr, lam)


def line_key(line: dict) -> tuple:
    lam = line["lambda"]
    return result_key(line["setting"], line["arm"], line["seed"], line["steps"], line["lr"], lam)


def _train_settings(tb, job: Job, arm: Arm) -> dict:
    """`TrainConfig` fields of ``job`` for ``arm`` (without ``shards`` and ``out``)."""
    over = {k: v for k, v in arm.overrides.items() if k != "lambda"}
    return dict(student=str(tb.student), **{"lambda": job.lambda_}, lr=job.lr, max_steps=job.steps,
                batch_size=BATCH_SIZE, seed=job.seed, max_length=512, **over)  # fmt: skip


def _scores(model, tok, tb, split: str) -> dict:
    from fusion_cache.recipes.testbed import domain_scores
    from fusion_cache.recipes.testbed import mixed_ce

    per = domain_scores(model, tok, {d: tb.data[f"{split}-{d}"] for d in DOMAINS})
    return {
        "answer_ce": mixed_ce(per),
        "per_domain": {d: x["answer_ce"] for d, x in per.items()},
        "digits": {d: x["answer_ce_digits"] for d, x in per.items()},
    }


def run_job(job: Job, work: str, scale: str) -> list[dict]:
    """Train (and merge) as ``job`` says; score on the validation split and, in the comparison, the held-out one."""
    import torch

    from fusion_cache.recipes.testbed import build_testbed

    torch.set_num_threads(1)
    tb = build_testbed(work, scale=scale, log=lambda msg: None)  # finished already: only reads the paths
    out = job.out_dir(Path(work))
    shutil.rmtree(out, ignore_errors=True)  # a run killed half-way starts again
    try:
        return _run_pairwise(job, tb, out) if job.arms[0].merge else _run_single(job, tb, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the numbers are what is kept


def _run_single(job: Job, tb, out: Path) -> list[dict]:
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    arm = job.arms[0]
    shards = [str(tb.caches["train"][d]) for d in arm.teachers]
    cfg = TrainConfig.create(shards=shards, out=str(out), save=False, **_train_settings(tb, job, arm))
    t0 = time.perf_counter()
    res = run_train(cfg, progress=False)
    line = _line(job, arm, res.model, res.tokenizer, tb, time.perf_counter() - t0)
    line["final_step"] = res.summary.get("final")  # the last step's loss, CE, KD and each teacher's own term
    return [line]


def _run_pairwise(job: Job, tb, out: Path) -> list[dict]:
    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import run_merge
    from fusion_cache.models.load import load_student
    from fusion_cache.recipes.pairwise import train_pairwise

    arm = job.arms[0]
    shards = [str(tb.caches["train"][d]) for d in arm.teachers]
    t0 = time.perf_counter()
    runs = train_pairwise(shards, out / "runs", progress=False, **_train_settings(tb, job, arm))
    seconds = time.perf_counter() - t0
    lines = []
    for a in job.arms:
        t = time.perf_counter()
        method, options = MERGE_METHODS.get(a.merge, (a.merge, {}))
        cfg = MergeConfig.create(base=str(tb.student), models=[str(r) for r in runs], out=str(out / a.merge),
                                 method=method, threads=1, **options)  # fmt: skip
        merged = run_merge(cfg, progress=False)
        model, tok, _ = load_student(merged["out"])
        line = _line(job, a, model, tok, tb, seconds)
        line["merge_seconds"] = round(time.perf_counter() - t, 1)
        lines.append(line)
    return lines


def _line(job, arm: Arm, model, tok, tb, seconds: float, *, heldout: bool | None = None) -> dict:
    """One run's JSON line: ``job``'s setting, seed and settings (``lambda_``, ``lr``, ``steps``), ``arm``'s losses, and
    the scores; the held-out split is scored when ``heldout`` (default: in the comparison, never in the grid)."""
    val = _scores(model, tok, tb, "validation")
    line = {
        "setting": job.setting,
        "arm": arm.name,
        "seed": job.seed,
        "loss": {f"teacher-{d}": x for d, x in zip(arm.teachers, arm.losses, strict=True)},
        "combine": arm.overrides.get("combine"),
        "merge": arm.merge,
        "lambda": job.lambda_,
        "lr": job.lr,
        "steps": job.steps,
        "batch_size": BATCH_SIZE,
        "heldout_answer_ce": None,
        "heldout_answer_ce_per_domain": None,
        "validation_answer_ce": val["answer_ce"],
        "validation_answer_ce_per_domain": val["per_domain"],
        "validation_answer_ce_digits": val["digits"],
        "heldout_answer_ce_digits": None,
        "train_seconds": round(seconds, 1),
    }
    if job.setting == SETTING if heldout is None else heldout:  # the grid never looks at the held-out rows
        held = _scores(model, tok, tb, "heldout")
        line["heldout_answer_ce"], line["heldout_answer_ce_per_domain"] = held["answer_ce"], held["per_domain"]
        line["heldout_answer_ce_digits"] = held["digits"]
    return line


# ---------------------------------------------------------------------------------------------------------------
# planning: the grid, the choice, the comparison


def load_lines(path: Path = RESULTS) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _jobs(runs: list[tuple], lines: list[dict]) -> list[Job]:
    """The jobs of the ``runs`` (arm, seed, setting, steps, lr, lambda) not in ``lines`` yet; pairwise arms of the
    same losses and settings share one job (their pivots are trained once, then merged by each method)."""
    done = {line_key(x) for x in lines}
    todo = [(arm, seed, st, steps, lr, lam) for arm, seed, st, steps, lr, lam in runs
            if result_key(st, arm.name, seed, steps, lr, lam) not in done]  # fmt: skip
    jobs = [Job((arm,), *rest) for arm, *rest in todo if not arm.merge]
    groups: dict[tuple, list[Arm]] = {}
    for arm, *rest in todo:
        if arm.merge:
            groups.setdefault((tuple(arm.losses), *rest), []).append(arm)
    return jobs + [Job(tuple(group), *k[1:]) for k, group in groups.items()]


def tune_jobs(arm_list: list[Arm], lines: list[dict]) -> tuple[list[Job], bool]:
    """(the grid's jobs not run yet, whether they are its second phase: lambda, after SFT's steps x lr)."""
    sft = next(a for a in arm_list if not a.tuned)
    todo = _jobs([(sft, 0, TUNE_SETTING, s, lr, 0.0) for s, lr in TUNE_STEPS_LR], lines)
    if todo:
        return todo, False
    runs = [(a, 0, TUNE_SETTING, *point) for a in arm_list if a.tuned or a.name in LR_TUNED
            for point in arm_grid(a, lines)]  # fmt: skip
    return _jobs(runs, lines), True


def _tune_lines(lines: list[dict]) -> list[dict]:
    return [x for x in lines if x["setting"] == TUNE_SETTING]


def choose_steps_lr(lines: list[dict]) -> tuple[int, float]:
    """The SFT grid's (steps, lr) of lowest validation CE (`TUNE_STEPS_LR`): every arm's steps, and the lr of the
    arms that do not choose their own (`LR_TUNED`)."""
    grid = [x for x in _tune_lines(lines) if x["arm"] == "sft" and (x["steps"], x["lr"]) in TUNE_STEPS_LR]
    if not grid:
        raise SystemExit("no tuning lines for sft: run with --tune first")
    best = min(grid, key=lambda x: x["validation_answer_ce"])
    return best["steps"], best["lr"]


def arm_grid(arm: Arm, lines: list[dict]) -> list[tuple[int, float, float]]:
    """(steps, lr, lambda) of an arm's second grid: `choose_steps_lr`'s steps and lr, and `TUNE_ARM_LRS` for an arm of
    `LR_TUNED`; `TUNE_LAMBDAS` for an arm that distills (SFT: its lambda 0)."""
    steps, lr = choose_steps_lr(lines)
    lrs = (lr, *(x for x in TUNE_ARM_LRS if x != lr)) if arm.name in LR_TUNED else (lr,)
    lams = TUNE_LAMBDAS if arm.tuned else (arm.overrides["lambda"],)
    return [(steps, x, lam) for x in lrs for lam in lams]


def choose(arm_list: list[Arm], lines: list[dict]) -> dict[str, tuple[int, float, float]]:
    """{arm: (steps, lr, lambda)} chosen on the validation split; arms without a complete grid are left out."""
    out = {}
    for arm in arm_list:
        points = set(arm_grid(arm, lines))
        grid = [x for x in _tune_lines(lines) if x["arm"] == arm.name and (x["steps"], x["lr"], x["lambda"]) in points]
        if {(x["steps"], x["lr"], x["lambda"]) for x in grid} == points:
            best = min(grid, key=lambda x: x["validation_answer_ce"])
            out[arm.name] = (best["steps"], best["lr"], best["lambda"])
    return out


def chosen_runs(lines: list[dict], setting: str = SETTING) -> list[dict]:
    """The lines of ``setting`` run at their arm's current choice (a run at an earlier choice is kept, not shown)."""
    chosen = choose(arms(), lines)
    return [x for x in lines if x["setting"] == setting and chosen.get(x["arm"]) == (x["steps"], x["lr"], x["lambda"])]


def main_jobs(arm_list: list[Arm], lines: list[dict], seeds: tuple[int, ...]) -> list[Job]:
    chosen = choose(arm_list, lines)
    missing = [a.name for a in arm_list if a.name not in chosen]
    if missing:
        raise SystemExit(f"the grid is not complete for {missing}: run with --tune first")
    return _jobs([(a, seed, SETTING, *chosen[a.name]) for seed in seeds for a in arm_list], lines)


# ---------------------------------------------------------------------------------------------------------------
# the table


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    """Mean ± sd over the shared seeds of a - b (and n); ``*`` when n >= 3 and the mean is beyond twice the sd."""
    d = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not d:
        return "n/a"
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    mark = "*" if len(d) >= 3 and abs(statistics.mean(d)) > 2 * sd else ""
    return f"{statistics.mean(d):+.4f} ± {sd:.4f} (n={len(d)}){mark}"


def best_note(best: dict[str, str]) -> list[str]:
    """The lines under a table that name the best single-teacher arm of each column and how to read a difference."""
    if not best:
        return []
    named = ", ".join(f"{c}: {a}" for c, a in best.items())
    return [
        "",
        f"Best single-teacher arm per column (lowest mean held-out CE): {named}. Differences are paired by seed "
        "(arm minus baseline; negative is better); * marks a mean difference beyond twice its standard deviation.",
    ]


def table(lines: list[dict]) -> str:
    """The comparison as markdown: per arm the held-out answer CE (mean ± sd over seeds), the paired difference
    (same seed) against SFT and against the best single-teacher arm, overall and per domain; then the grid."""
    runs = chosen_runs(lines)
    by_arm: dict[str, list[dict]] = {}
    for x in runs:
        by_arm.setdefault(x["arm"], []).append(x)
    cols = {"all": lambda x: x["heldout_answer_ce"]} | {
        d: (lambda x, d=d: x["heldout_answer_ce_per_domain"][d]) for d in DOMAINS
    }
    per = {arm: {c: {x["seed"]: f(x) for x in xs} for c, f in cols.items()} for arm, xs in by_arm.items()}
    singles = [a for a in by_arm if a.startswith("kd-")]
    # the strongest baseline per column: the single-teacher arm of lowest mean held-out CE in that column
    best = {c: min(singles, key=lambda a: statistics.mean(per[a][c].values())) for c in cols} if singles else {}
    out = [
        "| arm | seeds | lr | lambda | held-out CE | vs SFT | vs best single | math CE | vs SFT | "
        "vs best single (math) | code CE | vs SFT | vs best single (code) | val CE | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in sorted(by_arm, key=[a.name for a in arms()].index):  # the order of `arms`, SFT first
        xs = by_arm[arm]
        cells = []
        for c in cols:
            vals = per[arm][c]
            vs_sft = paired(vals, per["sft"][c]) if "sft" in per and arm != "sft" else ""
            vs_best = paired(vals, per[best[c]][c]) if best and arm != best[c] else ""
            cells += [mean_sd(list(vals.values())), vs_sft, vs_best]
        lam = sorted({json.dumps(x["lambda"]) for x in xs})
        lr = sorted({json.dumps(x["lr"]) for x in xs})
        val = mean_sd([x["validation_answer_ce"] for x in xs])
        secs = statistics.mean(x["train_seconds"] for x in xs)
        out.append(
            f"| {arm} | {len(xs)} | {', '.join(lr)} | {', '.join(lam)} | "
            + " | ".join(cells)
            + f" | {val} | {secs:.0f} |"
        )
    out += best_note(best)
    grid = _tune_lines(lines)
    if grid:
        out += ["", "Validation grid (seed 0; the held-out split is never scored here):", ""]
        out += ["| arm | steps | lr | lambda | val CE | val math CE | val code CE |", "|---|---|---|---|---|---|---|"]
        for x in sorted(grid, key=lambda x: (x["arm"], x["steps"], x["lr"], x["lambda"])):
            pd = x["validation_answer_ce_per_domain"]
            out.append(f"| {x['arm']} | {x['steps']} | {x['lr']} | {x['lambda']} | {x['validation_answer_ce']:.4f} "
                       f"| {pd['math']:.4f} | {pd['code']:.4f} |")  # fmt: skip
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# running


def numerals_line(line: dict) -> dict | None:
    """The numerals probe's line of a comparison run (None for arms that are not SFT or the math teacher alone)."""
    if line["setting"] != SETTING or not (line["arm"] == "sft" or line["arm"].startswith("kd-math-")):
        return None
    keep = ("arm", "seed", "loss", "lambda", "lr", "steps", "batch_size", "train_seconds")
    return {"setting": NUMERALS, **{k: line[k] for k in keep}, "domain": "math",
            "heldout_answer_ce": line["heldout_answer_ce_digits"]["math"],
            "validation_answer_ce": line["validation_answer_ce_digits"]["math"]}  # fmt: skip


def numerals_table(lines: list[dict]) -> str:
    """The numerals probe as markdown: held-out digit-token CE on the math answers, per arm, paired against SFT."""
    runs = chosen_runs(lines, NUMERALS)
    by_arm: dict[str, dict[int, float]] = {}
    for x in runs:
        by_arm.setdefault(x["arm"], {})[x["seed"]] = x["heldout_answer_ce"]
    out = ["| arm | seeds | digit-token CE (math, held-out) | vs SFT |", "|---|---|---|---|"]
    for arm, vals in by_arm.items():
        vs = paired(vals, by_arm["sft"]) if "sft" in by_arm and arm != "sft" else ""
        out.append(f"| {arm} | {len(vals)} | {mean_sd(list(vals.values()))} | {vs} |")
    return "\n".join(out)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None


def _setting_label(seed: int, steps: int, lr: float, lam: float) -> str:
    return f"seed {seed} steps {steps} lr {lr} lambda {lam}"


def _say_line(line: dict) -> None:
    held = line["heldout_answer_ce"]
    label = _setting_label(line["seed"], line["steps"], line["lr"], line["lambda"])
    tail = "" if held is None else f", held-out CE {held:.4f}"
    print(f"[bench] {line['arm']} {label}: val CE {line['validation_answer_ce']:.4f}{tail}", flush=True)


def execute(jobs: list[Job], args, out: Path) -> None:
    """Run ``jobs`` in rounds of ``args.jobs`` processes, each round under the lock; append each line at once."""
    import torch

    from fusion_cache.recipes.testbed import flock_guard

    extra = {"scale": args.scale, "commit": _commit(), "torch": torch.__version__, "torch_threads": 1,
             "jobs": args.jobs}  # fmt: skip
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: one thread, no inherited state
    with flock_guard(args.lock) if args.lock else nullcontext(None) as guard:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            for i in range(0, len(jobs), args.jobs):
                batch = jobs[i : i + args.jobs]
                names = [f"{'+'.join(a.name for a in j.arms)} {_setting_label(j.seed, j.steps, j.lr, j.lambda_)}"
                         for j in batch]  # fmt: skip
                with guard(", ".join(names)) if guard else nullcontext():
                    print(f"[bench] {i + 1}-{i + len(batch)}/{len(jobs)}: {'; '.join(names)}", flush=True)
                    futures = [pool.submit(run_job, j, str(args.work), args.scale) for j in batch]
                    for fut in futures:
                        for line in fut.result():
                            probe = numerals_line(line)
                            with out.open("a") as fh:
                                fh.write(json.dumps(line | extra) + "\n")
                                if probe is not None:
                                    fh.write(json.dumps(probe | extra) + "\n")
                            _say_line(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fc-testbed"), help="the testbed's work dir")
    ap.add_argument("--scale", default="full", choices=("full", "small"), help="the testbed's scale")
    ap.add_argument("--tune", action="store_true", help="run the validation grid (seed 0) instead of the comparison")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the finished runs and exit")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of the comparison")
    ap.add_argument("--arms", nargs="+", default=None, help="only these arms (default: every registered one)")
    ap.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="runs side by side, one torch thread each")
    ap.add_argument("--lock", type=Path, default=None, help="flock this file for each round of --jobs runs")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSONL file of finished runs")
    args = ap.parse_args()
    lines = load_lines(args.results)
    if args.table:
        print(table(lines) + "\n\nNumerals probe:\n\n" + numerals_table(lines))
        return
    arm_list = available(arms())
    if args.arms:
        unknown = sorted(set(args.arms) - {a.name for a in arm_list})
        if unknown:
            raise SystemExit(f"--arms: unknown or unavailable {unknown}; available: {[a.name for a in arm_list]}")
        arm_list = [a for a in arm_list if a.name in args.arms or not a.tuned]  # SFT sets steps and lr
    from fusion_cache.recipes.testbed import build_testbed
    from fusion_cache.recipes.testbed import flock_guard

    with flock_guard(args.lock) if args.lock else nullcontext(None) as guard:
        build_testbed(args.work, scale=args.scale, guard=guard)  # a no-op once built
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if args.tune:
        while True:  # the grid's second phase needs the first one's choice
            todo, complete = tune_jobs(arm_list, lines)
            if not todo:
                break
            execute(todo, args, args.results)
            lines = load_lines(args.results)
            if complete:
                break
        print(f"[bench] chosen on validation: {choose(arm_list, lines)}")
    else:
        execute(main_jobs(arm_list, lines, tuple(args.seeds)), args, args.results)
        print(table(load_lines(args.results)))


if __name__ == "__main__":
    main()
