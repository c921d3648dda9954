"""`fusion_cache.eval.report` on real training runs: the PNG decodes (not blank) and the table matches the metrics."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from fusion_cache.errors import ConfigError
from fusion_cache.eval.report import load_run
from fusion_cache.eval.report import metric_stats
from fusion_cache.eval.report import objective
from fusion_cache.eval.report import write_report
from fusion_cache.train.config import TrainConfig
from fusion_cache.train.trainer import run_train


def _train(tmp, student, shards, name, **kw):
    base = dict(student=str(student), shards=[str(s) for s in shards], out=str(tmp / name), batch_size=2, lr=3e-3,
                max_steps=4, top_k=8, save=False)  # fmt: skip
    run_train(TrainConfig.create(**{**base, **kw}), progress=False)
    return tmp / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, built_cache):
    """Two real single-teacher runs of the tiny model: KD (lambda 0.5) and SFT (lambda 0)."""
    tmp = tmp_path_factory.mktemp("runs")
    return [_train(tmp, tiny_model_dir, [built_cache], n, **{"lambda": lam}) for n, lam in (("kd", 0.5), ("sft", 0.0))]


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _decoded(png):
    img = np.asarray(Image.open(png).convert("RGB"))
    return img


def _table_row(table: str, run: str, metric: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [run, metric]:
            return cells[2:]
    raise AssertionError(f"no row for {run}/{metric} in\n{table}")


def test_one_run_png_and_table_match_the_metrics(runs):
    png, md, table = write_report([runs[0]])
    assert png == runs[0] / "report.png" and md == runs[0] / "report.md" and md.read_text().endswith(table + "\n")
    img = _decoded(png)
    assert img.shape[0] >= 600 and img.shape[1] >= 900  # 12 x 8 in at 110 dpi
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50 and img.std() > 10  # curves, text, not a blank canvas
    recs = _records(runs[0])
    for metric in ("ce", "ce_per_byte", "kd", "uld_tiny-qwen2", "loss", "lr", "grad_norm"):
        first, last, min_cell = _table_row(table, "kd", metric)
        values = [r[metric] for r in recs]
        assert float(first) == pytest.approx(values[0], rel=1e-3)
        assert float(last) == pytest.approx(values[-1], rel=1e-3, abs=1e-4)
        m = re.match(r"(\S+) \((\d+)\)", min_cell)
        assert float(m.group(1)) == pytest.approx(min(values), rel=1e-3, abs=1e-4)
        assert int(m.group(2)) == recs[int(np.argmin(values))]["step"]
    overview = next(line for line in table.splitlines() if line.startswith("| kd |"))
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert f"| {recs[-1]['step']} | {recs[-1]['answer_tokens']} | {summary['wall_seconds']:.1f} s |" in overview
    assert "| 1 teacher | 0.5 |" in overview


def test_several_runs_overlay_and_held_out_numbers(runs, tmp_path):
    held_out = {"cache": {"answer_ce": 1.25, "top1_agreement": 0.5, "uld": 0.1},
                "humaneval": {"pass@1": 0.25, "passed": 1, "problems": 4}}  # fmt: skip
    (runs[1] / "eval.json").write_text(json.dumps(held_out))
    try:
        png, md, table = write_report(runs, tmp_path / "cmp.png")
    finally:
        (runs[1] / "eval.json").unlink()
    assert md == tmp_path / "cmp.md" and png.exists()
    assert _table_row(table, "kd", "ce")[0] == _table_row(table, "sft", "ce")[0]  # same start, same first batch
    assert "| sft | n/a | n/a | 1.2500 | n/a | 0.5000 | 0.1000 | 0.2500 (1/4) |" in table
    sft = next(line for line in table.splitlines() if line.startswith("| sft |"))
    assert "none (SFT)" in sft and "uld" not in sft  # an SFT run is not labelled with a KD loss
    assert objective(load_run(runs[0])) != objective(load_run(runs[1]))  # their totals are not overlaid
    one = _decoded(write_report([runs[0]], tmp_path / "one.png")[0])
    assert not np.array_equal(one, _decoded(png))  # the second run's curves are drawn too


@pytest.mark.slow
def test_two_teacher_run_plots_each_teacher(tmp_path, multi_caches, tiny_model_dir):
    run = _train(tmp_path, tiny_model_dir, [multi_caches["a"], multi_caches["b"]], "u", max_steps=3, top_k=6,
                 kd_loss=["kl", "uld"])  # fmt: skip
    stats = metric_stats(load_run(run))
    assert {"kl_tiny-qwen2", "uld_tiny-llama", "kd", "ce"} <= set(stats)
    _, _, table = write_report([run])
    assert "| 2 teachers (mean) | 0.5 | kl, uld |" in table and _table_row(table, "u", "kl_tiny-qwen2")


def test_bad_runs_are_refused(tmp_path, runs):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no metrics records"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "ce": 1.0}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        load_run(tmp_path)
    # a killed run's half-written last line is dropped
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "ce": 1.0}\n{"step": 2, "c')
    assert [r["step"] for r in load_run(tmp_path).records] == [1]
