"""Stage-two fusion from a shared pivot on the testbed (issue 17 item 4a, in InfiFusion's own regime).

    PYTHONPATH=. python benchmarks/bench_fusion_pivot.py --tune [--work /tmp/fc-testbed] [--jobs 2] [--lock FILE]
    PYTHONPATH=. python benchmarks/bench_fusion_pivot.py        [--work /tmp/fc-testbed] [--jobs 2] [--lock FILE]
    PYTHONPATH=. python benchmarks/bench_fusion_pivot.py --table

`bench_fusion_quality` trains every arm from the testbed's barely trained student start. InfiFusion fuses into a
*pivot*, a model that already knows the task (the paper's is an instruct model), and its pairwise merges combine
small task vectors off that pivot. This bench builds that regime on the same testbed:

1. The pivot, one per seed: SFT from the student start at the optimum of `bench_fusion_quality`'s first validation
   grid (`bench_fusion_quality.choose_steps_lr`: 600 steps at lr 3e-3), saved under
   ``<work>/bench/pivot-base/seed<N>``. Its scores are the ``pivot`` arm.
2. Stage two, from the pivot of the same seed: ``sft`` (more CE on the gold answers), KD from each teacher alone
   (`SINGLES`), unified fusion (`UNIFIED`), each with its own steps and lambda chosen on the validation split
   (`STEPS` x `LAMBDAS` at `LR`, seed 0).
3. Pairwise fusion: the two single-teacher runs of the pair (`PIVOTS`, the code teacher's top-K KL and the math
   teacher's mapped KL) are the pairwise pivots; each merge method of `bench_fusion_quality.MERGES` merges them with
   the seed's pivot as base. No merge setting is tuned.

Every comparison is paired by seed: all arms of a seed share its pivot, so the seed-to-seed spread of stage one
(data order, which dominates `bench_fusion_quality`'s spread) cancels in the differences.

Resumable: one JSON line per finished run, appended to benchmarks/results/fusion_quality.jsonl with ``setting``
"testbed-pivot" (the comparison) or "testbed-pivot-tune" (the grid, validation only); a finished line is skipped,
and a saved pivot is reused. One torch thread per run, ``--jobs 2`` runs two at a time, ``--lock FILE`` holds an
flock per round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_fusion_quality as bfq  # noqa: E402

SETTING, TUNE_SETTING = "testbed-pivot", "testbed-pivot-tune"
SEEDS = (0, 1, 2, 3, 4)
LR = 1e-3  # a third of stage one's peak: stage two continues a trained model (warmup + cosine as always)
STEPS = (150, 300)  # 4 and 8 epochs of the 600-row train split at batch 16
LAMBDAS = bfq.TUNE_LAMBDAS
PIVOT = "pivot"  # the arm of the stage-one model itself
# bench_fusion_quality's weakest arms there (hybrid, uncertainty, sum) are left out
SINGLES = ("kd-code-kl", "kd-math-uld", "kd-math-mapped_kl")
UNIFIED = ("unified-min_ce-kl+mapped_kl", "unified-min_ce-kl+uld", "unified-mean-kl+mapped_kl")
PIVOTS = ("kd-code-kl", "kd-math-mapped_kl")  # pairwise: the single-teacher runs whose models are merged
PAIR = "kl+mapped_kl"


def stage2_arms() -> list[bfq.Arm]:
    """``sft`` then the single and unified arms, as `bench_fusion_quality.arms` defines them."""
    by_name = {a.name: a for a in bfq.available(bfq.arms())}
    return [by_name[n] for n in ("sft", *SINGLES, *UNIFIED) if n in by_name]


def merge_arm_names() -> list[str]:
    return [f"pairwise-{m}-{PAIR}" for m in bfq.MERGES]


# ---------------------------------------------------------------------------------------------------------------
# jobs, each in a worker process


def pivot_dir(work: Path, seed: int) -> Path:
    return Path(work) / "bench" / "pivot-base" / f"seed{seed}"


def kept_dir(work: Path, arm: str, seed: int) -> Path:
    """Where a pairwise pivot's stage-two run keeps its model (the other runs keep only their numbers)."""
    return Path(work) / "bench" / SETTING / "kept" / arm / f"seed{seed}"


@dataclass(frozen=True)
class Job:
    """``kind`` "pivot" (stage one of ``seed``), "run" (one stage-two arm) or "merge" (every merge of ``seed``)."""

    kind: str
    seed: int
    setting: str
    arm: str = PIVOT
    steps: int = 0
    lr: float = 0.0
    lambda_: float = 0.0
    keep: bool = False

    @property
    def label(self) -> str:
        return f"{self.arm} seed {self.seed} steps {self.steps} lr {self.lr} lambda {self.lambda_}"


def _tb(work: str):
    import torch

    from fusion_cache.recipes.testbed import build_testbed

    torch.set_num_threads(1)
    return build_testbed(work, scale="full", log=lambda msg: None)  # built already: only reads the paths


def ensure_pivot(tb, work: Path, seed: int, steps: int, lr: float) -> Path:
    """The seed's stage-one SFT model (trained and saved once; ``done.json`` marks a finished one)."""
    out = pivot_dir(work, seed)
    if (out / "done.json").exists():
        return out / "model"
    shutil.rmtree(out, ignore_errors=True)
    sft = next(a for a in stage2_arms() if a.name == "sft")
    t0 = time.perf_counter()
    _stage2(tb, Job(PIVOT, seed, "", PIVOT, steps, lr, 0.0), sft, tb.student, out, save=True)
    (out / "done.json").write_text(json.dumps({"steps": steps, "lr": lr, "seconds": time.perf_counter() - t0}))
    return out / "model"


def _line(job: Job, arm: bfq.Arm, model, tok, tb, seconds: float) -> dict:
    """`bench_fusion_quality._line` for this bench's settings: the comparison scores the held-out split."""
    return bfq._line(job, arm, model, tok, tb, seconds, heldout=job.setting == SETTING)


def _stage2(tb, job: Job, arm: bfq.Arm, base: Path, out: Path, save: bool):
    """Train ``arm`` from ``base`` as ``job`` says (`bench_fusion_quality`'s settings, another student)."""
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    settings = bfq._train_settings(tb, job, arm) | {"student": str(base)}
    shards = [str(tb.caches["train"][d]) for d in arm.teachers]
    return run_train(TrainConfig.create(shards=shards, out=str(out), save=save, **settings), progress=False)


def run_job(job: Job, work: str, stage1: tuple[int, float], chosen: dict) -> list[dict]:
    """Run ``job``; ``stage1`` is the pivot's (steps, lr), ``chosen`` {arm: (steps, lr, lambda)} (merge jobs)."""
    from fusion_cache.models.load import load_student

    tb, work_p = _tb(work), Path(work)
    t0 = time.perf_counter()
    base = ensure_pivot(tb, work_p, job.seed, *stage1)
    if job.kind == PIVOT:
        model, tok, _ = load_student(str(base))
        done = json.loads((base.parent / "done.json").read_text())
        j = Job(PIVOT, job.seed, job.setting, PIVOT, stage1[0], stage1[1], 0.0)
        sft = next(a for a in stage2_arms() if a.name == "sft")
        return [_line(j, bfq.Arm(PIVOT, sft.teachers, sft.overrides), model, tok, tb, done["seconds"])]
    arms = {a.name: a for a in stage2_arms()}
    if job.kind == "run":
        out = kept_dir(work_p, job.arm, job.seed) if job.keep else work_p / "bench" / job.setting / "tmp" / job.label
        shutil.rmtree(out, ignore_errors=True)
        try:
            t0 = time.perf_counter()
            res = _stage2(tb, job, arms[job.arm], base, out, save=job.keep)
            line = _line(job, arms[job.arm], res.model, res.tokenizer, tb, time.perf_counter() - t0)
            line["final_step"] = res.summary.get("final")
            if job.keep:
                done = {"steps": job.steps, "lambda": job.lambda_, "seconds": line["train_seconds"]}
                (out / "done.json").write_text(json.dumps(done))
            return [line]
        finally:
            if not job.keep:
                shutil.rmtree(out, ignore_errors=True)
    return _merges(tb, job, work_p, base, chosen)


def _merges(tb, job: Job, work: Path, base: Path, chosen: dict) -> list[dict]:
    """Every merge of the seed's two pairwise pivots (trained here first if a kept one is missing)."""
    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import run_merge
    from fusion_cache.models.load import load_student

    arms = {a.name: a for a in stage2_arms()}
    models, seconds = [], 0.0
    for name in PIVOTS:
        out = kept_dir(work, name, job.seed)
        if not (out / "done.json").exists():
            steps, lr, lam = chosen[name]
            j = Job("run", job.seed, job.setting, name, steps, lr, lam, keep=True)
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            _stage2(tb, j, arms[name], base, out, save=True)
            done = {"steps": steps, "lambda": lam, "seconds": round(time.perf_counter() - t, 1)}
            (out / "done.json").write_text(json.dumps(done))
        models.append(str(out / "model"))
        seconds += json.loads((out / "done.json").read_text()).get("seconds", 0.0)
    lines = []
    tmp = work / "bench" / job.setting / "tmp" / f"merge-seed{job.seed}"
    try:
        for merge in bfq.MERGES:
            t = time.perf_counter()
            method, options = bfq.MERGE_METHODS.get(merge, (merge, {}))
            cfg = MergeConfig.create(base=str(base), models=models, out=str(tmp / merge), method=method, threads=1,
                                     **options)  # fmt: skip
            merged = run_merge(cfg, progress=False)
            model, tok, _ = load_student(merged["out"])
            j = Job("merge", job.seed, job.setting, f"pairwise-{merge}-{PAIR}")
            pair = bfq.Arm(j.arm, ("code", "math"), {"kd_loss": [arms[n].losses[0] for n in PIVOTS]}, merge=merge)
            line = _line(j, pair, model, tok, tb, seconds)
            line["pivot_settings"] = {n: list(chosen[n]) for n in PIVOTS}
            line["merge_seconds"] = round(time.perf_counter() - t, 1)
            lines.append(line)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lines


# ---------------------------------------------------------------------------------------------------------------
# planning


def _key(line: dict) -> tuple:
    if line["setting"] == SETTING:
        return (SETTING, line["arm"], line["seed"])
    return (line["setting"], line["arm"], line["seed"], line["steps"], line["lr"], line["lambda"])


def _job_key(job: Job) -> tuple:
    if job.setting == SETTING:
        return (SETTING, job.arm, job.seed)
    return (job.setting, job.arm, job.seed, job.steps, job.lr, job.lambda_)


def grid(arm: bfq.Arm) -> list[tuple[int, float, float]]:
    """(steps, lr, lambda) of an arm's validation grid: SFT has lambda 0 only."""
    lams = (0.0,) if not arm.tuned else LAMBDAS
    return [(s, LR, lam) for s in STEPS for lam in lams]


def tune_jobs(lines: list[dict]) -> list[Job]:
    done = {_key(x) for x in lines}
    jobs = [Job("run", 0, TUNE_SETTING, a.name, *g) for a in stage2_arms() for g in grid(a)]
    return [j for j in jobs if _job_key(j) not in done]


def choose(lines: list[dict]) -> dict[str, tuple[int, float, float]]:
    """{arm: (steps, lr, lambda)} of lowest validation CE in the grid; arms with an incomplete grid are left out."""
    out = {}
    tune = [x for x in lines if x["setting"] == TUNE_SETTING]
    for arm in stage2_arms():
        points = set(grid(arm))  # lines off the grid (probes) inform the docs, never the choice
        rows = [x for x in tune if x["arm"] == arm.name and (x["steps"], x["lr"], x["lambda"]) in points]
        if {(x["steps"], x["lr"], x["lambda"]) for x in rows} == points:
            best = min(rows, key=lambda x: x["validation_answer_ce"])
            out[arm.name] = (best["steps"], best["lr"], best["lambda"])
    return out


def main_jobs(lines: list[dict], seeds: tuple[int, ...]) -> list[Job]:
    chosen = choose(lines)
    missing = [a.name for a in stage2_arms() if a.name not in chosen]
    if missing:
        raise SystemExit(f"the stage-two grid is not complete for {missing}: run with --tune first")
    done = {_key(x) for x in lines}
    jobs = [Job(PIVOT, s, SETTING) for s in seeds]
    jobs += [Job("run", s, SETTING, a.name, *chosen[a.name], keep=a.name in PIVOTS) for s in seeds
             for a in stage2_arms()]  # fmt: skip
    todo = [j for j in jobs if _job_key(j) not in done]
    for s in seeds:  # one merge job per seed writes every merge arm
        if any((SETTING, m, s) not in done for m in merge_arm_names()):
            todo.append(Job("merge", s, SETTING, merge_arm_names()[0]))
    return todo


# ---------------------------------------------------------------------------------------------------------------
# the table


def table(lines: list[dict]) -> str:
    """Held-out CE per arm (mean ± sd over seeds) and the paired differences against the pivot, stage-two SFT and the
    best single-teacher arm (per column), overall and per domain; then the validation grid."""
    runs = [x for x in lines if x["setting"] == SETTING]
    by_arm: dict[str, list[dict]] = {}
    for x in runs:
        by_arm.setdefault(x["arm"], []).append(x)
    cols = {"all": lambda x: x["heldout_answer_ce"]} | {
        d: (lambda x, d=d: x["heldout_answer_ce_per_domain"][d]) for d in bfq.DOMAINS
    }
    per = {a: {c: {x["seed"]: f(x) for x in xs} for c, f in cols.items()} for a, xs in by_arm.items()}
    singles = [a for a in by_arm if a in SINGLES]
    best = {c: min(singles, key=lambda a: statistics.mean(per[a][c].values())) for c in cols} if singles else {}
    head = "| arm | seeds | steps | lambda | held-out CE | vs pivot | vs SFT | vs best single |"
    head += " math CE | vs best single (math) | code CE | vs best single (code) |"
    out = [head, "|" + "---|" * 12]
    order = [PIVOT, "sft", *SINGLES, *UNIFIED, *merge_arm_names()]
    for arm in [a for a in order if a in by_arm]:
        xs, p = by_arm[arm], per[arm]

        def vs(other, c="all", p=p, arm=arm):
            return bfq.paired(p[c], per[other][c]) if other in per and other != arm else ""

        steps = ", ".join(sorted({str(x["steps"]) for x in xs}))
        lam = ", ".join(sorted({json.dumps(x["lambda"]) for x in xs}))
        cells = [bfq.mean_sd(list(p["all"].values())), vs(PIVOT), vs("sft"), vs(best.get("all"))]
        for d in bfq.DOMAINS:
            cells += [bfq.mean_sd(list(p[d].values())), vs(best.get(d), d)]
        out.append(f"| {arm} | {len(xs)} | {steps} | {lam} | " + " | ".join(cells) + " |")
    out += bfq.best_note(best)
    tune = [x for x in lines if x["setting"] == TUNE_SETTING]
    if tune:
        out += [
            "",
            "Validation grid (seed 0, stage two from the seed-0 pivot):",
            "",
            "| arm | steps | lr | lambda | val CE | val math CE | val code CE | on the grid |",
            "|---|---|---|---|---|---|---|---|",
        ]
        points = {a.name: set(grid(a)) for a in stage2_arms()}
        for x in sorted(tune, key=lambda x: (x["arm"], x["steps"], x["lr"], x["lambda"])):
            pd = x["validation_answer_ce_per_domain"]
            on = "yes" if (x["steps"], x["lr"], x["lambda"]) in points.get(x["arm"], ()) else "no (a probe)"
            out.append(f"| {x['arm']} | {x['steps']} | {x['lr']} | {x['lambda']} | {x['validation_answer_ce']:.4f} "
                       f"| {pd['math']:.4f} | {pd['code']:.4f} | {on} |")  # fmt: skip
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# running


def execute(jobs: list[Job], args, stage1: tuple[int, float], chosen: dict) -> None:
    """``jobs`` in rounds of ``args.jobs`` processes (each round under the lock); each line appended at once.

    Missing pivots are trained first and merges run last, each phase in its own rounds, so that no two processes
    write the same model."""
    import torch

    from fusion_cache.recipes.testbed import flock_guard

    extra = {"scale": "full", "commit": bfq._commit(), "torch": torch.__version__, "torch_threads": 1,
             "jobs": args.jobs, "stage1": {"steps": stage1[0], "lr": stage1[1]}}  # fmt: skip
    needs = sorted({j.seed for j in jobs if not (pivot_dir(args.work, j.seed) / "done.json").exists()})
    warm = [Job(PIVOT, s, "warm") for s in needs]  # trains the pivot, its line is dropped
    rounds = []
    for phase in (warm, [j for j in jobs if j.kind != "merge"], [j for j in jobs if j.kind == "merge"]):
        rounds += [phase[i : i + args.jobs] for i in range(0, len(phase), args.jobs)]  # a merge reads kept runs
    ctx = multiprocessing.get_context("spawn")
    with flock_guard(args.lock) if args.lock else nullcontext(None) as guard:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            for i, batch in enumerate(rounds):
                names = "; ".join(f"{j.kind} {j.label}" for j in batch)
                with guard(names) if guard else nullcontext():
                    print(f"[pivot] round {i + 1}/{len(rounds)}: {names}", flush=True)
                    futures = [pool.submit(run_job, j, str(args.work), stage1, chosen) for j in batch]
                    for j, fut in zip(batch, futures, strict=True):
                        for line in fut.result():
                            if j.setting == "warm":
                                continue
                            with args.results.open("a") as fh:
                                fh.write(json.dumps(line | extra) + "\n")
                            held = line["heldout_answer_ce"]
                            tail = "" if held is None else f", held-out {held:.4f}"
                            print(
                                f"[pivot] {line['arm']} seed {line['seed']} steps {line['steps']} lambda "
                                f"{line['lambda']}: val {line['validation_answer_ce']:.4f}{tail}",
                                flush=True,
                            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fc-testbed"), help="the testbed's work dir")
    ap.add_argument("--tune", action="store_true", help="run the stage-two validation grid (seed 0)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the finished runs and exit")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds of the comparison")
    ap.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="runs side by side, one torch thread each")
    ap.add_argument("--lock", type=Path, default=None, help="flock this file for each round of --jobs runs")
    ap.add_argument("--results", type=Path, default=bfq.RESULTS, help="the JSONL file of finished runs")
    args = ap.parse_args()
    lines = bfq.load_lines(args.results)
    if args.table:
        print(table(lines))
        return
    from fusion_cache.recipes.testbed import build_testbed

    build_testbed(args.work, scale="full")  # a no-op once built
    stage1 = bfq.choose_steps_lr(lines)  # the SFT optimum of bench_fusion_quality's grid
    if args.tune:
        execute(tune_jobs(lines), args, stage1, {})
        print(f"[pivot] chosen on validation: {choose(bfq.load_lines(args.results))}")
        return
    execute(main_jobs(lines, tuple(args.seeds)), args, stage1, choose(lines))
    print(table(bfq.load_lines(args.results)))


if __name__ == "__main__":
    main()
