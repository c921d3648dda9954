"""The parts of benchmarks/bench_fusion_quality.py that can be wrong without crashing: the validation-only choice of
each arm's lr and lambda, the resume skip, and a table that shows only the runs at the current choice."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import bench_fusion_quality as bench  # noqa: E402

ARMS = bench.available(bench.arms(), say=lambda msg: None)


def _line(setting, arm, seed, steps, lr, lam, val, held=None):
    per = None if held is None else {"math": held, "code": held}
    return {"setting": setting, "arm": arm, "seed": seed, "steps": steps, "lr": lr, "lambda": lam,
            "validation_answer_ce": val, "validation_answer_ce_per_domain": {"math": val, "code": val},
            "heldout_answer_ce": held, "heldout_answer_ce_per_domain": per, "train_seconds": 1.0}  # fmt: skip


def _grid(best: dict[str, tuple[float, float]]) -> list[dict]:
    """A complete seed-0 grid: SFT best at (600, 3e-3); each distilling arm best at ``best[arm]`` (lr, lambda)."""
    lines = [_line(bench.TUNE_SETTING, "sft", 0, s, lr, 0.0, 0.5 if (s, lr) == (600, 3e-3) else 0.9)
             for s, lr in bench.TUNE_STEPS_LR]  # fmt: skip
    for arm in ARMS:
        for steps, lr, lam in bench.arm_grid(arm, lines):
            if (arm.name, steps, lr) != ("sft", 600, 3e-3):  # the first grid has it
                val = 0.4 if (lr, lam) == best.get(arm.name, (3e-3, 0.25 if arm.tuned else 0.0)) else 0.9
                lines.append(_line(bench.TUNE_SETTING, arm.name, 0, steps, lr, lam, val))
    return lines


def test_each_lr_tuned_arm_chooses_its_own_lr_on_validation_and_the_others_keep_sfts():
    lines = _grid({"unified-min_ce-kl+mapped_kl": (1e-3, 0.75), "unified-mean-kl+mapped_kl": (1e-3, 0.75)})
    lines.append(_line(bench.SETTING, "kd-code-kl", 0, 600, 2e-3, 0.5, 0.0, held=0.0))  # held-out never chooses
    chosen = bench.choose(ARMS, lines)
    assert chosen["sft"] == (600, 3e-3, 0.0)
    assert bench.choose(ARMS, _grid({"sft": (2e-3, 0.0)}))["sft"] == (600, 2e-3, 0.0)  # SFT chooses its lr too
    # ... but the lr of the arms that do not choose their own stays the first grid's
    assert bench.choose(ARMS, _grid({"sft": (2e-3, 0.0)}))["unified-sum-kl+mapped_kl"] == (600, 3e-3, 0.25)
    assert chosen["unified-min_ce-kl+mapped_kl"] == (600, 1e-3, 0.75)
    assert chosen["kd-code-kl"] == (600, 3e-3, 0.25)
    # not in LR_TUNED: its grid has SFT's lr only, so the line at 1e-3 does not exist and cannot be chosen
    assert chosen["unified-mean-kl+mapped_kl"] == (600, 3e-3, 0.25)
    incomplete = [x for x in lines if not (x["arm"] == "kd-math-uld" and x["lr"] == 1e-3 and x["lambda"] == 0.5)]
    assert "kd-math-uld" not in bench.choose(ARMS, incomplete)
    todo, second_phase = bench.tune_jobs(ARMS, incomplete)
    assert second_phase and [(j.arms[0].name, j.lr, j.lambda_) for j in todo] == [("kd-math-uld", 1e-3, 0.5)]


def test_a_run_at_an_earlier_choice_is_kept_but_neither_skipped_nor_shown():
    lines = _grid({"unified-min_ce-kl+mapped_kl": (1e-3, 0.75)})
    old = _line(bench.SETTING, "unified-min_ce-kl+mapped_kl", 0, 600, 3e-3, 0.5, 0.1, held=0.1234)
    lines += [old, _line(bench.SETTING, "sft", 0, 600, 3e-3, 0.0, 0.5, held=0.9)]
    arm = next(a for a in ARMS if a.name == "unified-min_ce-kl+mapped_kl")
    jobs = bench.main_jobs([a for a in ARMS if a.name in ("sft", arm.name)], lines, (0,))
    assert [(j.arms[0].name, j.lr, j.lambda_) for j in jobs] == [(arm.name, 1e-3, 0.75)]  # SFT's seed 0 is done
    assert bench.chosen_runs(lines) == [lines[-1]]
    lines.append(_line(bench.SETTING, arm.name, 0, 600, 1e-3, 0.75, 0.3, held=0.8))
    text = bench.table(lines)
    row = next(r for r in text.splitlines() if r.startswith(f"| {arm.name} "))
    assert "0.8000 ±" in row and "0.1234" not in row
