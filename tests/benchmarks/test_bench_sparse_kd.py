"""The parts of benchmarks/bench_sparse_kd.py that can be wrong without crashing: the online full-KD loss (against
the dense formula and the tempered cache loss), the validation-only choice, the resume skip and the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_sparse_kd as bench  # noqa: E402

from fusion_cache.train.losses import make_loss  # noqa: E402


@pytest.mark.parametrize("t", [1.0, 0.5, 2.0])
def test_full_kd_rows_is_the_dense_tempered_kl_and_the_kl_of_a_whole_vocabulary_cache(t):
    torch.manual_seed(0)
    zt, zs = torch.randn(5, 17) * 3, torch.randn(5, 17, requires_grad=True)
    got = bench.full_kd_rows(zs, zt, t)
    p = torch.softmax(zt.double() / t, -1)
    want = t**2 * (p * (p.log() - torch.log_softmax(zs / t, -1))).sum(-1)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)  # fp32 throughout, as training runs
    # the cache loss `kl` with every token cached (log-probs at T=1, sorted) is the same distance and gradient
    lp, ids = torch.log_softmax(zt, -1).sort(-1, descending=True)
    cached = make_loss("kl", kd_temperature=t).rows(zs, {"ids": ids, "values": lp})
    torch.testing.assert_close(got, cached, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), zs)
    (g_want,) = torch.autograd.grad(want.sum(), zs)
    torch.testing.assert_close(g_got, g_want.float(), atol=1e-5, rtol=1e-5)
    assert bench.full_kd_rows(zt, zt, t).abs().max() < 1e-5  # the teacher itself: zero


def _run(arm, seed, lr, lam, val, held=1.0, ece=0.1, tail=0.2):
    return {"kind": "run", "arm": arm, "seed": seed, "lr": lr, "lambda": lam, "kd_temperature": bench.KD_TEMPERATURE,
            "steps": bench.STEPS, "validation_answer_ce": val, "validation_answer_ece": 0.1, "heldout_answer_ce": held,
            "heldout_answer_ece": ece, "heldout_tail_mass": tail}  # fmt: skip


def test_choice_reads_validation_only_and_a_rerun_skips_finished_runs():
    lo, hi = bench.LRS
    lam_a, lam_b = bench.LAMBDAS
    names = list(bench.ARM_NAMES[:-1])
    first = bench.plan([], names)
    assert [(j.arm, j.lr) for j in first] == [("ce", lo), ("ce", hi)]  # only the lr grid can run at first
    # hi wins on validation although its held-out CE is worse: the choice must not read held-out numbers
    lines = [_run("ce", 0, lo, 0.0, val=1.2, held=0.5), _run("ce", 0, hi, 0.0, val=1.1, held=2.0)]
    assert bench.choose(lines) == {"lr": hi}
    assert [(j.arm, j.lambda_) for j in bench.plan(lines, names)] == [("full_kd", lam_a), ("full_kd", lam_b)]
    lines += [_run("full_kd", 0, hi, lam_a, val=1.0, held=9.0), _run("full_kd", 0, hi, lam_b, val=1.05, held=0.1)]
    assert bench.choose(lines) == {"lr": hi, "lambda": lam_a}
    jobs = bench.plan(lines, names)
    # the seed-0 runs of the choice are the grid's (skipped); every arm at every seed otherwise, seed-major
    assert bench.Job("ce", 0, hi, 0.0) not in jobs and bench.Job("full_kd", 0, hi, lam_a) not in jobs
    assert jobs[0] == bench.Job("topk12_notail", 0, hi, lam_a)
    assert len(jobs) == len(names) * len(bench.SEEDS) - 2
    assert {j.lambda_ for j in jobs if j.arm != "ce"} == {lam_a} and {j.lambda_ for j in jobs if j.arm == "ce"} == {0}
    # a rerun with a finished job's line skips it; a line of other settings does not count
    done = lines + [_run("topk12_notail", 0, hi, lam_a, val=1.0), _run("topk12_tail", 0, lo, lam_a, val=1.0)]
    again = bench.plan(done, names)
    assert bench.Job("topk12_notail", 0, hi, lam_a) not in again and bench.Job("topk12_tail", 0, hi, lam_a) in again
    assert len(again) == len(jobs) - 1


def test_table_pairs_each_arm_with_full_kd_and_calls_small_gaps_ties():
    lr, lam = bench.LRS[0], bench.LAMBDAS[0]
    lines = [_run("ce", 0, lr, 0.0, val=1.0), _run("ce", 0, bench.LRS[1], 0.0, val=2.0)]
    lines += [_run("full_kd", 0, lr, x, val=1.0 if x == lam else 3.0) for x in bench.LAMBDAS]
    for s in (0, 1, 2):
        lines += [
            _run("ce", s, lr, 0.0, 1.0, held=1.0 + 0.01 * s),
            _run("full_kd", s, lr, lam, 1.0, held=0.90 + 0.01 * s, ece=0.05, tail=0.10),
            # far above the seed spread: worse; well inside it: a tie
            _run("topk12_notail", s, lr, lam, 1.0, held=0.95 + 0.01 * s, ece=0.15 + 0.001 * s, tail=0.01),
            _run("topk12_tail", s, lr, lam, 1.0, held=0.90 + 0.01 * s + (0.001 if s == 1 else 0), ece=0.05, tail=0.1),
        ]
    lines.append({"kind": "grad", "arm": "topk12_tail", "grad_cosine_to_full_kd": 0.987})
    caches = {"topk12": {"bytes_per_answer_token": 31.25}}
    text = bench.table(lines, caches)
    main = text.split("\n\n")[0].splitlines()  # the comparison; the validation grid follows
    rows = {r.split(" | ")[0].strip("| "): r for r in main}
    assert "0.9100 ± 0.0100" in rows["full_kd"]  # mean ± sd over the three seeds
    assert "-0.0900 ± 0.0000 lower" in rows["topk12_notail"]  # the tail mass has no better side
    assert "+0.0500 ± 0.0000 worse" in rows["topk12_notail"] and "+0.1010 ± 0.0010 worse" in rows["topk12_notail"]
    assert "+0.0003 ± 0.0006 tie" in rows["topk12_tail"] and "+0.0000 ± 0.0000 tie" in rows["topk12_tail"]
    assert "| 31.2 | 3 |" in rows["topk12_tail"]
    assert rows["topk12_tail"].endswith("| 0.987 |") and "| not run |" in rows["rs12"]
    assert f"lr {lr:g}, lambda {lam:g}" in text
    assert bench.table(lines[:2]).startswith("(the validation choice has not finished")


def test_rs_arm_is_skipped_with_a_reason_without_the_sampled_capture():
    from fusion_cache.capture.config import BuildConfig

    why = bench.rs_available()
    assert (why is None) == ("sampling" in BuildConfig.model_fields)
    assert why is None or why.startswith("rs arms skipped:")
