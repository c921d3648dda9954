"""RSAF's per-tensor statistics against an extended-precision reference (a check, not a timing).

    PYTHONPATH=. python benchmarks/check_rsaf_stats.py [--work /tmp/bench-merge] [--dtype bf16]

On the benchmark's models (bench_merge.py writes them into --work), for every floating tensor and fine-tuned model,
compute RSAF's kept count ``max(1, round(k * numel))`` three ways:
- ``streaming``: what `fusion-cache merge --method rsaf` uses: `run.model_stats` (float64 power sums of
  |theta_s - theta_o|, rates from float64 sums of squares);
- ``previous``: the implementation before (rate from torch's fp32 `norm`, skewness by two float64 passes);
- ``reference``: numpy long double (80-bit on x86) sums of the same fp32 task vector, two-pass skewness.
and report how far each is from the reference (relative error of rate, skewness and k; kept counts that differ).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from fusion_cache.merge import methods
from fusion_cache.merge.io import SafetensorsModel
from fusion_cache.merge.run import check_compatible
from fusion_cache.merge.run import model_stats


def reference_stats(tau: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """(||tau|| / ||base||, skewness(|tau|)) in long double, two-pass skewness."""
    x = np.abs(tau).astype(np.longdouble)
    b = base.astype(np.longdouble)
    rate = float(np.sqrt(np.sum(x * x) / np.sum(b * b))) if np.any(b) else 0.0
    mu = np.sum(x) / x.size
    d = x - mu
    m2 = np.sum(d * d) / x.size
    skew = float(np.sum(d * d * d) / x.size / m2**1.5) if m2 > 0 else 0.0
    return rate, skew


def _rel(x: float, ref: float) -> float:
    """|x - ref| / |ref|; 0 when both are 0 (a task vector of zeros: bf16 norm weights that moved < 1 ulp)."""
    return 0.0 if x == ref else abs(x - ref) / abs(ref) if ref else math.inf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-merge"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--models", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = SafetensorsModel(args.work / f"base-{args.dtype}")
    models = [SafetensorsModel(args.work / f"ft{i}-{args.dtype}") for i in range(args.models)]
    names = [n for n in check_compatible(base, models) if base.infos[n].dtype in ("F32", "BF16", "F16", "F64")]
    refs, stats = model_stats(base, models, names)
    worst = {"streaming": [0.0, 0.0, 0.0, 0], "previous": [0.0, 0.0, 0.0, 0]}  # rate, skew, k rel. err; counts
    pairs = 0
    for n in names:
        b = base.tensor(n).float()
        for s, m in enumerate(models):
            tau = m.tensor(n).float() - b
            numel = tau.numel()
            r_rate, r_skew = reference_stats(tau.numpy().reshape(-1), b.numpy().reshape(-1))
            st = stats[n]
            s1, s2, s3 = st.sums[s]
            ways = {
                "streaming": (
                    (s2 / st.base_sq) ** 0.5,
                    methods.skew_from_sums(numel, s1, s2, s3) or methods._skewness_two_pass(tau.abs()),
                ),
                "previous": (float(tau.norm()) / float(b.norm()), methods._skewness_two_pass(tau.abs())),
            }
            k_ref = methods.rsaf_density(r_rate, r_skew, rate_ref=refs[s])
            for way, (rate, skew) in ways.items():
                k = methods.rsaf_density(rate, skew, rate_ref=refs[s])
                w = worst[way]
                w[0] = max(w[0], _rel(rate, r_rate))
                w[1] = max(w[1], _rel(skew, r_skew))
                w[2] = max(w[2], _rel(k, k_ref))
                w[3] += max(1, round(k * numel)) != max(1, round(k_ref * numel))
            pairs += 1
    out = {
        "dtype": args.dtype,
        "tensor_model_pairs": pairs,
        **{
            way: {
                "max_rel_err_rate": w[0],
                "max_rel_err_skew": w[1],
                "max_rel_err_k": w[2],
                "kept_counts_differing_from_reference": w[3],
            }
            for way, w in worst.items()
        },
    }
    print(json.dumps(out, indent=2))
    assert math.isfinite(out["streaming"]["max_rel_err_k"])


if __name__ == "__main__":
    main()
