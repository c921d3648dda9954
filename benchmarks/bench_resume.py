"""Crash-safe resume on a real teacher: SIGKILL a `fusion-cache build` process mid-way, `--resume` it, and compare
with an uninterrupted build of the same settings run in the same benchmark (the baseline).

    FUSION_CACHE_HOME=... .venv/bin/python benchmarks/bench_resume.py --data prompts.jsonl \
        [--teacher smollm2-135m] [--engine vllm] [--top-k 64] [--shard-rows 10] [--limit 80] [--kill-after 4]

Reports the wall time of each process, the rows the killed build had completed, whether the resumed cache has the
baseline's fingerprint and rows, and `verify`. Appends to benchmarks/results/resume.md (+ .jsonl).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_markdown  # noqa: E402
from benchmarks.common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _build_args(a, out: Path) -> list[str]:
    args = [sys.executable, "-m", "fusion_cache", "build", "--teacher", a.teacher, "--data", a.data, "--out", str(out)]
    args += ["--engine", a.engine, "--top-k", str(a.top_k), "--shard-rows", str(a.shard_rows)]
    return args + (["--limit", str(a.limit)] if a.limit else [])


def _run(args: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return time.perf_counter() - t, p.stdout + p.stderr


def _kill_mid_way(args: list[str], work: Path, kill_after: int) -> tuple[float, int]:
    """Start the build, SIGKILL it once ``kill_after`` parts are complete. Returns (seconds, complete parts)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while len(list(work.glob("part-*.json"))) < kill_after:
        if proc.poll() is not None:
            raise SystemExit("the build finished before it could be killed: lower --kill-after or raise --limit")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return time.perf_counter() - t, len(list(work.glob("part-*.json")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--shard-rows", type=int, default=10)
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--kill-after", type=int, default=4, help="complete shards before the SIGKILL")
    a = ap.parse_args()

    from fusion_cache.cache.reader import CacheReader

    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        t_ref, _ = _run(_build_args(a, tmp / "ref"))
        t_kill, parts = _kill_mid_way(_build_args(a, tmp / "res"), tmp / "res.incomplete", a.kill_after)
        t_resume, log = _run([*_build_args(a, tmp / "res"), "--resume"])
        ref, res = CacheReader(tmp / "ref"), CacheReader(tmp / "res")
        same_rows = [r.sample_id for r in ref.iter_rows()] == [r.sample_id for r in res.iter_rows()]
        problems = res.verify()
        kept = next((line for line in log.splitlines() if "resuming" in line), "").rsplit(": ", 1)[-1]
        data = {
            **machine(),
            "load_average_1m": os.getloadavg()[0],
            "settings": vars(a),
            "rows": res.manifest.stats.rows,
            "uninterrupted_s": round(t_ref, 1),
            "killed_after_s": round(t_kill, 1),
            "complete_shards_at_kill": parts,
            "resume_s": round(t_resume, 1),
            "same_fingerprint": ref.manifest.fingerprint == res.manifest.fingerprint,
            "same_rows": same_rows,
            "verify_problems": problems,
            "fingerprint": res.manifest.fingerprint,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = data
    body = (
        f"{m['date']}, fusion-cache {m['fusion_cache']}, {m['cpu']} ({m['cores']} cores, load average "
        f"{m['load_average_1m']:.1f} at the end: a shared machine), torch {m['torch']}, vllm {m['vllm']}.\n\n"
        f"Teacher {a.teacher}, engine {a.engine}, K={a.top_k}, raw codec, {m['rows']} rows of {a.data}, "
        f"{a.shard_rows} rows per shard.\n\n"
        "| run | wall s |\n|---|---|\n"
        f"| uninterrupted build (baseline) | {m['uninterrupted_s']} |\n"
        f"| build killed with SIGKILL after {parts} complete shards | {m['killed_after_s']} |\n"
        f"| `--resume` ({kept}) | {m['resume_s']} |\n\n"
        f"Resumed cache: same fingerprint as the baseline: **{m['same_fingerprint']}**; same rows in the same order: "
        f"**{same_rows}**; `verify` problems: {problems or 'none'}. Fingerprint `{m['fingerprint'][:16]}`.\n"
    )
    print(body)
    print(append_markdown("resume", f"{a.teacher} {a.engine} K={a.top_k}, {m['date']}", body, data))


if __name__ == "__main__":
    main()
