"""The parts of benchmarks/bench_fusion_pivot.py that can be wrong without crashing: the validation-only choice, the
resume skip, which runs keep their models for the merges, and the paired table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import bench_fusion_pivot as bench  # noqa: E402


def _line(setting, arm, seed, steps, lam, val, held=None):
    return {"setting": setting, "arm": arm, "seed": seed, "steps": steps, "lr": bench.LR, "lambda": lam,
            "validation_answer_ce": val, "heldout_answer_ce": held,
            "validation_answer_ce_per_domain": {"math": val, "code": val},
            "heldout_answer_ce_per_domain": None if held is None else {"math": held, "code": held}}  # fmt: skip


def _full_grid(best: dict[str, tuple[int, float]]) -> list[dict]:
    """A complete seed-0 grid whose lowest validation CE per arm is at ``best[arm]`` (steps, lambda)."""
    lines = []
    for arm in bench.stage2_arms():
        for steps, _, lam in bench.grid(arm):
            val = 0.5 if (steps, lam) == best.get(arm.name, (bench.STEPS[0], bench.grid(arm)[0][2])) else 0.9
            lines.append(_line(bench.TUNE_SETTING, arm.name, 0, steps, lam, val))
    return lines


def test_choice_reads_the_validation_grid_only_and_needs_every_point():
    lines = _full_grid({"unified-min_ce-kl+mapped_kl": (300, 0.75), "sft": (300, 0.0)})
    # a held-out line that would win if the choice looked at it
    lines.append(_line(bench.SETTING, "unified-min_ce-kl+mapped_kl", 0, 150, 0.25, 0.0, held=0.0))
    chosen = bench.choose(lines)
    assert chosen["unified-min_ce-kl+mapped_kl"] == (300, bench.LR, 0.75)
    assert chosen["sft"] == (300, bench.LR, 0.0)
    assert {lam for _, _, lam in bench.grid(next(a for a in bench.stage2_arms() if a.name == "sft"))} == {0.0}
    incomplete = [x for x in lines if not (x["arm"] == "kd-code-kl" and x["steps"] == 300)]
    assert "kd-code-kl" not in bench.choose(incomplete)
    with pytest.raises(SystemExit, match="kd-code-kl"):
        bench.main_jobs(incomplete, (0,))


def test_main_jobs_skip_finished_runs_keep_the_pairwise_pivots_and_merge_once_per_seed():
    lines = _full_grid({})
    jobs = bench.main_jobs(lines, (0, 1))
    runs = [j for j in jobs if j.kind == "run"]
    assert len(runs) == 2 * len(bench.stage2_arms())
    assert {j.arm for j in runs if j.keep} == set(bench.PIVOTS)
    assert sorted(j.seed for j in jobs if j.kind == "pivot") == [0, 1]
    assert sorted(j.seed for j in jobs if j.kind == "merge") == [0, 1]
    assert all(j.setting == bench.SETTING for j in jobs)
    # seed 0 finished: its pivot, every run and every merge line are there
    lines += [_line(bench.SETTING, bench.PIVOT, 0, 600, 0.0, 0.8, 0.8)]
    lines += [_line(bench.SETTING, a.name, 0, 150, 0.5, 0.8, 0.8) for a in bench.stage2_arms()]
    lines += [_line(bench.SETTING, m, 0, 0, 0.0, 0.8, 0.8) for m in bench.merge_arm_names()[:-1]]
    left = bench.main_jobs(lines, (0, 1))
    assert {(j.kind, j.seed) for j in left if j.seed == 0} == {("merge", 0)}  # one merge arm of seed 0 is missing


def test_table_pairs_by_seed_and_marks_only_gaps_beyond_twice_the_spread():
    lines = []
    for seed, (pivot, fused, single) in enumerate([(0.90, 0.80, 0.85), (0.95, 0.84, 0.90), (0.85, 0.76, 0.80)]):
        lines += [_line(bench.SETTING, bench.PIVOT, seed, 600, 0.0, 1, pivot),
                  _line(bench.SETTING, "sft", seed, 150, 0.0, 1, pivot + 0.01 * (seed - 1)),
                  _line(bench.SETTING, "kd-code-kl", seed, 150, 0.5, 1, single),
                  _line(bench.SETTING, "unified-min_ce-kl+mapped_kl", seed, 150, 0.5, 1, fused)]  # fmt: skip
    text = bench.table(lines)
    row = next(r for r in text.splitlines() if r.startswith("| unified-min_ce-kl+mapped_kl "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5].startswith("-0.1000") and cells[5].endswith("*")  # vs pivot: -0.10, -0.11, -0.09
    assert cells[7].startswith("-0.0500") and cells[7].endswith("*")  # vs the best single arm
    sft = [c.strip() for c in next(r for r in text.splitlines() if r.startswith("| sft ")).strip("|").split("|")]
    assert sft[5].startswith("+0.0000") and not sft[5].endswith("*")  # vs pivot -0.01, 0, +0.01: a tie
