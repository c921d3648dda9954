"""Speed and peak memory of the ULD loss: reference vs a GOLD-style unfused ULD vs the Triton kernel vs the fused path.

Providers (all compute a loss over N rows of a V-wide vocabulary against cached teacher top-K values):

- ``gold``: what TRL GOLD's ULD does: full-vocabulary softmax, full sort, compare with the teacher's probabilities
  zero-padded to V (no top-K, no z-score). O(V log V) per row plus [N, V] temporaries.
- ``reference``: kernels/reference.py (torch.topk, O(V) per row) on given logits.
- ``triton``: kernels/uld.py on given logits (CUDA only: the CPU interpreter is a correctness tool, not a benchmark).
- ``linear_reference``: logits = hidden @ W.T, then the reference (the unfused baseline of the next one).
- ``fused_linear``: kernels/fused_linear.py from hidden [N, H] and W [V, H], chunked (Triton per chunk on CUDA,
  the reference per chunk on CPU). Pure ULD: on CUDA its gradient is sparse (K entries per row) and skips two matmuls.
- ``linear_reference_ce`` and ``fused_linear_ce``: the same two with the training objective 0.5 CE + 0.5 ULD on the
  same logits (CE makes the gradient dense, so the fused path does all three matmuls).

Modes: ``forward``, ``backward`` (backward alone, after an untimed forward) and ``full``. On CUDA the times are
triton.testing.do_bench quantiles (p50, p20, p80) and memory is torch.cuda.max_memory_allocated above the inputs; on
CPU the times are the same quantiles of ``--reps`` wall-clock runs and memory is the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before each measurement).

Every measured row is appended to benchmarks/results/uld.csv with the device, date and versions.

    python benchmarks/bench_uld.py                           # the whole grid on a GPU
    python benchmarks/bench_uld.py --providers gold,reference --n 1024 --v 32768,151936 --modes full   # CPU part
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from benchmarks.common import machine  # noqa: E402
from fusion_cache.kernels.fused_linear import fused_linear_uld_loss  # noqa: E402
from fusion_cache.kernels.reference import uld_loss_reference  # noqa: E402

CSV = RESULTS / "uld.csv"
FIELDS = [
    "date",
    "device",
    "provider",
    "mode",
    "N",
    "V",
    "H",
    "K",
    "dtype",
    "ms_p50",
    "ms_p20",
    "ms_p80",
    "peak_mem_mb",
    "torch",
    "triton",
    "fusion_cache",
    "note",
]


def gold_uld(logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """TRL GOLD-style ULD: full softmax, full sort, teacher probabilities zero-padded to V, L1 per row, mean."""
    p = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
    t = torch.zeros_like(p)
    t[:, : teacher_logprobs.shape[1]] = teacher_logprobs.float().exp()
    return (p - t).abs().sum(-1).mean()


def make_case(provider: str, n: int, v: int, h: int, k: int, dtype: torch.dtype, device: str):
    """(forward closure returning a scalar loss, list of leaf tensors that receive gradients)."""
    # drawn on the device itself: an [8192, 151936] draw on the host takes longer than the measurement
    g = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(n, k, generator=g, device=device).sort(dim=-1, descending=True).values
    teacher = torch.log_softmax(teacher, -1)
    if provider in ("gold", "reference", "triton"):
        logits = (torch.randn(n, v, generator=g, device=device) * 2).to(dtype).requires_grad_()
        if provider == "gold":
            return (lambda: gold_uld(logits, teacher)), [logits]
        if provider == "reference":
            return (lambda: uld_loss_reference(logits, teacher, k=k)), [logits]
        from fusion_cache.kernels.uld import uld_rows_triton

        return (lambda: uld_rows_triton(logits, teacher, k=k).mean()), [logits]
    hidden = torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype).requires_grad_()
    if provider == "linear_reference":
        return (lambda: uld_loss_reference(hidden @ weight.t(), teacher, k=k)), [hidden, weight]
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    if provider == "linear_reference_ce":
        # what training optimizes: (1 - lambda) CE + lambda ULD on the same logits, here lambda = 0.5

        def dense_ce():
            logits = hidden @ weight.t()
            ce = torch.nn.functional.cross_entropy(logits.float(), labels)
            return 0.5 * ce + 0.5 * uld_loss_reference(logits, teacher, k=k)

        return dense_ce, [hidden, weight]
    backend = "triton" if device == "cuda" else "torch"
    if provider == "fused_linear_ce":
        return (
            lambda: fused_linear_uld_loss(
                hidden, weight, teacher, labels=labels, k=k, backend=backend, ce_weight=0.5, uld_weight=0.5
            )[0]
        ), [hidden, weight]
    return (lambda: fused_linear_uld_loss(hidden, weight, teacher, k=k, backend=backend)[0]), [hidden, weight]


def _cpu_peak_reset() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def measure(fwd, leaves, mode: str, device: str, reps: int) -> tuple[list[float], float]:
    """([p50, p20, p80] ms, peak extra memory MB) of one mode."""

    def zero():
        for t in leaves:
            t.grad = None

    def run_full():
        zero()
        fwd().backward()

    if mode == "forward":
        fn = fwd
    elif mode == "full":
        fn = run_full
    else:  # backward alone: a fresh graph per call, timed around backward only
        fn = None

    if device == "cuda":
        import triton.testing

        if fn is None:
            loss = fwd()
            fn = lambda: loss.backward(retain_graph=True)  # noqa: E731
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=leaves, rep=200)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return list(ms), peak

    times = []
    peak_kb = 0
    for _ in range(reps):
        zero()
        gc.collect()
        if fn is None:
            loss = fwd()
            base = _cpu_peak_reset()
            t0 = time.perf_counter()
            loss.backward()
        else:
            base = _cpu_peak_reset()
            t0 = time.perf_counter()
            out = fn()
            del out
        times.append((time.perf_counter() - t0) * 1e3)
        peak_kb = max(peak_kb, _status_kb("VmHWM") - base)
        loss = None
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return [statistics.median(times), q[1], q[7]], peak_kb / 1024


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--providers",
        default="gold,reference,triton,linear_reference,fused_linear,linear_reference_ce,fused_linear_ce",
    )
    ap.add_argument("--modes", default="forward,backward,full")
    ap.add_argument("--n", default="1024,4096,8192")
    ap.add_argument("--v", default="32768,151936")
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3, help="CPU only: timed runs per point")
    ap.add_argument("--note", default="")
    ap.add_argument(
        "--csv", type=Path, default=CSV, help="where rows are appended (default benchmarks/results/uld.csv)"
    )
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    info = machine()
    try:
        import importlib.metadata as md

        triton_version = md.version("triton")
    except Exception:  # triton is optional
        triton_version = ""
    dev_name = info["gpu"] or f"{info['cpu']} ({info['cores']} cores)"
    new = not args.csv.exists()
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for n in map(int, args.n.split(",")):
            for v in map(int, args.v.split(",")):
                for provider in args.providers.split(","):
                    if provider == "triton" and device != "cuda":
                        print(f"skip triton on {device}: the interpreter is not a benchmark", flush=True)
                        continue
                    for mode in args.modes.split(","):
                        fwd, leaves = make_case(provider, n, v, args.h, args.k, dtype, device)
                        ms, peak = measure(fwd, leaves, mode, device, args.reps)
                        row = dict(
                            date=info["date"],
                            device=dev_name,
                            provider=provider,
                            mode=mode,
                            N=n,
                            V=v,
                            H=args.h,
                            K=args.k,
                            dtype=args.dtype,
                            ms_p50=f"{ms[0]:.3f}",
                            ms_p20=f"{ms[1]:.3f}",
                            ms_p80=f"{ms[2]:.3f}",
                            peak_mem_mb=f"{peak:.1f}",
                            torch=info["torch"],
                            triton=triton_version,
                            fusion_cache=info["fusion_cache"],
                            note=args.note,
                        )
                        writer.writerow(row)
                        f.flush()
                        print(f"{provider:>16} {mode:>8} N={n} V={v}: {ms[0]:9.2f} ms  peak {peak:8.1f} MB", flush=True)
                        del fwd, leaves
                        gc.collect()


if __name__ == "__main__":
    main()
