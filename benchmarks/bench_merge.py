"""Merge throughput and peak memory: fusion-cache's streaming merge vs a naive whole-state-dict merge, one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_merge.py [--teacher DIR] [--work /tmp/bench-merge]

Models have SmolLM2-135M's shape: the real embedded teacher (bf16 as packaged, and an fp32 copy, the dtype
`fusion-cache train` writes) is the base, and the "fine-tuned" models are copies of it with every tensor moved by
N(0, 1e-3^2), written into --work. Each merge runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own;
an idle worker's RSS (python + torch imported) is reported too. Throughput is bytes read (base + models) per second
of the merge itself (interpreter start and imports excluded); inputs are read once before each merge so they sit in
the page cache, so this measures the merge, not the disk. The naive baseline loads every state dict whole with
safetensors.torch.load_file, merges tensor by tensor with the same method functions, and saves with save_file.
Appends to benchmarks/results/merge.md.

With ``--baseline-src DIR`` (a directory holding another version's ``fusion_cache`` package, e.g. from
``git archive <rev> fusion_cache | tar -x -C DIR``), every streaming merge is also run with that version right
after, in the same load: a before/after comparison within one run. ``--repeat N`` runs every row N times,
reversing the order of the providers each time (on a shared machine one run per row is noisy, and whichever runs
first after a large merge exits pays more page faults).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
THREADS = 0  # torch threads in the workers (0: torch's default); set from --threads
DEFAULT_TEACHER = "/work/main/.fusion-cache/models/smollm2-135m-b179c9523d0e"


# ---------------------------------------------------------------- worker (runs in a subprocess)
def _naive_merge(base: str, models: list[str], out: str, method: str) -> int:
    import torch
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import merge_tensor
    from fusion_cache.merge.run import model_change_rates

    opts = MergeConfig.create(base=base, models=models, out=out, method=method).method_options()
    b_sd = load_file(f"{base}/model.safetensors")
    m_sds = [load_file(f"{m}/model.safetensors") for m in models]
    rate_refs = None
    if method == "rsaf":
        from fusion_cache.merge.io import SafetensorsModel

        rate_refs = model_change_rates(SafetensorsModel(base), [SafetensorsModel(m) for m in models], list(b_sd))
    merged = {}
    for n, b in b_sd.items():
        b32 = b.float()
        tau = torch.stack([sd[n].float() - b32 for sd in m_sds])
        merged[n] = (b32 + merge_tensor(method, tau, b32, n, opts, rate_refs)).to(b.dtype)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(merged, f"{out}/model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in b_sd.values()) * (1 + len(models))


def worker(args) -> None:
    import torch  # imported before the clock and the idle RSS reading

    if args.threads:
        torch.set_num_threads(args.threads)

    from fusion_cache.merge.config import MergeConfig
    from fusion_cache.merge.run import run_merge

    idle = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shutil.rmtree(args.out, ignore_errors=True)
    cpu = time.process_time()
    t = time.perf_counter()
    if args.worker == "naive":
        nbytes = _naive_merge(args.base, args.models, args.out, args.method)
    elif args.worker == "idle":
        nbytes = 0
    else:
        cfg = MergeConfig.create(base=args.base, models=args.models, out=args.out, method=args.method)
        nbytes = run_merge(cfg, progress=False)["bytes_read"]
    seconds = time.perf_counter() - t
    cpu = time.process_time() - cpu  # this process's CPU time: what the merge costs when it has a core to itself
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"seconds": seconds, "cpu_seconds": cpu, "bytes_read": nbytes, "peak_rss_kb": peak, "idle_rss_kb": idle}
        )
    )


# ---------------------------------------------------------------- driver
def make_models(teacher: Path, work: Path, dtype_name: str, n: int) -> tuple[Path, list[Path]]:
    """Base (the teacher in ``dtype_name``) and ``n`` perturbed copies, written once into ``work``."""
    import torch
    from safetensors.torch import load_file
    from safetensors.torch import save_file

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    base = work / f"base-{dtype_name}"
    copies = [work / f"ft{i}-{dtype_name}" for i in range(n)]
    if all((p / "model.safetensors").is_file() for p in [base, *copies]):
        return base, copies
    sd = load_file(str(teacher / "model.safetensors"))
    for i, p in enumerate([base, *copies]):
        shutil.copytree(teacher, p, ignore=shutil.ignore_patterns("*.safetensors", ".*"), dirs_exist_ok=True)
        g = torch.Generator().manual_seed(i)
        out = {}
        for name, t in sd.items():
            t = t.float()
            if i:  # copies move by N(0, 1e-3^2): the scale of a short fine-tune
                t = t + 1e-3 * torch.randn(t.shape, generator=g)
            out[name] = t.to(dtype)
        save_file(out, str(p / "model.safetensors"), metadata={"format": "pt"})
    return base, copies


def warm_page_cache(dirs: list[Path]) -> None:
    """Read every input file once, so each timed merge finds its inputs in the page cache (the first row of a
    dtype would otherwise also time the disk)."""
    buf = bytearray(16 << 20)
    for d in dirs:
        with open(d / "model.safetensors", "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run_worker(kind: str, base: Path, models: list[Path], method: str, out: Path, src: Path = ROOT) -> dict:
    """One merge in a fresh interpreter; ``src``: the directory whose ``fusion_cache`` package it imports."""
    cmd = [sys.executable, __file__, "--worker", kind, "--method", method, "--base", str(base), "--out", str(out)]
    cmd += ["--threads", str(THREADS), "--models", *map(str, models)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def medians_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per (method, models, dtype, provider), the median of the repeated rows."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["models"], r["dtype"], r["provider"]), []).append(r)
    lines = [
        "",
        "Medians of the repeats:",
        "",
        "| method | models | dtype | provider | runs | seconds | MB/s read | CPU s | MB/s per CPU s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, models, dtype, provider), rs in groups.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds", "peak_rss_mb")}
        mb = rs[0]["mb_read"]  # the same for every repeat
        lines.append(
            f"| {method} | {models} | {dtype} | {provider} | {len(rs)} | {med['seconds']:.2f} | "
            f"{mb / med['seconds']:.1f} | {med['cpu_seconds']:.2f} | {mb / med['cpu_seconds']:.1f} | "
            f"{med['peak_rss_mb']:.0f} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path(DEFAULT_TEACHER))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-merge"))
    ap.add_argument("--worker", choices=["streaming", "naive", "idle"], help=argparse.SUPPRESS)
    ap.add_argument("--method", default="ta", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--methods", nargs="*", default=["ta", "ties", "dare", "sce", "rsaf"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per merge (0: torch's default)")
    ap.add_argument("--baseline-src", type=Path, help="also run each streaming merge with the fusion_cache in DIR")
    ap.add_argument("--repeat", type=int, default=1, help="run each row N times, alternating the order of providers")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    if args.worker:
        worker(args)
        return

    from common import append_markdown
    from common import machine

    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "out"
    rows = []
    idle = run_worker("idle", args.teacher, [args.teacher], "ta", out)
    load_before = os.getloadavg()
    # (dtype, number of models, method, provider): TA over sizes and counts, every method at 3 x 135M bf16
    grid = [("bf16", 2, "ta"), ("bf16", 3, "ta"), ("fp32", 3, "ta")]
    grid += [("bf16", 3, m) for m in args.methods if m != "ta"]
    for dtype, n, method in grid:
        base, copies = make_models(args.teacher, args.work, dtype, 3)
        kinds = [("streaming", ROOT)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
        kinds += [("naive", ROOT)] if method in ("ta", "ties") else []
        runs = [k for rep in range(args.repeat) for k in (kinds if rep % 2 == 0 else kinds[::-1])]
        for kind, src in runs:  # repeats alternate the order: no version always runs first after another's exit
            warm_page_cache([base, *copies[:n]])
            load = os.getloadavg()[0]
            r = run_worker("streaming" if kind == "baseline" else kind, base, copies[:n], method, out, src)
            row = {
                "dtype": dtype,
                "models": n,
                "method": method,
                "provider": kind,
                "model_mb": round((base / "model.safetensors").stat().st_size / 1e6, 1),
                "seconds": round(r["seconds"], 2),
                "mb_read": round(r["bytes_read"] / 1e6, 1),
                "mb_per_s": round(r["bytes_read"] / 1e6 / r["seconds"], 1),
                "cpu_seconds": round(r["cpu_seconds"], 2),
                "mb_per_cpu_s": round(r["bytes_read"] / 1e6 / r["cpu_seconds"], 1),
                "peak_rss_mb": round(r["peak_rss_kb"] / 1024, 0),
                "load_1min": round(load, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    m = machine()
    lines = [
        f"SmolLM2-135M-shaped models (134.5M parameters; the real teacher + perturbed copies); machine: {m['cpu']}, "
        f"{m['cores']} cores, torch threads {args.threads or 'default'}; torch {m['torch']}, "
        f"fusion-cache {m['fusion_cache']}. Load average "
        f"{load_before[0]:.1f} before / {load_after[0]:.1f} after (the cores were shared with other jobs).",
        f"Idle worker (python + torch imported): {idle['idle_rss_kb'] / 1024:.0f} MB RSS. Throughput = bytes read "
        "(base + models) / merge seconds (wall clock), inputs in the page cache. CPU s = the worker's own CPU time "
        "during the merge; MB/s per CPU s is the throughput it would have with a core to itself. Load = 1-minute "
        "load average when the row started.",
        "",
        "| method | models | dtype (model MB) | provider | seconds | MB/s read | CPU s | MB/s per CPU s | peak RSS MB "
        "| load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['models']} | {r['dtype']} ({r['model_mb']}) | {r['provider']} | {r['seconds']} | "
            f"{r['mb_per_s']} | {r['cpu_seconds']} | {r['mb_per_cpu_s']} | {r['peak_rss_mb']:.0f} | "
            f"{r['load_1min']} |"
        )
    if args.repeat > 1:
        lines += medians_table(rows)
    if args.baseline_src:
        lines += ["", f"baseline = the streaming merge of the `fusion_cache` in {args.baseline_src}, run right after."]
    command = f"PYTHONPATH=. python benchmarks/bench_merge.py --threads {args.threads}"
    command += f" --baseline-src {args.baseline_src}" if args.baseline_src else ""
    command += f" --repeat {args.repeat}" if args.repeat != 1 else ""
    lines += ["", f"Command: `{command}`"]
    body = "\n".join(lines)
    print(body)
    append_markdown("merge", f"{m['date']} merge throughput and peak RSS", body, {"machine": m, "rows": rows})


if __name__ == "__main__":
    main()
