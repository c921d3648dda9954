"""Held-out quality of pairwise pivots and of each merge method, on the demo setup.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_merge_quality.py [--steps 20] [--work /tmp/merge-quality]

Only one real teacher exists today, so the two "pairwise" pivots are two KD runs on the same teacher cache
(`fusion-cache demo`'s train cache) from the same 6-layer student start, with the same recipe and different data
seeds: with 20 steps x 4 rows each run sees a different random 80 of the 160 rows. Each pivot and each merge of the
two (TA, TIES, DARE, SCE, RSAF with their defaults, plus plain averaging = TA alpha 0.5) is evaluated on the
held-out cache with `fusion_cache.eval.evaluate.evaluate_model`. Writes docs/results.md (and appends to
benchmarks/results/merge_quality.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_markdown  # noqa: E402
from common import machine  # noqa: E402
from common import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Earlier single-teacher experiment: pairwise pivots and merge methods (6-layer student)"
MERGES = [
    ("TA (alpha 0.3, default)", {"method": "ta"}),
    ("TA (alpha 0.5 = mean)", {"method": "ta", "alpha": 0.5}),
    ("TIES (density 0.6)", {"method": "ties"}),
    ("DARE (p 0.9, alpha 0.3)", {"method": "dare"}),
    ("SCE (select 0.1)", {"method": "sce"}),
    ("RSAF (density 0.6)", {"method": "rsaf"}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-cache", default="/tmp/me/demo2/cache/train")
    ap.add_argument("--heldout-cache", default="/tmp/me/demo2/cache/heldout")
    ap.add_argument("--student", default="/tmp/me/demo2/student-init-6l")
    ap.add_argument("--work", type=Path, default=Path("/tmp/merge-quality"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lambda", dest="lambda_", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()

    from fusion_cache.eval.evaluate import evaluate_model
    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import run_merge
    from fusion_cache.models.load import load_student
    from fusion_cache.train.config import TrainConfig
    from fusion_cache.train.trainer import run_train

    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def evaluate(name: str, path: str) -> None:
        t = time.perf_counter()
        model, tok, _ = load_student(path)
        results[name] = evaluate_model(model, tok, args.heldout_cache, k=10, max_length=512)
        timings[f"eval {name}"] = time.perf_counter() - t
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    evaluate("student (start)", args.student)
    runs = []
    for seed in args.seeds:
        run = args.work / "runs" / f"seed{seed}"
        t = time.perf_counter()
        cfg = TrainConfig.create(
            student=args.student,
            shards=[args.train_cache],
            out=str(run),
            **{"lambda": args.lambda_},
            top_k=10,
            lr=args.lr,
            batch_size=args.batch_size,
            max_steps=args.steps,
            max_length=512,
            seed=seed,
        )
        run_train(cfg, progress=False)
        timings[f"train seed {seed}"] = time.perf_counter() - t
        runs.append(run)
        evaluate(f"pivot seed {seed}", str(run / "model"))
    for name, opts in MERGES:
        out = args.work / "merged" / (name.split(" ")[0].lower() + ("-mean" if "mean" in name else ""))
        t = time.perf_counter()
        summary = run_merge(
            MergeConfig.create(base=args.student, models=[str(r) for r in runs], out=str(out), overwrite=True, **opts),
            progress=False,
        )
        timings[f"merge {name}"] = time.perf_counter() - t
        evaluate(f"merge: {name}", summary["out"])
    timings["total"] = time.perf_counter() - t_all

    m = machine()
    lines = [
        f"Held-out metrics on the demo setup ({m['date']}; {m['cpu']}, {m['cores']} cores shared with other jobs; "
        f"torch {m['torch']}, fusion-cache {m['fusion_cache']}).",
        "",
        f"Teacher smollm2-135m, train cache `{args.train_cache}` (160 rows), held-out cache `{args.heldout_cache}` "
        f"(40 rows). Pivots: the 6-layer student `{args.student}` trained {args.steps} steps x {args.batch_size} "
        f"rows, lr {args.lr}, lambda {args.lambda_}, ULD K=10, seeds {args.seeds[0]} and {args.seeds[1]} (each sees "
        "a different random subset of the cache). Merges use the base = the student start.",
        "",
        "| model | answer CE (lower is better) | teacher top-1 agreement | ULD to teacher |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        agree = "n/a" if r["top1_agreement"] is None else f"{r['top1_agreement']:.4f}"
        lines.append(f"| {name} | {r['answer_ce']:.4f} | {agree} | {r['uld']:.4f} |")
    lines += [
        "",
        f"Wall time {timings['total']:.0f} s. Command: `PYTHONPATH=. python benchmarks/bench_merge_quality.py "
        f"--steps {args.steps}`.",
    ]
    body = "\n".join(lines)
    print(body)
    replace_section(args.out, SECTION, body)  # the two-teacher section (bench_fusion_results.py) is kept
    append_markdown(
        "merge_quality",
        f"{m['date']} merge quality",
        body,
        {"machine": m, "args": {k: str(v) for k, v in vars(args).items()}, "results": results, "timings": timings},
    )


if __name__ == "__main__":
    main()
